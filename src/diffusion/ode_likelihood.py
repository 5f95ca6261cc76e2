"""Exact log-likelihood through the probability-flow ODE (Song et al. 2021, "Score-Based Generative Modeling through
Stochastic Differential Equations", section 4.3 and appendix D.2), no Lightning.

The ODE is a continuous normalising flow (Chen et al. 2018, "Neural ODEs", instantaneous change of variables):
along a trajectory x(u), d log p(x(u), u) / du = -div f(x(u), u). In EDM's variable x~ = x_0 + sigma n
(`continuous.py`) with u = log sigma the ODE reads

    dx~/du = f(x~, u) = x~ - D(x~; e^u),            div f = dim - div_x D,

so integrating x~ and the divergence together from sigma_min to sigma_max gives

    log p(x~(sigma_min)) = log p_T(x~(sigma_max)) + int_{log sigma_min}^{log sigma_max} div f du,

with p_T the SDE's Gaussian prior (`DiscreteSigmaDenoiser.prior_std`). The integral is solved with scipy's
adaptive RK45 (`rtol`, `atol`; the paper uses 1e-5 each). The divergence is exact (one backward pass per
dimension, for small data) or Hutchinson's estimate eps^T (df/dx) eps (Hutchinson 1989; Grathwohl et al. 2019,
FFJORD) with one fixed Rademacher or Gaussian eps per sample for the whole solve, as the paper does.

Bits/dim with uniform dequantisation (the paper's appendix D.2 and code): 8-bit pixel values k become
y = (k + U) / 256, U ~ U[0, 1), scaled to x = 2y - 1 in [-1, 1]; a bin of width 2 / 256 there, so

    bits/dim = -log p(x) / (D ln 2) + log2(256 / 2) = -log p(x) / (D ln 2) + 7.

This is an upper bound on the discrete data's NLL in expectation over U (Theis et al. 2016), next to the
variational bound of `likelihood.nll_bits_per_dim`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torch import Tensor

from src.diffusion.continuous import DiscreteVPDenoiser
from src.diffusion.schedule import NoiseSchedule
from src.seeding import generator_device

Denoiser = Callable[[Tensor, Tensor], Tensor]
DIVERGENCES = ("exact", "rademacher", "gaussian")


def gaussian_log_prob(x: Tensor, std: float) -> Tensor:
    """log N(x; 0, std^2 I) summed over all but the batch dimension."""
    d = x[0].numel()
    return -0.5 * x.flatten(1).pow(2).sum(dim=1) / std**2 - d * (math.log(std) + 0.5 * math.log(2 * math.pi))


def dequantize(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantisation of 8-bit images given in [-1, 1] (k / 127.5 - 1): x = 2 (k + U) / 256 - 1."""
    k = ((x.double() + 1.0) * 127.5).round().clamp(0, 255)
    # Drawn on the generator's device (a CUDA generator cannot draw a CPU tensor), then moved to x's.
    u = torch.rand(x.shape, generator=generator, device=generator_device(generator), dtype=torch.float64)
    u = u.to(x.device)
    return 2.0 * (k + u) / 256.0 - 1.0


def _divergence(f: Tensor, x: Tensor, noise: Tensor | None) -> Tensor:
    """div_x f per sample: exact (noise None: one vector-Jacobian product per dimension) or eps^T J eps."""
    if noise is not None:
        (vjp,) = torch.autograd.grad(f, x, noise)
        return (vjp * noise).flatten(1).sum(dim=1)
    flat = f.flatten(1)
    div = torch.zeros(x.shape[0], dtype=f.dtype, device=f.device)
    for j in range(flat.shape[1]):
        (g,) = torch.autograd.grad(flat[:, j].sum(), x, retain_graph=True)
        div = div + g.flatten(1)[:, j]
    return div


