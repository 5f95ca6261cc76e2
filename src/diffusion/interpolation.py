"""Interpolation between latents x_T (DDIM paper, section 5.3).

With deterministic DDIM (eta = 0) the image is a function of x_T, so walking between two latents and decoding
each point shows how the model's "semantic" content varies. The latents are draws from N(0, I) in high dimension,
where almost all mass lies near the sphere of radius sqrt(d): a straight line between two of them passes through
vectors of norm ~ sqrt(d / 2) that the model never saw, so the paper uses spherical linear interpolation (Shoemake
1985), which keeps the norm when the endpoints have equal norms.
"""

from __future__ import annotations

import torch
from torch import Tensor


def slerp(x0: Tensor, x1: Tensor, alpha: float | Tensor, dot_threshold: float = 0.9995) -> Tensor:
    """Spherical linear interpolation between two tensors of the same shape, each taken as one vector:

        slerp(x0, x1, a) = sin((1 - a) theta) / sin(theta) x0 + sin(a theta) / sin(theta) x1,
        theta = arccos(<x0, x1> / (|x0| |x1|))

    (the DDIM reference code's `slerp`). `alpha` is a float, giving a tensor shaped like `x0`, or a 1-D tensor of
    N weights, giving N interpolants stacked on a new first axis. `alpha = 0` returns x0 and `alpha = 1` x1 exactly.
    When the vectors are (anti)parallel, |cos theta| > `dot_threshold`, sin(theta) vanishes and the formula loses
    all precision; it falls back to the linear interpolation (1 - a) x0 + a x1, to which it tends there.
    Coefficients are computed in float64 and applied in x0's dtype.
    """
    if x0.shape != x1.shape:
        raise ValueError(f"slerp needs two tensors of the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
    a = torch.as_tensor(alpha, dtype=torch.float64)
    if a.ndim > 1:
        raise ValueError(f"alpha must be a float or a 1-D tensor, got shape {tuple(a.shape)}")
    v0, v1 = x0.double().flatten(), x1.double().flatten()
    cos = (v0 @ v1) / (v0.norm() * v1.norm()).clamp_min(torch.finfo(torch.float64).tiny)
    if cos.abs() > dot_threshold:
        c0, c1 = 1.0 - a, a
    else:
        theta = torch.arccos(cos.clamp(-1.0, 1.0))
        c0, c1 = torch.sin((1.0 - a) * theta) / torch.sin(theta), torch.sin(a * theta) / torch.sin(theta)
    shape = (-1,) + (1,) * x0.ndim if a.ndim == 1 else x0.shape[:0]
    out = c0.reshape(shape) * x0.double() + c1.reshape(shape) * x1.double()
    return out.to(x0.dtype)


def lerp(x0: Tensor, x1: Tensor, alpha: float | Tensor) -> Tensor:
    """(1 - a) x0 + a x1 with the same `alpha` conventions as `slerp` (for comparison grids)."""
    a = torch.as_tensor(alpha, dtype=torch.float64)
    shape = (-1,) + (1,) * x0.ndim if a.ndim == 1 else x0.shape[:0]
    return ((1.0 - a).reshape(shape) * x0.double() + a.reshape(shape) * x1.double()).to(x0.dtype)
