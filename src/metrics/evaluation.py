"""FID plumbing without Lightning: metric names, sharding of samples over processes, the reference cache.

- `shard_indices(n, rank, world_size)`: rank r takes samples r, r + W, ... < n, so W processes produce exactly n
  samples in total (no padding duplicates, unlike a DistributedSampler).
- The statistics themselves are torchmetrics `Metric`s (`src.metrics.fid`: `FeatureStatistics`, `FrechetDistance`),
  which sum them across processes.
- Reference statistics are computed once per (dataset, split, extractor, image size, number of images) and
  cached as pytorch-fid/torch-fidelity style .npz (`mu`, `sigma`) plus the `key` (JSON) they were computed
  for; a file whose stored key differs is recomputed. A user-supplied .npz is used as is.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from src.metrics.fid import ArrayLike

CACHE_ENV = "DDIM_FID_CACHE"
# How each extractor resizes, part of the cache key (changing it must invalidate cached statistics).
RESIZE = {"inception": "tf1-bilinear-299", "standin": "bilinear-32"}
CACHE_VERSION = 1


def metric_name(extractor_name: str, metric: str = "fid", stage: str = "val") -> str:
    """`val/fid` for the standard Inception network only; `val/fid_standin` (NOT FID) for the stand-in;
    `val/fd_classifier` for a classifier's features (a Fréchet distance, not Inception's)."""
    if extractor_name == "classifier" and metric == "fid":
        return f"{stage}/fd_classifier"
    suffix = "" if extractor_name == "inception" else f"_{extractor_name}"
    return f"{stage}/{metric}{suffix}"


def default_cache_dir() -> Path:
    """$DDIM_FID_CACHE, else ~/.cache/ddim-lightning/fid_stats."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ddim-lightning" / "fid_stats")


def shard_indices(num_samples: int, rank: int, world_size: int) -> Tensor:
    """Sample indices of one process: rank, rank + world_size, ... < num_samples."""
    return torch.arange(rank, num_samples, world_size, dtype=torch.int64)


# ------------------------------------------------------------------------------------------ statistics files
def reference_key(dataset: str, split: str, extractor_name: str, image_size: int, num_images: int) -> dict:
    # A classifier's id is "classifier-<hash of its file>" (`features.extractor_id`).
    classifier = extractor_name.startswith("classifier")
    resize = "bilinear-antialias-to-classifier" if classifier else RESIZE.get(extractor_name, "unknown")
    return {
        "dataset": dataset,
        "split": split,
        "extractor": extractor_name,
        "resize": resize,
        "image_size": int(image_size),
        "num_images": int(num_images),
        "version": CACHE_VERSION,
    }


def cache_path(cache_dir: str | os.PathLike, key: dict) -> Path:
    """`<cache_dir>/<dataset>-<split>-<extractor>-<size>px-n<N>-<hash of the key>.npz`."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    name = f"{key['dataset']}-{key['split']}-{key['extractor']}-{key['image_size']}px-n{key['num_images']}-{digest}"
    return Path(cache_dir) / f"{name}.npz"


def save_statistics(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, key: dict | None = None) -> Path:
    """Write `mu`, `sigma` (and the key as JSON) atomically, so a crash never leaves a half-written cache."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npz")
    os.close(fd)
    try:
        extra = {"key": np.array(json.dumps(key, sort_keys=True))} if key is not None else {}
        np.savez(tmp, mu=mu, sigma=sigma, **extra)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict | None]:
    """`mu`, `sigma` (float64) and the stored key (None for files from pytorch-fid or torch-fidelity)."""
    with np.load(path) as data:
        key = json.loads(str(data["key"])) if "key" in data.files else None
        return data["mu"].astype(np.float64), data["sigma"].astype(np.float64), key


def read_cached_statistics(
    key: dict, cache_dir: str | os.PathLike | None = None
) -> tuple[Path, tuple[np.ndarray, np.ndarray] | None]:
    """The cache file of `key` and its (mu, sigma) when the file exists and its stored key matches, else None."""
    path = cache_path(cache_dir or default_cache_dir(), key)
    if path.is_file():
        mu, sigma, stored = load_statistics(path)
        if stored == key:
            return path, (mu, sigma)
    return path, None


def cached_statistics(
    key: dict, compute: Callable[[], tuple[ArrayLike, ArrayLike]], cache_dir: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray, Path, bool]:
    """(mu, sigma, path, computed): the cache file of `key` when its stored key matches, else `compute()`, saved.

    One process; under torch.distributed the FID callback first agrees over all processes whether to compute
    (`FIDCallback.reference`), because computing is a collective there.
    """
    path, loaded = read_cached_statistics(key, cache_dir)
    if loaded is not None:
        return loaded[0], loaded[1], path, False
    mu, sigma = (np.asarray(torch.as_tensor(a).cpu(), dtype=np.float64) for a in compute())
    save_statistics(path, mu, sigma, key)
    return mu, sigma, path, True
