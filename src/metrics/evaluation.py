"""FID plumbing without Lightning: sharded generation, feature statistics, the reference-statistics cache.

- `shard_indices(n, rank, world_size)`: rank r takes samples r, r + W, ... < n, so W processes produce exactly n
  samples in total (no padding duplicates, unlike a DistributedSampler).
- `sample_statistics(...)`: generate those samples batch by batch, extract features, accumulate, all-reduce.
- Reference statistics are computed once per (dataset, split, extractor, image size, number of images) and
  cached as pytorch-fid/torch-fidelity style .npz (`mu`, `sigma`) plus the `key` (JSON) they were computed
  for; a file whose stored key differs is recomputed. A user-supplied .npz is used as is.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from src.metrics.fid import StreamingStatistics, frechet_distance

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


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@torch.no_grad()
def accumulate(
    extractor: nn.Module,
    batches: Iterable[Tensor],
    device: torch.device | str = "cpu",
    total: int | None = None,
    desc: str = "FID features",
    progress: bool = False,
    logits: list[Tensor] | None = None,
) -> StreamingStatistics:
    """Streaming statistics of the `pool` features of uint8 image batches (all-reduced across processes).

    Features accumulate on `device`; when `logits` is a list, Inception logits (for IS) are appended to it.
    """
    stats: StreamingStatistics | None = None
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False)
    for images in batches:
        out = extractor(images.to(device))
        if stats is None:
            stats = StreamingStatistics(out["pool"].shape[1], device=device)
        stats.update(out["pool"])
        if logits is not None and "logits" in out:
            logits.append(out["logits"].cpu())
        bar.update(images.shape[0])
    bar.close()
    if stats is None:  # this process had no images; still take part in the all-reduce
        stats = StreamingStatistics(int(extractor.pool_dim), device=device)
    stats.all_reduce()
    return stats


def sample_statistics(
    sample_fn: Callable[[Tensor], Tensor],
    extractor: nn.Module,
    num_samples: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[StreamingStatistics, float]:
    """Generate `num_samples` images in total over all processes (`sample_fn(indices) -> uint8 (B, C, H, W)`)
    and return their all-reduced feature statistics and the wall-clock seconds per 1,000 samples."""
    rank, world_size = _dist_info()
    indices = shard_indices(num_samples, rank, world_size)
    start = time.perf_counter()
    batches = (sample_fn(chunk) for chunk in indices.split(batch_size))
    stats = accumulate(extractor, batches, device, len(indices), "FID: sampling + features", progress and rank == 0)
    if stats.num_samples != num_samples:
        raise RuntimeError(f"FID statistics hold {stats.num_samples} samples, expected exactly {num_samples}")
    return stats, (time.perf_counter() - start) / max(num_samples, 1) * 1000.0


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


def cached_statistics(
    key: dict,
    compute: Callable[[], tuple[np.ndarray, np.ndarray]],
    cache_dir: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray, Path, bool]:
    """(mu, sigma, path, computed): load the cache file of `key` when its stored key matches, else `compute()`
    (in every process, which must all call this) and save it from rank 0.

    Under torch.distributed the processes agree first (any process lacking a valid file makes all compute),
    so a collective inside `compute` never waits for a process that loaded the file instead.
    """
    path = cache_path(cache_dir or default_cache_dir(), key)
    loaded = None
    if path.is_file():
        mu, sigma, stored = load_statistics(path)
        loaded = (mu, sigma) if stored == key else None
    rank, world_size = _dist_info()
    missing = loaded is None
    if world_size > 1:
        flag = torch.tensor(float(missing), device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        missing = bool(flag.item() > 0)
    if not missing:
        return loaded[0], loaded[1], path, False
    mu, sigma = compute()
    if rank == 0:
        save_statistics(path, mu, sigma, key)
    return mu, sigma, path, True


def fid_from_statistics(stats: StreamingStatistics, ref_mu: np.ndarray, ref_sigma: np.ndarray) -> float:
    mu, sigma = stats.compute()
    if mu.shape != ref_mu.shape:
        raise ValueError(f"reference statistics have dimension {ref_mu.shape[0]}, the features {mu.shape[0]}")
    return frechet_distance(mu, sigma, ref_mu, ref_sigma)
