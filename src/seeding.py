"""Seeds derived from several integers, for random streams that depend only on what identifies them."""

from __future__ import annotations

import torch

_MASK64 = 0xFFFFFFFFFFFFFFFF


def mix_seeds(*values: int) -> int:
    """A 63-bit seed from several integers (splitmix64 steps), so that nearby inputs give unrelated seeds and
    different tuples do not collide the way affine formulas do (`seed * 1_000_003 + i` gives seed 1, i = 0 the
    stream of seed 0, i = 1_000_003)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
    return h >> 1


def sample_generators(seed: int, indices: torch.Tensor | list[int]) -> list[torch.Generator]:
    """One CPU generator per sample index, seeded by (seed, index) alone: everything random about sample i (its
    x_T, then every noise a stochastic sampler adds) comes from its own stream, so it does not depend on the
    batch it is in, the batch size or the number of processes."""
    values = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
    return [torch.Generator().manual_seed(mix_seeds(seed, int(i))) for i in values]