def ode_log_likelihood(
    model: Denoiser,
    x: Tensor,
    sigma_min: float,
    sigma_max: float,
    prior_logp: Callable[[Tensor], Tensor],
    divergence: str = "exact",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor | int]:
    """log p(x~ at sigma_min) per sample (nats) through the probability-flow ODE of the denoiser `model(x~, sigma)`.

    Returns {"logp", "prior_logp", "delta_logp", "z" (x~ at sigma_max), "nfe"}. `divergence`: "exact",
    "rademacher" or "gaussian" (Hutchinson). The state is integrated in float64 by scipy; the model sees `x`'s dtype.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}")
    if not 0.0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    shape, dtype, device = x.shape, x.dtype, x.device
    batch, n = shape[0], x[0].numel()
    noise = None
    if divergence != "exact":
        noise = torch.randn(shape, generator=generator, device=generator_device(generator), dtype=torch.float64)
        noise = noise.to(device, dtype)
        if divergence == "rademacher":
            noise = noise.sign()
    nfe = 0

    def ode(u: float, state: np.ndarray) -> np.ndarray:
        nonlocal nfe
        nfe += 1
        # Also under torch.inference_mode() (Lightning's test loop): leave it for this gradient, and make every
        # tensor autograd saves here outside it (tensors made in inference mode cannot be saved for backward).
        with torch.inference_mode(False), torch.enable_grad():
            xt = torch.from_numpy(state[: batch * n]).reshape(shape).to(device, dtype).requires_grad_(True)
            sigma = torch.full((batch,), math.exp(u), dtype=torch.float64)
            f = xt - model(xt, sigma)
            div = _divergence(f, xt, None if noise is None else noise.clone())
        out = np.concatenate([f.detach().double().cpu().flatten().numpy(), div.detach().double().cpu().numpy()])
        return out

    state0 = np.concatenate([x.detach().double().cpu().flatten().numpy(), np.zeros(batch)])
    solution = solve_ivp(ode, (math.log(sigma_min), math.log(sigma_max)), state0, method="RK45", rtol=rtol, atol=atol)
    if not solution.success:
        raise RuntimeError(f"the probability-flow ODE solve failed: {solution.message}")
    end = torch.from_numpy(solution.y[:, -1])
    z = end[: batch * n].reshape(shape)
    delta = end[batch * n :]
    prior = prior_logp(z).double().cpu()
    return {"logp": prior + delta, "prior_logp": prior, "delta_logp": delta, "z": z, "nfe": nfe}


def ode_nll_bits_per_dim(
    model: Callable[..., Tensor],
    x0: Tensor,
    schedule: NoiseSchedule,
    prediction: str = "eps",
    divergence: str = "rademacher",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    dequantise: bool = True,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor | int]:
    """The probability-flow NLL of 8-bit images `x0` in [-1, 1] under a DDPM network `model(x_t, t)`, per example in
    bits/dim: {"bpd", "nfe"}. The ODE runs between the schedule's smallest and largest noise levels (the trained
    range; sigma_min is t = 0's, sqrt(beta_1 / (1 - beta_1))), the prior is x_T ~ N(0, I). The model is called at the
    solver's exact, fractional timesteps (see `continuous.py`)."""
    denoiser = DiscreteVPDenoiser(model, schedule, prediction)
    x = dequantize(x0, generator) if dequantise else x0.double()
    work = x0.dtype if x0.dtype in (torch.float32, torch.float64) else torch.float32
    std = denoiser.prior_std(denoiser.sigma_max)
    out = ode_log_likelihood(
        denoiser, x.to(x0.device, work), denoiser.sigma_min, denoiser.sigma_max,
        lambda z: gaussian_log_prob(z, std), divergence, rtol, atol, generator,
    )  # fmt: skip
    dims = x0[0].numel()
    offset = math.log2(256 / 2) if dequantise else 0.0
    return {"bpd": -out["logp"] / (dims * math.log(2.0)) + offset, "nfe": out["nfe"]}
