"""Latent diffusion's training latents, encoded once: every training image's posterior moments, memory-mapped.

A frozen first stage gives the same posterior q(z|x) = N(mean, std^2) for an image at every step, so encoding each
batch again spends most of a latent model's training compute on the encoder (on the Fashion-MNIST recipe a quarter
of the FLOPs per image). The cache stores (mean, std) of every image of the training split once, and training draws
z = mean + std * eps afresh at every step (`LatentFirstStage.latents_from_moments`), as LDM's training does from its
precomputed posteriors (Rombach et al. 2022; the reference samples q(z|x) per step too).

The file is a raw array (N, F, 2, C, h, w) of float16 (or float32) with a JSON sidecar holding its key: the first
stage's weights and normalisation-independent architecture (a digest of its state dict), the images (a digest of
their bytes, or the folder cache's key), the number of orientations F (2 when training flips images: the latents
of the flipped image are stored too, since an encoder is not flip-equivariant) and the dtype. It is built by one
process under a file lock into temporary files renamed into place, the sidecar last, exactly as the folder cache
(src/data/folder.py); every other process of a multi-GPU run, and every later run with the same autoencoder and
images, memory-maps it and shares the operating system's page cache.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from src.data.datasets import to_model_range
from src.data.folder import CACHE_ENV, _digest, _locked

CACHE_VERSION = 1
DTYPES = {"float16": np.float16, "float32": np.float32}


def default_latent_cache_dir() -> Path:
    """$DDIM_DATA_CACHE/latents, else ~/.cache/ddim-lightning/latents."""
    base = os.environ.get(CACHE_ENV)
    return Path(base) / "latents" if base else Path.home() / ".cache" / "ddim-lightning" / "latents"


@dataclass
class CachedLatents:
    """A training batch from the latent cache, in place of its images: the posterior's (mean, std) per image,
    (B, 2, C, h, w), and those of the horizontally flipped images where the cache holds them (else None)."""

    moments: Tensor
    flipped_moments: Tensor | None = None

    def __len__(self) -> int:
        return len(self.moments)

    def pin_memory(self) -> CachedLatents:  # DataLoader(pin_memory=True) calls this on batches of a custom type
        flipped = None if self.flipped_moments is None else self.flipped_moments.pin_memory()
        return CachedLatents(self.moments.pin_memory(), flipped)

    def flip_horizontally(self, flip: Tensor) -> CachedLatents:
        """The batch with the images where `flip` (B,) is True flipped (the training loader's random flips)."""
        if self.flipped_moments is None:
            raise ValueError("this latent cache holds no flipped latents; build it with random flips on")
        chosen = torch.where(flip[:, None, None, None, None], self.flipped_moments, self.moments)
        return CachedLatents(chosen)


def _open(stem: Path, key: dict) -> np.ndarray | None:
    """The complete cache at `stem` for `key`, or None (absent, stale, or its build never finished)."""
    try:
        meta = json.loads(stem.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    raw = stem.with_suffix(".raw")
    dtype = DTYPES[key["dtype"]]
    shape = tuple(meta.get("shape", ()))
    if meta.get("key") != key or not raw.is_file() or raw.stat().st_size != np.prod(shape) * np.dtype(dtype).itemsize:
        return None
    return np.memmap(raw, dtype=dtype, mode="c", shape=shape)  # copy-on-write: never written, pages shared


@torch.no_grad()
def _build(
    encode_moments: Callable[[Tensor], Tensor],
    images: Tensor,
    stem: Path,
    key: dict,
    device: torch.device,
    batch_size: int,
    progress: bool,
) -> None:
    first = encode_moments(to_model_range(images[:1]).to(device))
    shape = (len(images), key["orientations"], *first.shape[1:])
    tmp_raw = stem.with_name(f".{stem.name}.{os.getpid()}.raw.tmp")
    tmp_meta = stem.with_name(f".{stem.name}.{os.getpid()}.json.tmp")
    try:
        array = np.memmap(tmp_raw, dtype=DTYPES[key["dtype"]], mode="w+", shape=shape)
        starts = range(0, len(images), batch_size)
        for start in tqdm(starts, desc="Encoding the latent cache", unit="batch", disable=not progress):
            batch = to_model_range(images[start : start + batch_size]).to(device)
            for orientation in range(key["orientations"]):
                moments = encode_moments(batch.flip(-1) if orientation else batch)
                array[start : start + len(batch), orientation] = moments.cpu().numpy()
        array.flush()
        del array
        tmp_meta.write_text(json.dumps({"key": key, "shape": list(shape)}))
        os.replace(tmp_raw, stem.with_suffix(".raw"))
        os.replace(tmp_meta, stem.with_suffix(".json"))  # the cache counts as complete from here on
    finally:
        tmp_raw.unlink(missing_ok=True)
        tmp_meta.unlink(missing_ok=True)


def latent_cache(
    encode_moments: Callable[[Tensor], Tensor],
    first_stage_digest: str,
    images: Tensor,
    images_key: str,
    orientations: int = 1,
    dtype: str = "float16",
    cache_dir: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    progress: bool = True,
) -> Tensor:
    """The posterior moments (N, F, 2, C, h, w) of uint8 images (N, C, H, W), from the cache or encoded into it.

    Args:
        encode_moments: float images in [-1, 1] on `device` -> (B, 2, C, h, w) (`LatentFirstStage.encode_moments`).
        first_stage_digest: what identifies the encoder (`LatentFirstStage.autoencoder_digest`).
        images: the training split's uint8 images (a memory-mapped folder cache is read batch by batch).
        images_key: what identifies those images (`tensors_digest` of them, or the folder cache's key).
        orientations: 1, or 2 to store the horizontally flipped images' moments too.
        dtype: "float16" (half the bytes; z's rounding is far below the posterior's own std) or "float32".
        cache_dir: where the cache lives (default `default_latent_cache_dir()`).
        device: where to encode.
        batch_size: images per encoder call while building.
        progress: show a progress bar while building.
    """
    if dtype not in DTYPES:
        raise ValueError(f"latent cache dtype {dtype!r} is unknown; choose one of {', '.join(DTYPES)}")
    if orientations not in (1, 2):
        raise ValueError(f"orientations must be 1 or 2, got {orientations}")
    key = {"version": CACHE_VERSION, "first_stage": first_stage_digest, "images": images_key,
           "num_images": len(images), "orientations": orientations, "dtype": dtype}  # fmt: skip
    root = Path(cache_dir) if cache_dir is not None else default_latent_cache_dir()
    stem = root / f"latents-{_digest(key)}"
    with _locked(stem.with_suffix(".lock")):
        array = _open(stem, key)
        if array is None:
            _build(encode_moments, images, stem, key, torch.device(device), batch_size, progress)
            array = _open(stem, key)
    assert array is not None
    return torch.from_numpy(array)


class CachedLatentDataset(Dataset):
    """The training split as cached posterior moments: batches `(CachedLatents, labels)`.

    Args:
        moments: (N, F, 2, C, h, w) from `latent_cache` (F = 2: the flipped images' moments too).
        labels: int64 (N,).
        indices: the rows this dataset serves (the training part of a split); None: all.
    """

    def __init__(self, moments: Tensor, labels: Tensor, indices: Tensor | None = None) -> None:
        if moments.ndim != 6 or moments.shape[2] != 2 or len(moments) != len(labels):
            raise ValueError(f"moments must be (N, F, 2, C, h, w) with N = {len(labels)}, got {tuple(moments.shape)}")
        self.moments = moments
        self.labels = labels.to(torch.int64)
        self.indices = None if indices is None else torch.as_tensor(indices, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.moments) if self.indices is None else len(self.indices)

    def __getitems__(self, indices: Sequence[int]) -> tuple[CachedLatents, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        if self.indices is not None:
            idx = self.indices[idx]
        rows = self.moments[idx]
        flipped = rows[:, 1] if rows.shape[1] == 2 else None
        return CachedLatents(rows[:, 0], flipped), self.labels[idx]
