"""The embedded visual task builtin:shapes (images, rows in every format, splits) and its reward."""

import datasets
import pytest
from PIL import Image

from lit_align.data.arithmetic import FORMATS
from lit_align.data.shapes import (
    BACKGROUND,
    PALETTE,
    _is_test,
    _specs,
    parse_shapes_name,
    render,
    shapes_dataset,
    shapes_rows,
    square_side,
)
from lit_align.data.sources import load_source
from lit_align.rewards.shapes import shapes_reward, stated_answer

SHAPES_FORMATS = [f for f in FORMATS if f != "stepwise"]
EXPECTED = {
    "language_modeling": {"messages", "images"},
    "prompt_completion": {"prompt", "completion", "images"},
    "preference": {"prompt", "chosen", "rejected", "images"},
    "unpaired_preference": {"prompt", "completion", "label", "images"},
    "prompt_only": {"prompt", "answer", "images"},
}


def _pixels(row) -> bytes:
    return row["images"][0].convert("RGB").tobytes()


def _answer(message_list) -> str:
    (part,) = message_list[-1]["content"]
    assert part["type"] == "text"
    return part["text"]


def _components(image: Image.Image) -> list[list[tuple[int, int]]]:
    """4-connected regions of non-background pixels, in plain Python over the pixel grid."""
    width, height = image.size
    pixels = image.load()
    seen, regions = set(), []
    for y0 in range(height):
        for x0 in range(width):
            if (x0, y0) in seen or pixels[x0, y0] == BACKGROUND:
                continue
            seen.add((x0, y0))
            stack, region = [(x0, y0)], []
            while stack:
                x, y = stack.pop()
                region.append((x, y))
                for nx, ny in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
                    if 0 <= nx < width and 0 <= ny < height and (nx, ny) not in seen and pixels[nx, ny] != BACKGROUND:
                        seen.add((nx, ny))
                        stack.append((nx, ny))
            regions.append(region)
    return regions


def test_rows_deterministic_and_seeds_differ():
    a = shapes_rows("preference", size=30, seed=3)
    b = shapes_rows("preference", size=30, seed=3)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "images"} for r in rows]  # noqa: E731
    assert strip(a) == strip(b) and [_pixels(r) for r in a] == [_pixels(r) for r in b]
    assert [_pixels(r) for r in a] != [_pixels(r) for r in shapes_rows("preference", size=30, seed=4)]
    # The images do not depend on the format or the question.
    assert [_pixels(r) for r in a] == [_pixels(r) for r in shapes_rows("prompt_only", size=30, seed=3, question="count")]


def test_train_and_test_disjoint():
    train = _specs("train", 400, 0, 32, 3)
    test = _specs("test", 100, 0, 32, 3)
    assert not any(_is_test(s) for s in train) and all(_is_test(s) for s in test)
    assert set(train).isdisjoint(test) and len(set(test)) > 50
    # The same holds for what a model sees: no test image is a train image.
    images = lambda split, n: {_pixels(r) for r in shapes_rows("prompt_only", split, size=n)}  # noqa: E731
    assert images("train", 400).isdisjoint(images("test", 100))


@pytest.mark.parametrize("question", ["colour", "count"])
def test_formats_columns_and_answers(question):
    for fmt in SHAPES_FORMATS:
        rows = shapes_rows(fmt, size=40, seed=1, question=question)
        assert len(rows) == 40
        for row in rows:
            assert set(row) == EXPECTED[fmt], fmt
            (image,) = row["images"]
            assert isinstance(image, Image.Image) and image.size == (32, 32) and image.mode == "RGB"
            prompt = row["messages"][:1] if fmt == "language_modeling" else row["prompt"]
            # the question, then the image: the image tokens sit next to the answer they decide
            assert prompt[0]["role"] == "user" and prompt[0]["content"][1] == {"type": "image"}
            assert prompt[0]["content"][0]["type"] == "text"
        if fmt == "preference":
            assert all(_answer(r["chosen"]) != _answer(r["rejected"]) for r in rows)
            truth = [r["answer"] for r in shapes_rows("prompt_only", size=40, seed=1, question=question)]
            assert [_answer(r["chosen"]) for r in rows] == truth
        if fmt == "unpaired_preference":
            assert sum(r["label"] for r in rows) == 20 and all(type(r["label"]) is bool for r in rows)
    answers = {r["answer"] for r in shapes_rows("prompt_only", size=200, question=question)}
    assert answers == (set(PALETTE) if question == "colour" else {"1", "2", "3"})


def test_pixels_show_the_answer():
    # The same images (seed, split, image_size, max_count), asked both questions.
    colours = shapes_rows("prompt_only", size=60, seed=2, max_count=4)
    counts = shapes_rows("prompt_only", size=60, seed=2, question="count", max_count=4)
    side = square_side(32)
    assert {r["answer"] for r in counts} == {"1", "2", "3", "4"}
    for by_colour, by_count in zip(colours, counts):
        image = by_colour["images"][0]
        regions = _components(image)
        assert len(regions) == int(by_count["answer"])
        assert {image.getpixel(p) for region in regions for p in region} == {PALETTE[by_colour["answer"]]}
        assert all(len(region) == side * side for region in regions)  # whole squares, none merged
    red = next(r for r in colours if r["answer"] == "red")
    assert PALETTE["red"] in {c for _, c in red["images"][0].getcolors()}


