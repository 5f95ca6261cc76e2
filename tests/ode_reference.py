"""Closed-form denoisers and a high-accuracy probability-flow ODE solution, shared by the continuous-sampler tests and
benchmarks/ode_solver_error.py.

In the variable x~ = x_0 + sigma n (Karras et al. 2022), the exact denoiser D(x~; sigma) = E[x_0 | x~] is closed form
for Gaussian data and for a mixture of isotropic Gaussians:

    x_0 ~ N(mu, diag(s^2)):  D = mu + s^2 / (s^2 + sigma^2) (x~ - mu)
    x_0 ~ sum_k w_k N(m_k, s_k^2 I):  D = sum_k p(k | x~) (m_k + s_k^2 / (s_k^2 + sigma^2) (x~ - m_k)),
        p(k | x~) proportional to w_k N(x~; m_k, (s_k^2 + sigma^2) I).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.integrate import solve_ivp

SHAPE = (2, 4, 4)  # image-shaped: channels, height, width
DTYPE = torch.float64


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


class GaussianDenoiser:
    """D(x~; sigma) for x_0 ~ N(mu, diag(s^2)), mu and s of the image's shape."""

    def __init__(self, mu: torch.Tensor, s: torch.Tensor) -> None:
        self.mu, self.s = mu.to(DTYPE), s.to(DTYPE)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = _bcast(torch.as_tensor(sigma, dtype=DTYPE).expand(x.shape[0]), x)
        s2 = self.s.to(x.dtype) ** 2
        return self.mu.to(x.dtype) + s2 / (s2 + sigma**2) * (x - self.mu.to(x.dtype))

    def exact_flow(self, x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
        """The probability-flow ODE map: per dimension the increasing affine map between N(mu, s^2 + sigma^2)'s."""
        s2 = self.s**2
        return self.mu + ((s2 + sigma_to**2) / (s2 + sigma_from**2)).sqrt() * (x - self.mu)

    def log_prob(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """log N(x; mu, diag(s^2 + sigma^2)) summed per sample: the marginal density at noise level sigma."""
        var = self.s**2 + sigma**2
        return (-0.5 * (x - self.mu) ** 2 / var - 0.5 * torch.log(2 * math.pi * var)).flatten(1).sum(dim=1)


class MixtureDenoiser:
    """D(x~; sigma) for x_0 ~ sum_k w_k N(m_k, s_k^2 I), means m_k of the image's shape."""

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, stds: torch.Tensor) -> None:
        self.log_w = weights.to(DTYPE).log()
        self.means, self.stds = means.to(DTYPE), stds.to(DTYPE)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=DTYPE).expand(x.shape[0]).to(x.dtype)
        var = self.stds.to(x.dtype)[None, :] ** 2 + sigma[:, None] ** 2  # (B, K)
        diff = x[:, None] - self.means.to(x.dtype)[None]  # (B, K, ...)
        d = x[0].numel()
        logits = self.log_w.to(x.dtype) - 0.5 * diff.flatten(2).pow(2).sum(-1) / var - 0.5 * d * var.log()
        resp = logits.softmax(dim=1)  # p(k | x~)
        shrink = (self.stds.to(x.dtype)[None, :] ** 2 / var).reshape(*var.shape, *([1] * (x.ndim - 1)))
        post = self.means.to(x.dtype)[None] + shrink * diff
        return (resp.reshape(*resp.shape, *([1] * (x.ndim - 1))) * post).sum(dim=1)


def gaussian_problem() -> GaussianDenoiser:
    g = torch.Generator().manual_seed(1)
    mu = 0.5 * torch.randn(SHAPE, generator=g, dtype=DTYPE)
    s = 0.05 + 0.45 * torch.rand(SHAPE, generator=g, dtype=DTYPE)  # 0.05 to 0.5: stiff near sigma_min
    return GaussianDenoiser(mu, s)


def mixture_problem() -> MixtureDenoiser:
    g = torch.Generator().manual_seed(2)
    means = torch.randn((3, *SHAPE), generator=g, dtype=DTYPE).clamp(-1.5, 1.5) * 0.6
    return MixtureDenoiser(torch.tensor([0.5, 0.3, 0.2]), means, torch.tensor([0.1, 0.2, 0.3]))


def reference_solution(model, x: torch.Tensor, sigma_max: float, sigma_min: float, rtol: float = 1e-10):
    """x_0 from x~ at sigma_max: the probability-flow ODE dx~/du = x~ - D(x~; e^u), u = log sigma, solved by scipy's
    RK45 to rtol = atol = `rtol` in float64 down to sigma_min, then the solvers' final jump x_0 = D(x~; sigma_min)."""
    shape = x.shape

    def f(u: float, y: np.ndarray) -> np.ndarray:
        xt = torch.from_numpy(y).reshape(shape)
        return (xt - model(xt, torch.full((shape[0],), math.exp(u), dtype=DTYPE))).flatten().numpy()

    sol = solve_ivp(f, (math.log(sigma_max), math.log(sigma_min)), x.double().flatten().numpy(), method="RK45",
                    rtol=rtol, atol=rtol)  # fmt: skip
    assert sol.success, sol.message
    x_min = torch.from_numpy(sol.y[:, -1]).reshape(shape)
    return model(x_min, torch.full((shape[0],), sigma_min, dtype=DTYPE))
