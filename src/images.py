"""Image conversion at the edges: model space [-1, 1] <-> uint8, grids and PNG files (no torchvision)."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from src.signals import finish_before_exit

HEADER_HEIGHT = 12  # pixels of the strip that names a grid's columns (`label_columns`)


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] floats (B, C, H, W) -> uint8 in [0, 255], rounding as the DDPM code does ((x + 1) * 127.5)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def make_grid(images: Tensor, nrow: int | None = None, padding: int = 2, pad_value: int = 255) -> Tensor:
    """Tile uint8 images (B, C, H, W) into one (C, H', W') uint8 image, `nrow` per row (default: square)."""
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    b, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    ncol = math.ceil(b / nrow)
    grid = images.new_full((c, ncol * (h + padding) + padding, nrow * (w + padding) + padding), pad_value)
    for k in range(b):
        row, col = divmod(k, nrow)
        top, left = padding + row * (h + padding), padding + col * (w + padding)
        grid[:, top : top + h, left : left + w] = images[k]
    return grid


def label_columns(
    grid: Tensor, names: Sequence[str], cell_width: int, padding: int = 2, pad_value: int = 255
) -> Tensor:
    """`grid` (uint8 (C, H, W), from `make_grid` with len(names) columns of `cell_width` pixels) with a strip of
    HEADER_HEIGHT pixels on top naming each column: a class-conditional grid holds one class per column, and the
    header says which. A name wider than its cell is cut to the characters that fit (the full names are the data
    set's `class_names`)."""
    channels, _, width = grid.shape
    strip = Image.new("L", (width, HEADER_HEIGHT), color=pad_value)
    draw = ImageDraw.Draw(strip)
    try:  # FreeType's default font at a size that fits a 28-pixel cell; the bitmap fallback otherwise
        font = ImageFont.load_default(size=9)
    except (ImportError, OSError, TypeError):
        font = ImageFont.load_default()
    ink = 0 if pad_value > 127 else 255
    for column, name in enumerate(names):
        text = str(name)
        while text and draw.textlength(text, font=font) > cell_width:
            text = text[:-1]
        draw.text((padding + column * (cell_width + padding), 0), text, fill=ink, font=font)
    # On the grid's device: a grid of samples made on a GPU stays there until it is saved.
    header = torch.from_numpy(np.array(strip)).to(grid.device).expand(channels, -1, -1)
    return torch.cat([header, grid], dim=1)


def to_pil(image: Tensor) -> Image.Image:
    """uint8 (C, H, W) with C in {1, 3} -> PIL image."""
    array = image.cpu().numpy()
    return Image.fromarray(array[0] if array.shape[0] == 1 else np.transpose(array, (1, 2, 0)))


def read_png(path: str | os.PathLike) -> Tensor:
    """One PNG file (grayscale or RGB) -> uint8 (C, H, W), the inverse of `save_png`."""
    with Image.open(path) as image:
        array = np.array(image.convert("RGB") if image.mode not in ("L", "RGB") else image)  # a writable copy
    return torch.from_numpy(array[None] if array.ndim == 2 else np.ascontiguousarray(array.transpose(2, 0, 1)))


def save_png(image: Tensor, path: str | os.PathLike) -> Path:
    """Write one uint8 (C, H, W) image as PNG atomically (temporary file, then rename): a reader never sees
    a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A forced exit on a signal (src/signals.py) waits for the block, so it leaves no temporary file behind either.
    with finish_before_exit():
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                to_pil(image).save(f, format="PNG")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def save_grid(images: Tensor, path: str | os.PathLike, nrow: int | None = None) -> Path:
    """Save a batch of [-1, 1] (or uint8) images as one PNG grid."""
    return save_png(make_grid(images, nrow=nrow), path)
