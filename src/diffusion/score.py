"""Noise-conditional score networks (Song & Ermon 2019, "Generative Modeling by Estimating Gradients of the Data
Distribution"; NCSN) on the template's process: geometric variance-exploding noise levels, denoising and sliced
score matching, and annealed Langevin dynamics.

A variance-exploding (VE) sample x~ = x + sigma eps is the variance-preserving x_t = alpha x + sigma_vp eps seen in
other units: x_t = x~ / sqrt(1 + sigma^2), alpha^2 = 1 / (1 + sigma^2), so log SNR = -2 log sigma (the EDM view,
Karras et al. 2022, eq. 4). `GeometricVE` is NCSN's geometric ladder of noise levels as such a process, so every
part of the template (training, samplers, export) takes it; the score of the perturbed data is

    s(x~, sigma) = grad log q_sigma(x~) = -eps_hat(x_t, t) / sigma          (Vincent 2011; the seeds' s = -eps / sigma)

and NCSN's denoising score matching with lambda(sigma) = sigma^2 (eq. 5-6),

    1/2 sigma^2 || s(x + sigma eps, sigma) + eps / sigma ||^2 = 1/2 || eps_hat - eps ||^2,

is L_simple of an eps-predicting network on this process (`denoising_score_matching`, tested equal): NCSN trains
with `--model.training.objective simple --model.prediction eps --model.process src.diffusion.score.GeometricVE`.
`--model.training.objective ssm` trains by sliced score matching instead (Song et al. 2019), which never sees eps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from src.diffusion.parameterization import X0Clip, eps_from_output, threshold_x0
from src.diffusion.process import DiffusionProcess
from src.diffusion.schedule import NoiseSchedule
from src.seeding import randn_like

Denoiser = Callable[..., Tensor]


class GeometricVE(DiffusionProcess):
    """NCSN's noise levels sigma(t) = sigma_min (sigma_max / sigma_min)^(t / (T - 1)), t in [0, T - 1], as a
    variance-preserving process (log SNR = -2 log sigma): geometric in t, so log SNR is linear in t and the discrete
    schedule's interpolation between grid points is exact. No parameters.

    Args:
        timesteps: T, the number of noise levels on the network's grid (annealed Langevin visits `steps` of them).
        sigma_min: the smallest level (0.01 in NCSN).
        sigma_max: the largest, about the largest distance between two training images (Song & Ermon 2020, NCSNv2,
            technique 1): 50 for Fashion-MNIST in [-1, 1] (28 x 28: at most 2 sqrt(784) = 56 apart).
    """

    def __init__(self, timesteps: int = 1000, sigma_min: float = 0.01, sigma_max: float = 50.0) -> None:
        super().__init__(timesteps)
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
        self.config = dict(timesteps=timesteps, sigma_min=sigma_min, sigma_max=sigma_max)
        self.log_sigma_min, self.log_sigma_max = math.log(sigma_min), math.log(sigma_max)
        # Not saved (no state): it only follows `.to(device)`, so that the discrete schedule lives where the net does.
        self.register_buffer("_anchor", torch.zeros(0, dtype=torch.float64), persistent=False)

    def sigma(self, t: Tensor) -> Tensor:
        """The VE noise level sigma(t), float64."""
        frac = t.to(torch.float64) / (self.num_timesteps - 1)
        return torch.exp(self.log_sigma_min + (self.log_sigma_max - self.log_sigma_min) * frac)

    def log_snr(self, t: Tensor) -> Tensor:
        return -2.0 * torch.log(self.sigma(t))


def ve_sigmas(schedule: NoiseSchedule) -> Tensor:
    """sigma_t = sqrt((1 - a_t) / a_t) of every timestep: the VE noise level of each step of any schedule."""
    return ((1.0 - schedule.alphas_cumprod) / schedule.alphas_cumprod).sqrt()


# ---------------------------------------------------------------------------------------------- objectives
def denoising_score_matching(score: Callable[[Tensor, Tensor], Tensor], x0: Tensor, sigma: Tensor, noise: Tensor):
    """NCSN's objective per example (B,): 1/2 sigma^2 ||s(x~, sigma) + eps / sigma||^2 summed over dimensions, with
    x~ = x + sigma eps and lambda(sigma) = sigma^2 (Song & Ermon 2019, eqs. 5-6), for a score function
    `score(x~, sigma)`, sigma (B,). Written in score form as the paper does; training uses L_simple, equal to it."""
    s = sigma.reshape(-1, *([1] * (x0.ndim - 1)))
    x_tilde = x0 + s * noise
    return 0.5 * (s**2 * (score(x_tilde, sigma) + noise / s) ** 2).flatten(1).sum(dim=1)


def sliced_score_matching(
    model: Denoiser,
    x0: Tensor,
    process: DiffusionProcess,
    t: Tensor,
    noise: Tensor | None = None,
    prediction: str = "eps",
    **model_kwargs: object,
) -> dict[str, Tensor]:
    """Sliced score matching (Song, Garg, Shi & Ermon 2019, "Sliced Score Matching", eq. 8 with the variance
    reduction of section 3.2: E_v[(v^T s)^2] = ||s||^2 for v ~ N(0, I)) of the perturbed data, at each example's
    noise level, weighted by lambda = sigma^2 as NCSN weights DSM, per example (B,), {"loss"}:

        sigma^2 (v^T (d s / d x_t) v + 1/2 ||s||^2) = 1/2 ||eps_hat||^2 - sigma v^T (d eps_hat / d x_t) v,

    with s = -eps_hat / sigma the model's score of q(x_t), one Gaussian v per example, the Jacobian-vector product by
    double backpropagation; averaged over dimensions and doubled, so that in expectation it is L_simple minus 1
    (Hyvarinen 2005 / Vincent 2011: the two objectives differ by a constant). The data's noise is drawn only to
    perturb x: the objective never compares with it."""
    if noise is None:
        noise = torch.randn_like(x0)
    alpha, sigma = process.alpha_sigma(t, x0)
    with torch.enable_grad():
        x_t = (alpha * x0 + sigma * noise).detach().requires_grad_(True)
        out = model(x_t, t, **model_kwargs)[:, : x0.shape[1]]
        eps_hat = eps_from_output(prediction, out.float(), x_t, alpha, sigma)
        v = torch.randn_like(x_t)
        (jvp,) = torch.autograd.grad((eps_hat * v).sum(), x_t, create_graph=True)
    terms = eps_hat.square() - 2.0 * sigma * jvp * v
    return {"loss": terms.flatten(1).mean(dim=1)}


# ---------------------------------------------------------------------------------------------- sampling
@torch.no_grad()
def annealed_langevin_sample(
    model: Denoiser,
    x_T: Tensor,
    schedule: NoiseSchedule,
    timesteps: list[int],
    langevin_steps: int = 100,
    step_lr: float = 2e-5,
    final_denoise: bool = True,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    clip_x0: X0Clip = False,
    progress: bool = False,
    callback: Callable[[dict], None] | None = None,
) -> Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) with the eps-predictor `model(x_t, t)` on the
    noise levels sigma_i of `timesteps` (ascending; visited from the largest): in VE units x~ = x_t / alpha_t,

        alpha_i = step_lr sigma_i^2 / sigma_L^2,   `langevin_steps` times:  x~ <- x~ + alpha_i / 2 s(x~, sigma_i) + sqrt(alpha_i) z,

    s = -eps(alpha_i x~, t_i) / sigma_i, sigma_L the smallest level. (Algorithm 1's step; written as
    x + eps grad log p + sqrt(2 eps) z it is eps = alpha_i / 2, with no extra sigma.) x_T ~ N(0, I) starts it as
    x~ = x_T / alpha_T. `final_denoise`: return Tweedie's x~ + sigma_L^2 s(x~, sigma_L), the posterior mean
    (Song & Ermon 2020, NCSNv2; Jolicoeur-Martineau et al. 2021), one more network call, bounded by `clip_x0`;
    else x~ itself. `langevin_steps` x len(timesteps) network calls (+ 1)."""
    if langevin_steps < 1 or not step_lr > 0:
        raise ValueError(f"need langevin_steps >= 1 and step_lr > 0, got {langevin_steps} and {step_lr}")
    sigmas = ve_sigmas(schedule)
    levels = sorted(timesteps, reverse=True)
    sigma_last = float(sigmas[levels[-1]])
    x = x_T / math.sqrt(float(schedule.alphas_cumprod[levels[0]]))
    i = 0
    for t in tqdm(levels, desc="Langevin", disable=not progress, leave=False):
        sigma = float(sigmas[t])
        alpha_t = 1.0 / math.sqrt(1.0 + sigma**2)
        step = step_lr * sigma**2 / sigma_last**2
        t_batch = torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)
        for _ in range(langevin_steps):
            score = -model(alpha_t * x, t_batch).to(x.dtype) / sigma
            if callback is not None:
                x0 = x + sigma**2 * score  # Tweedie's estimate at this level, for the callback only
            x = x + 0.5 * step * score + math.sqrt(step) * randn_like(x, generator)
            if callback is not None:
                callback({"x": x, "i": i, "t": t, "sigma": sigma, "x0": x0})
            i += 1
    if not final_denoise:
        return x
    t = levels[-1]
    alpha_t = 1.0 / math.sqrt(1.0 + sigma_last**2)
    eps = model(alpha_t * x, torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)).to(x.dtype)
    return threshold_x0(x - sigma_last * eps, clip_x0)  # x~ + sigma^2 s = x~ - sigma eps
