"""Images for the Qwen-VL models: read an ``image`` value, pixel-encode it, expand its prompt tokens.

    vision = Vision(load_image_processor(path), tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), 262_144, 4_194_304)
    reason = check_image(row["image"], root)                        # None, or why the image is unusable
    n = vision.tokens(image_size(row["image"]))                     # its <|image_pad|> run length, no decode
    image = load_image(row["image"], source="train.jsonl:12")      # path, bytes, PIL image or {"bytes"|"path"}
    pix = vision.encode([image])                                    # pixel_values, image_grid_thw, tokens
    ids = expand_image_tokens(ids, vision.image_token_id, pix.tokens)  # one <|image_pad|> -> n tokens

The image processor is transformers' PIL/numpy one (``Qwen2VLImageProcessorPil``), so no torchvision is
needed; the token expansion is done here because transformers' ``Qwen*VLProcessor`` insists on
a torchvision video processor. A bad image raises :class:`~medix_fast.errors.DataError` naming
the row and the file.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError

IMAGE_TOKEN = "<|image_pad|>"


def resolve_image(value: Any, root: str | os.PathLike | None = None) -> Any:
    """``value`` with a ``datasets`` Image dict unwrapped and a relative path joined to ``root``."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (str, os.PathLike)):
        path = Path(value).expanduser()
        return Path(root) / path if not path.is_absolute() and root is not None else path
    return value


def _open(value: Any, action):
    """``action(PIL image)`` for a path, bytes or PIL image; DataError (without the row) otherwise."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, Image.Image):
        return action(value)
    if isinstance(value, (bytes, bytearray)):
        stream, name = io.BytesIO(value), f"of {len(value)} bytes"
    elif isinstance(value, Path):
        if not value.is_file():
            raise DataError(f"image file {str(value)!r} does not exist")
        stream, name = value, repr(str(value))
    else:
        raise DataError(f"field 'image' must be a path, bytes or a PIL image, got {type(value).__name__}")
    try:
        with Image.open(stream) as image:
            return action(image)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"image {name} is unreadable ({type(err).__name__}: {err})") from err


def load_image(value: Any, source: str = "", root: str | os.PathLike | None = None):
    """An RGB ``PIL.Image`` from a path (relative ones resolved against ``root``), raw bytes, a
    PIL image or a ``datasets`` Image dict (``{"bytes": ..., "path": ...}``); DataError naming ``source``."""
    try:
        return _open(resolve_image(value, root), lambda image: image.convert("RGB"))
    except DataError as err:
        raise DataError(f"{source}: {err}" if source else str(err)) from err


def image_size(value: Any, root: str | os.PathLike | None = None) -> tuple[int, int]:
    """(height, width) read from the image header only (no pixel decode)."""
    width, height = _open(resolve_image(value, root), lambda image: image.size)
    return height, width


def check_image(value: Any, root: str | os.PathLike | None = None) -> str | None:
    """Why an ``image`` value is unusable (missing file, not an image, wrong type), or None."""
    try:
        image_size(value, root)
    except DataError as err:
        return str(err)
    return None


@dataclass
class PixelBatch:
    pixel_values: torch.Tensor    # (P, C * temporal * patch * patch): every image's patches, concatenated
    image_grid_thw: torch.Tensor  # (N, 3): (t, h, w) patches per image
    tokens: list[int]             # merged image tokens per image (its <|image_pad|> run length)


@dataclass
class Vision:
    """What prompt building and the sampler need to feed images to a VL model."""
    image_processor: Any
    image_token_id: int
    min_pixels: int | None = None  # None: the image processor's own limits
    max_pixels: int | None = None

    def __post_init__(self):
        size = dict(self.image_processor.size)
        self.min_pixels = self.min_pixels or size["shortest_edge"]
        self.max_pixels = self.max_pixels or size["longest_edge"]
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"image pixel limits must satisfy 0 < min_pixels <= max_pixels, "
                             f"got {self.min_pixels} and {self.max_pixels}")

    def tokens(self, size: tuple[int, int]) -> int:
        """Image tokens (merged patches) of an image of (height, width) after the resize."""
        patches = self.image_processor.get_number_of_image_patches(
            *size, {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels})
        return patches // self.image_processor.merge_size ** 2

    def pixels(self, image: Any) -> PixelBatch | None:
        """One prompt's image (anything :func:`load_image` takes) patchified; None without one."""
        return None if image is None else self.encode([load_image(image)])

    def encode(self, images: list) -> PixelBatch:
        """Resize (within [min_pixels, max_pixels]) and patchify RGB PIL ``images``."""
        size = {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}
        out = self.image_processor(images=images, return_tensors="pt", size=size)
        grid = out["image_grid_thw"]  # (N, 3)
        return PixelBatch(out["pixel_values"], grid, (grid.prod(-1) // self.image_processor.merge_size ** 2).tolist())


def expand_image_tokens(ids: list[int], image_token_id: int, tokens: list[int]) -> list[int]:
    """Replace the k-th ``<|image_pad|>`` in ``ids`` by ``tokens[k]`` copies of it."""
    out, k = [], 0
    for t in ids:
        if t == image_token_id:
            if k == len(tokens):
                raise ValueError(f"the prompt has more image tokens than the {len(tokens)} image(s) given")
            out += [t] * tokens[k]
            k += 1
        else:
            out.append(t)
    if k != len(tokens):
        raise ValueError(f"the prompt has {k} image token(s) for {len(tokens)} image(s)")
    return out
