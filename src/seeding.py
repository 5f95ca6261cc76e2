"""Seeds derived from several integers, for random streams that depend only on what identifies them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

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


def randn_like(x: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None = None) -> Tensor:
    """Standard normal noise shaped like `x`, drawn on the generator's device so that a CPU generator gives
    the same numbers whatever device `x` is on. `generator` is one generator for the whole batch, or one per
    sample (row i from generator i), which makes each sample's noise independent of the batch it is in."""
    if generator is None:
        return torch.randn_like(x)
    if isinstance(generator, torch.Generator):
        noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
    else:
        if len(generator) != x.shape[0]:
            raise ValueError(f"need one generator per sample: {len(generator)} generators for {x.shape[0]} samples")
        noise = torch.stack([torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype) for g in generator])
    return noise.to(x.device)


def generator_device(generator: torch.Generator | None) -> torch.device | None:
    """The device to draw on with `generator` (torch draws only on the generator's own device: a CUDA generator
    with a CPU tensor raises), None for torch's global RNG (the default device)."""
    return None if generator is None else generator.device
