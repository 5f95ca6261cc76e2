"""Exact resume: what Lightning's checkpoints leave out, so a killed run continues as if it had never stopped.

Lightning saves the model, optimizer, LR schedulers and loop counters, but neither the global RNG states nor
the position inside an epoch of a plain DataLoader. This file supplies both:

- `collect_rng_states` / `restore_rng_states`: torch, CUDA, numpy and python RNG states, as plain tensors and
  lists (so checkpoints still load with `torch.load(weights_only=True)`), gathered from every rank; the callback
  `src.callbacks.rng_state.RNGStateCallback` puts them in checkpoints and restores them.
- `ResumableSampler` and `ResumableDataLoader`: a seeded, epoch-dependent shuffle (per rank) whose
  `state_dict` records how many batches of the epoch were consumed; Lightning's fit loop saves and restores it
  (any train DataLoader with `state_dict`/`load_state_dict` is picked up as `_Stateful`), and the restored
  loader skips the batches already trained on. Random flips are drawn in the main process from a generator
  seeded by (seed, epoch, rank, batch index), so they do not depend on worker processes or their RNG state.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from src.seeding import mix_seeds

# The top-level checkpoint key under which checkpoints written before RNGStateCallback hold the RNG states (a list
# with one entry per rank); still read on resume.
RNG_STATES_KEY = "rng_states"


# ----------------------------------------------------------------------------------------------------------
# RNG states
# ----------------------------------------------------------------------------------------------------------


def collect_rng_states() -> dict[str, Any]:
    """This process's torch, CUDA (current device), numpy and python RNG states, in weights_only-safe types."""
    np_state = np.random.get_state(legacy=True)
    py_version, py_internal, py_gauss = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set this process's RNGs to states from `collect_rng_states`."""
    torch.set_rng_state(states["torch"].cpu())
    np_state = states["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"]))
    py = states["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"].cpu())


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG states, indexed by global rank (a collective call under torch.distributed).

    Lightning writes the checkpoint from rank 0 only, so each rank's states must travel there first.
    """
    states = collect_rng_states()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [states]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, states)
    return gathered


# ----------------------------------------------------------------------------------------------------------
# Data loading that can resume mid-epoch
# ----------------------------------------------------------------------------------------------------------


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class ResumableSampler(DistributedSampler):
    """A shuffling sampler whose order depends only on (seed, epoch, rank), and which can start mid-epoch.

    A `DistributedSampler` (so Lightning does not replace it under DDP and calls `set_epoch` every epoch)
    that works without a process group too. `skip_batches(n)` makes the next iteration of the epoch it was
    called for start after the first `n` batches.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, shuffle: bool = True) -> None:
        num_replicas, rank = _world()
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.batch_size = batch_size
        self._resume: tuple[int, int] | None = None  # (epoch, batches to skip), applied once

    def skip_batches(self, epoch: int, num_batches: int) -> None:
        self.epoch = epoch
        self._resume = (epoch, num_batches)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(mix_seeds(self.seed, self.epoch))
            indices = torch.randperm(len(self.dataset), generator=generator).tolist()  # type: ignore[arg-type]
        else:
            indices = list(range(len(self.dataset)))  # type: ignore[arg-type]
        indices += indices[: self.total_size - len(indices)]  # pad so every rank gets as many samples
        indices = indices[self.rank : self.total_size : self.num_replicas]
        # Skip only in the epoch the state was saved in: if Lightning moves on to the next epoch instead
        # (a checkpoint taken after the last batch), that epoch starts from its beginning.
        if self._resume is not None:
            epoch, num_batches = self._resume
            self._resume = None
            if epoch == self.epoch:
                indices = indices[num_batches * self.batch_size :]
        return iter(indices)


class ResumableDataLoader(DataLoader):
    """A training DataLoader over a `ResumableSampler` that Lightning can checkpoint and restore mid-epoch.

    It counts the batches it has handed out in the current epoch (in the main process, so worker prefetching
    does not count) and reports them in `state_dict`; `load_state_dict` makes the next epoch iteration skip
    them. With `random_flip`, each image is flipped horizontally with probability 1/2, drawn from a generator
    seeded by (seed, epoch, rank, batch index).

    Args:
        dataset: a map-style dataset; batches are `(images, labels)` (or `images` alone).
        batch_size: batch size.
        seed: shuffle and flip seed; restored from the checkpoint on resume.
        random_flip: random horizontal flips of the images.
        drop_last, num_workers, pin_memory, persistent_workers, collate_fn: as for `DataLoader`.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int = 0,
        random_flip: bool = False,
        drop_last: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        collate_fn: Any = None,
    ) -> None:
        self.seed = seed
        self.random_flip = random_flip
        self._batches_yielded = 0
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=ResumableSampler(dataset, batch_size, seed),
            drop_last=drop_last,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            collate_fn=collate_fn,
            # Its own generator: creating an iterator draws the workers' base seed from it, not from the global
            # torch RNG, whose stream a resumed run must continue exactly.
            generator=torch.Generator().manual_seed(seed),
        )

    def __iter__(self) -> Iterator[Any]:
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        resume = sampler._resume
        self._batches_yielded = resume[1] if resume is not None and resume[0] == sampler.epoch else 0
        epoch = sampler.epoch
        for batch in super().__iter__():
            if self.random_flip:
                batch = self._flip(batch, epoch, self._batches_yielded, sampler.rank)
            self._batches_yielded += 1
            yield batch

    def _flip(self, batch: Any, epoch: int, batch_index: int, rank: int) -> Any:
        images: Any = batch[0] if isinstance(batch, (tuple, list)) else batch
        generator = torch.Generator().manual_seed(mix_seeds(self.seed, epoch, rank, batch_index))
        flip = torch.rand(len(images), generator=generator) < 0.5
        if hasattr(images, "flip_horizontally"):  # a batch that is not images says how (the latent cache's)
            images = images.flip_horizontally(flip)
        else:
            flip = flip.to(images.device)
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        return (images, *batch[1:]) if isinstance(batch, (tuple, list)) else images

    def state_dict(self) -> dict[str, int]:
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        return {"seed": self.seed, "epoch": sampler.epoch, "batches_consumed": self._batches_yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        self.seed = sampler.seed = int(state["seed"])
        sampler.skip_batches(int(state["epoch"]), int(state["batches_consumed"]))
        self._batches_yielded = int(state["batches_consumed"])