def test_render():
    image = render("blue", ((0, 0), (10, 10)), 16)
    assert image.getpixel((0, 0)) == image.getpixel((13, 13)) == PALETTE["blue"]
    assert image.getpixel((4, 4)) == image.getpixel((15, 15)) == BACKGROUND
    assert len(_components(image)) == 2


def test_reward():
    answer = ["red", "3", "blue", "green"]
    plain = ["red", " 3.\n", "Blue!", "the squares are green"]
    assert shapes_reward(prompts=[None] * 4, completions=plain, answer=answer) == [1.0, 1.0, 1.0, 0.0]
    messages = [[{"role": "assistant", "content": [{"type": "text", "text": t}]}] for t in ["red", "2", "Blue", "green"]]
    assert shapes_reward(prompts=[None] * 4, completions=messages, answer=answer) == [1.0, 0.0, 1.0, 1.0]
    as_string = [[{"role": "assistant", "content": "yellow"}], [{"role": "assistant", "content": ""}]]
    assert shapes_reward(prompts=[None] * 2, completions=as_string, answer=["yellow", "1"]) == [1.0, 0.0]
    assert stated_answer("") == "" and stated_answer("Red, I think") == "red"
    with pytest.raises(ValueError, match="answer"):
        shapes_reward(prompts=[None], completions=["red"], answer=None)


def test_load_source_dataset_and_round_trip(tmp_path):
    ds = load_source("builtin:shapes?size=20", "train", "prompt_completion")
    assert isinstance(ds, datasets.Dataset) and ds.num_rows == 20
    assert set(ds.column_names) == EXPECTED["prompt_completion"]
    assert ds.features["images"] == datasets.Sequence(datasets.Image())
    row = ds[0]
    (image,) = row["images"]
    assert isinstance(image, Image.Image) and image.size == (32, 32)
    # Feature inference gives the image part the text part's keys: {"type": "image", "text": None}.
    assert row["prompt"][0]["content"] == [{"type": "text", "text": "What colour are the squares?"},
                                           {"type": "image", "text": None}]
    assert row["completion"] == [{"role": "assistant", "content": [{"type": "text", "text": row["completion"][0]["content"][0]["text"]}]}]
    rows = shapes_rows("prompt_completion", size=20)
    assert [_pixels(r) for r in ds] == [_pixels(r) for r in rows]
    ds.save_to_disk(str(tmp_path / "shapes"))
    back = datasets.load_from_disk(str(tmp_path / "shapes"))
    assert [_pixels(r) for r in back] == [_pixels(r) for r in rows]
    test = shapes_dataset("builtin:shapes?size=20&image_size=16&question=count", "prompt_only", "test")
    assert test.num_rows == 16 and test[0]["images"][0].size == (16, 16) and test[0]["answer"] in {"1", "2", "3"}


def test_options_and_errors():
    assert parse_shapes_name("builtin:shapes") == {}
    assert parse_shapes_name("builtin:shapes?size=5&question=count&image_size=24") == {
        "size": 5, "question": "count", "image_size": 24}
    with pytest.raises(ValueError, match="unknown option 'colour'"):
        load_source("builtin:shapes?colour=red", "train", "prompt_only")
    with pytest.raises(ValueError, match="option 'size'.*must be int.*'many'"):
        load_source("builtin:shapes?size=many", "train", "prompt_only")
    with pytest.raises(ValueError, match="option 'question'.*colour, count.*'shape'"):
        load_source("builtin:shapes?question=shape", "train", "prompt_only")
    with pytest.raises(ValueError, match="max_count=5"):
        load_source("builtin:shapes?max_count=5", "train", "prompt_only")
    with pytest.raises(ValueError, match="image_size=4"):
        load_source("builtin:shapes?image_size=4", "train", "prompt_only")
    with pytest.raises(ValueError, match="given twice"):
        load_source("builtin:shapes?seed=1&seed=2", "train", "prompt_only")
    with pytest.raises(ValueError, match="no stepwise format"):
        load_source("builtin:shapes", "train", "stepwise")
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        load_source("builtin:shapes", "validation", "prompt_only")
    with pytest.raises(ValueError, match="unknown builtin task 'circles'.*arithmetic, shapes"):
        load_source("builtin:circles", "train", "prompt_only")
    # builtin:arithmetic is dispatched as before.
    assert load_source("builtin:arithmetic?size=4", "train", "prompt_only").column_names == ["prompt", "answer"]


def test_noise_makes_that_share_of_demonstrations_wrong():
    clean, noisy = shapes_rows("prompt_completion", size=400), shapes_rows("prompt_completion", size=400, noise=0.3)
    assert shapes_rows("prompt_completion", size=400, noise=0.0) == clean  # noise 0 draws nothing: rows as before
    text = lambda row: row["completion"][0]["content"][0]["text"]  # noqa: E731
    wrong = sum(text(a) != text(b) for a, b in zip(clean, noisy)) / len(clean)
    assert 0.22 < wrong < 0.38
    assert [r["prompt"] for r in clean] == [r["prompt"] for r in noisy]
    with pytest.raises(ValueError, match="option 'noise' must be in"):
        shapes_rows("prompt_completion", size=4, noise=1.5)
