"""The embedded visual task ``builtin:shapes``: coloured squares on a plain background, for vision-language models.

An image is ``image_size`` x ``image_size`` RGB (default 32): a dark grey background with 1 to
``max_count`` filled squares (side ``image_size // 4``), all of one colour from :data:`PALETTE`
(red, green, blue, yellow), at random positions that neither overlap nor touch (at least one
background pixel between two squares, so each square is its own connected region). The question
is one of::

    question=colour  "What colour are the squares?"  ->  "red" | "green" | "blue" | "yellow"
    question=count   "How many squares are there?"   ->  "1" | "2" | "3" | "4"  (a digit)

Rows are conversational only, in TRL's vision layout: an ``images`` column holding a list with one
PIL image, and message contents as lists of parts, the image as a placeholder part::

    prompt     = [{"role": "user", "content": [{"type": "text", "text": "What colour are the squares?"}, {"type": "image"}]}]
    completion = [{"role": "assistant", "content": [{"type": "text", "text": "red"}]}]

Once in a ``datasets.Dataset``, inference gives every content part the union of the keys, so the
image part reads back as ``{"type": "image", "text": None}`` (as in TRL's Hub vision datasets), and
``images`` has the feature ``Sequence(Image())``: stored as PNG bytes (lossless), decoded to PIL
images on indexing, and kept through ``save_to_disk`` and parquet.

Rows are deterministic in (seed, split), and the images do not depend on the format or the
question. Train and test images are disjoint: an image belongs to the test split iff a fixed hash
(CRC32) of what it is drawn from (size, colour, sorted square positions) is 0 mod 8.
"""

from __future__ import annotations

import random
import zlib
from typing import TYPE_CHECKING, Any

from lit_align.data.arithmetic import DEFAULT_SIZE, FORMATS, SPLITS, _balanced_flags

if TYPE_CHECKING:  # datasets is imported lazily: rewards import this module and must stay light
    import datasets
    from PIL import Image

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
}
BACKGROUND = (40, 40, 40)
QUESTIONS = {"colour": "What colour are the squares?", "count": "How many squares are there?"}
MAX_COUNT = 4  # answers of the count question are "1".."4"
MIN_IMAGE_SIZE = 8
PREFIX = "builtin:shapes"
# Option name -> type; the values given in a builtin name are parsed with these.
OPTIONS: dict[str, type] = {
    "size": int,
    "seed": int,
    "image_size": int,
    "question": str,
    "max_count": int,
    "test_size": int,
    "noise": float,
}
_TEST_BUCKETS = 8  # 1 in 8 images (by hash) belongs to the test split
_MAX_TRIES = 10_000  # rejection-sampling guard (placements, and test membership)


# --------------------------------------------------------------------------- names


def parse_shapes_name(name: str) -> dict:
    """The typed options of ``builtin:shapes?k=v&...``.

    ``"builtin:shapes?size=200&question=count"`` -> ``{"size": 200, "question": "count"}``.
    Only the options present in the name are returned; defaults are applied by the consumer.
    """
    if not isinstance(name, str) or name.partition("?")[0] != PREFIX:
        raise ValueError(f"{name!r} is not a builtin:shapes name; expected 'builtin:shapes[?option=value&...]'")
    valid = ", ".join(f"{k} ({t.__name__})" for k, t in OPTIONS.items())
    options: dict[str, Any] = {}
    for item in filter(None, name.partition("?")[2].split("&")):
        key, eq, raw = item.partition("=")
        if key not in OPTIONS:
            raise ValueError(f"unknown option {key!r} in {name!r}; valid options: {valid}")
        if not eq:
            raise ValueError(f"option {key!r} in {name!r} has no value (write {key}=...); valid options: {valid}")
        if key in options:
            raise ValueError(f"option {key!r} is given twice in {name!r}")
        try:
            options[key] = OPTIONS[key](raw)
        except ValueError:
            raise ValueError(
                f"option {key!r} in {name!r} must be {OPTIONS[key].__name__}, got {raw!r}; valid options: {valid}"
            ) from None
    return options


# --------------------------------------------------------------------------- the task


def square_side(image_size: int) -> int:
    """The side in pixels of every square of an ``image_size`` image."""
    return image_size // 4


