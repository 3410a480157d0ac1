"""Images in rows: TRL's vision columns, read, checked, and turned into image tokens and pixels.

A row of a vision dataset has an ``images`` column (a list) or an ``image`` column (one image):
PIL images, file paths, bytes, or ``datasets.Image`` values (``{"bytes", "path"}``).
Conversational text marks where each image goes with an ``{"type": "image"}`` content part; a
conversation given with plain string contents gets one part per image at the start of its first
user turn (TRL's ``prepare_multimodal_messages``). Standard text carries the processor's image
token itself, once per image.

The text is tokenized as any other row, each image rendered as a single image token; then
each image token is repeated as many times as the processor gives that image (16 for
``builtin:tiny-vlm``; for Qwen2-VL it depends on the image's size). Those positions are never
completion tokens. The pixels are made when a batch is collated, so a prepared dataset holds
images, not pixel tensors.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from lit_align.data.sources import DataFormatError
from lit_align.data.tokenize import is_conversational

IMAGE_COLUMNS = ("images", "image")
TEXT_COLUMNS = ("messages", "prompt", "completion", "chosen", "rejected", "text")


def row_images(row: dict) -> list:
    """The raw images of a row (``images``, or ``image`` as a list of one), possibly empty."""
    if row.get("images") is not None:
        value = row["images"]
        return list(value) if isinstance(value, (list, tuple)) else [value]
    if row.get("image") is not None:
        return [row["image"]]
    return []


def load_image(value: Any, where: str):
    """``value`` as an RGB PIL image: a PIL image, a file path, bytes, or a ``datasets.Image`` dict."""
    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and (value.get("bytes") or value.get("path")):
            image = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, (str, Path)):
            image = Image.open(Path(value).expanduser())
        else:
            raise DataFormatError(f"{where}: expected a PIL image, a file path, bytes or a datasets.Image value, "
                                  f"got {type(value).__name__}")
        image.load()
    except FileNotFoundError as err:
        raise DataFormatError(f"{where}: image file {value!r} does not exist") from err
    except (UnidentifiedImageError, OSError) as err:
        raise DataFormatError(f"{where}: cannot read the image ({err})") from err
    return image.convert("RGB")


def with_image_parts(messages: list[dict], num_images: int, where: str) -> list[dict]:
    """Messages whose contents are lists of parts, with one image part per image: string contents
    become text parts, and when the conversation has no image part yet, ``num_images`` of them go
    before the text of its first user turn (TRL's rule). The number of image parts must equal the
    number of images."""
    out, placed = [], any(_image_parts(m) for m in messages)
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
            if message["role"] == "user" and not placed:
                parts = [{"type": "image"} for _ in range(num_images)] + parts
                placed = True
            message = {**message, "content": parts}
        out.append(message)
    found = sum(_image_parts(m) for m in out)
    if found != num_images:
        raise DataFormatError(f"{where}: the conversation has {found} image parts for {num_images} images; "
                              "give one {'type': 'image'} content part per image")
    return out


def _image_parts(message: dict) -> int:
    content = message.get("content")
    return 0 if isinstance(content, str) or content is None else sum(1 for p in content if p.get("type") == "image")


def structured_row(row: dict, num_images: int, where: str) -> dict:
    """The row's conversational columns with image parts (see :func:`with_image_parts`). The images
    belong to the prompt: a prompt column gets them, the completions only become parts; without a
    prompt column, each of ``messages``, ``chosen`` and ``rejected`` holds the whole conversation."""
    out = dict(row)
    holders = ["prompt"] if is_conversational(row.get("prompt")) else ["messages", "chosen", "rejected"]
    for name in TEXT_COLUMNS:
        value = row.get(name)
        if is_conversational(value):
            out[name] = with_image_parts(value, num_images if name in holders else 0, f"{where}, column {name!r}")
    return out


@dataclass
class ImageTokens:
    """What a processor does with images: which token stands for one, how many tokens each image
    becomes, which per-token inputs the model also wants, and the pixel inputs of a batch."""

    processor: Any
    token: str = field(init=False)
    token_id: int = field(init=False)
    token_type_keys: tuple[str, ...] = field(init=False)
    _counts: dict = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        token = getattr(self.processor, "image_token", None)
        if token is None or getattr(self.processor, "image_processor", None) is None:
            raise ValueError(f"{type(self.processor).__name__} has no image token or image processor: not a vision-language processor")
        self.token = token
        self.token_id = self.processor.tokenizer.convert_tokens_to_ids(token)
        from PIL import Image

        probe = self.processor(text=[token], images=[[Image.new("RGB", (32, 32))]], add_special_tokens=False)
        # Gemma 3 (token_type_ids), Qwen2.5-VL (mm_token_type_ids): 1 on image tokens
        self.token_type_keys = tuple(k for k in ("token_type_ids", "mm_token_type_ids") if k in probe)

    def count(self, image) -> int:
        """Tokens the processor gives ``image``: a function of its size (fixed for LLaVA, the resized
        grid for Qwen2-VL, the tiling for LLaVA-NeXT), asked of the processor once per size."""
        if image.size not in self._counts:
            ids = self.processor(text=[self.token], images=[[image]], add_special_tokens=False)["input_ids"][0]
            self._counts[image.size] = sum(1 for t in ids if t == self.token_id)
        return self._counts[image.size]

    def expand(self, seq: dict[str, list[int]], counts: list[int], where: str) -> dict[str, list[int]]:
        """``seq`` with its ``k``-th image token repeated ``counts[k]`` times; the copies are never
        completion or assistant tokens."""
        positions = [i for i, t in enumerate(seq["input_ids"]) if t == self.token_id]
        if len(positions) != len(counts):
            raise DataFormatError(f"{where}: the text has {len(positions)} image tokens ({self.token!r}) for {len(counts)} "
                                  "images; give one image token (or image part) per image")
        out = {k: [] for k in seq}
        start = 0
        for position, n in zip(positions, counts):
            for k, values in seq.items():
                out[k] += values[start:position]
                out[k] += [self.token_id if k == "input_ids" else (values[position] if k == "step_labels" else 0)] * n
            start = position + 1
        for k, values in seq.items():
            out[k] += values[start:]
        return out

    def expand_row(self, sequences: list[dict], extras: dict, counts: list[int], where: str) -> tuple[list[dict], dict]:
        """Every sequence of a tokenized row expanded (:meth:`expand`), and the untruncated prompt ids
        a format keeps among its per-row values (KTO's ``prompt_ids``, from which KL pairs are built)."""
        sequences = [self.expand(seq, counts, where) for seq in sequences]
        if "prompt_ids" in extras:
            extras = {**extras, "prompt_ids": self.expand({"input_ids": extras["prompt_ids"]}, counts, where)["input_ids"]}
        return sequences, extras

    def whole(self, seq: dict[str, list[int]], counts: list[int]) -> bool:
        """Whether a (truncated) sequence still holds every token of every image."""
        return sum(1 for t in seq["input_ids"] if t == self.token_id) == sum(counts)

    def pixels(self, images: list) -> dict[str, Tensor]:
        """The image processor's tensors for ``images`` (pixel values, grid or image sizes)."""
        out = self.processor.image_processor(images, return_tensors="pt")
        return {k: v for k, v in out.items() if isinstance(v, Tensor)}

    def batch_inputs(self, input_ids: Tensor, images: list) -> dict[str, Tensor]:
        """A batch's vision inputs: the pixels of ``images`` (every image of every row, in row
        order) and the per-token types the model wants."""
        return self.with_token_types(input_ids, self.pixels(images) if images else {})

    def with_token_types(self, input_ids: Tensor, pixels: dict[str, Tensor]) -> dict[str, Tensor]:
        """``pixels`` and the per-token types the model wants (1 on image tokens) for ``input_ids``."""
        return {**pixels, **{key: (input_ids == self.token_id).long() for key in self.token_type_keys}}