def render(colour: str, positions: tuple[tuple[int, int], ...], image_size: int) -> Image.Image:
    """The RGB image with a square of ``colour`` at each top-left corner ``(x, y)`` in ``positions``."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    side = square_side(image_size)
    for x, y in positions:
        draw.rectangle((x, y, x + side - 1, y + side - 1), fill=PALETTE[colour])  # corners inclusive
    return image


def _positions(rng: random.Random, count: int, image_size: int) -> tuple[tuple[int, int], ...]:
    """``count`` top-left corners, sorted, whose squares keep at least one pixel between them."""
    side = square_side(image_size)
    for _ in range(_MAX_TRIES):
        placed: list[tuple[int, int]] = []
        for _ in range(count):
            x, y = rng.randint(0, image_size - side), rng.randint(0, image_size - side)
            if not all(abs(x - px) > side or abs(y - py) > side for px, py in placed):
                break
            placed.append((x, y))
        else:
            return tuple(sorted(placed))
    raise ValueError(f"could not place {count} squares in a {image_size}px image; increase image_size")


def _is_test(spec: tuple) -> bool:
    # A fixed hash (not the salted builtin hash()) so the partition is the same in every process.
    return zlib.crc32(repr(spec).encode()) % _TEST_BUCKETS == 0


def _specs(split: str, size: int, seed: int, image_size: int, max_count: int) -> list[tuple]:
    """``size`` image specs ``(image_size, colour, positions)`` of ``split``."""
    # The string seed is hashed with SHA-512 by random.Random, so it is stable across processes.
    rng = random.Random(f"shapes/{split}/{seed}/{image_size}/{max_count}")
    want_test = split == "test"
    out = []
    for _ in range(size):
        for _ in range(_MAX_TRIES):
            colour = rng.choice(list(PALETTE))
            spec = (image_size, colour, _positions(rng, rng.randint(1, max_count), image_size))
            if _is_test(spec) == want_test:
                break
        else:
            raise ValueError(f"could not draw a {split} image with image_size={image_size}, max_count={max_count}")
        out.append(spec)
    return out


def shapes_rows(
    fmt: str,
    split: str = "train",
    *,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    image_size: int = 32,
    question: str = "colour",
    max_count: int = 3,
    noise: float = 0.0,
) -> list[dict]:
    """``size`` rows of the shapes task in TRL format ``fmt`` (every one of :data:`FORMATS` but ``stepwise``).

    Each row has an ``images`` column (a list with one PIL image). ``preference`` rows reject another
    palette colour, or another count in ``1..max(max_count, 2)``; ``unpaired_preference`` labels are
    half True; ``prompt_only`` rows carry the right ``answer`` string, which reward functions receive.
    ``noise``: that fraction of the demonstrations (``language_modeling``, ``prompt_completion``) gives a
    wrong answer, as ``builtin:arithmetic``'s slips (the warm start ``builtin:tiny-vlm-sft`` learns from them).
    """
    if fmt == "stepwise":
        raise ValueError("builtin:shapes has no stepwise format: its answers are one word, with no steps to label; "
                         f"valid formats: {', '.join(f for f in FORMATS if f != 'stepwise')}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid formats: {', '.join(f for f in FORMATS if f != 'stepwise')}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for builtin:shapes; valid splits: {', '.join(SPLITS)}")
    if question not in QUESTIONS:
        raise ValueError(f"option 'question' must be one of {', '.join(QUESTIONS)}, got {question!r}")
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"option 'noise' must be in [0, 1], got {noise}")
    if size < 0 or image_size < MIN_IMAGE_SIZE or not 1 <= max_count <= MAX_COUNT:
        raise ValueError(f"need size >= 0, image_size >= {MIN_IMAGE_SIZE}, 1 <= max_count <= {MAX_COUNT}; "
                         f"got {size=}, {image_size=}, {max_count=}")
    specs = _specs(split, size, seed, image_size, max_count)
    # A separate stream for wrong answers and labels, so the images do not depend on the format.
    rng = random.Random(f"shapes-answers/{split}/{seed}/{fmt}/{question}")
    correct = _balanced_flags(rng, size)
    answers = list(PALETTE) if question == "colour" else [str(n) for n in range(1, max(max_count, 2) + 1)]

    def wrong(good: str) -> str:
        return rng.choice([a for a in answers if a != good])

    def user(text: str) -> list[dict]:
        return [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image"}]}]

    def assistant(text: str) -> list[dict]:
        return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]

    noisy = random.Random(f"shapes-noise/{split}/{seed}/{question}")
    rows = []
    for (_, colour, positions), ok in zip(specs, correct):
        good = colour if question == "colour" else str(len(positions))
        prompt, images = user(QUESTIONS[question]), [render(colour, positions, image_size)]
        shown = wrong(good) if noise and noisy.random() < noise else good  # a demonstration's answer
        if fmt == "language_modeling":
            row = {"messages": prompt + assistant(shown)}
        elif fmt == "prompt_completion":
            row = {"prompt": prompt, "completion": assistant(shown)}
        elif fmt == "preference":
            row = {"prompt": prompt, "chosen": assistant(good), "rejected": assistant(wrong(good))}
        elif fmt == "unpaired_preference":
            row = {"prompt": prompt, "completion": assistant(good if ok else wrong(good)), "label": ok}
        else:  # prompt_only
            row = {"prompt": prompt, "answer": good}
        rows.append({**row, "images": images})
    return rows


def shapes_dataset(name: str, fmt: str, split: str) -> datasets.Dataset:
    """The ``datasets.Dataset`` for a ``builtin:shapes?...`` name, format and split.

    The test split has ``test_size`` rows, by default ``max(size // 10, 16)``. Its ``images``
    column has the feature ``datasets.Sequence(datasets.Image())``.
    """
    import datasets

    options = parse_shapes_name(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for {name!r}; valid splits: {', '.join(SPLITS)}")
    size = options.pop("size", DEFAULT_SIZE)
    test_size = options.pop("test_size", max(size // 10, 16))
    rows = shapes_rows(fmt, split, size=size if split == "train" else test_size, **options)
    ds = datasets.Dataset.from_list(rows)
    images = datasets.Sequence(datasets.Image())
    if rows and ds.features["images"] != images:
        ds = ds.cast_column("images", images)
    return ds
