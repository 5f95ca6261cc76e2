"""Variational diffusion models (Kingma, Salimans, Poole & Ho 2021, "Variational Diffusion Models"; VDM).

VDM writes the process through gamma(s) = -log SNR(s), s in [0, 1] (s = 0 the least noisy), with
alpha^2 = sigmoid(-gamma) and sigma^2 = sigmoid(gamma) (eq. 3), and bounds -log p(x) by three terms (eq. 11):

    prior      KL(q(z_1 | x) || N(0, I))                                                      (the latent loss)
    recon      -E log p(x | z_0), p(x | z_0) a categorical over the 256 pixel values per dimension (eq. 24)
    diffusion  continuous time (eq. 17):  1/2 E_{s ~ U(0, 1), eps} [gamma'(s) ||eps - eps_hat(z_s; s)||^2]
               T steps (eq. 13, 38):      T/2 E_{i ~ U{1..T}, eps} [(exp(gamma(s_i) - gamma(s_{i-1})) - 1)
                                                                    ||eps - eps_hat(z_{s_i}; s_i)||^2],  s_i = i / T

Only the endpoints gamma(0), gamma(1) change the continuous diffusion term (the invariance result, section 5.1:
it is 1/2 integral of E||x - x_hat||^2 over SNR from SNR(1) to SNR(0)); the shape between them changes only the
Monte-Carlo variance of its estimate. The learned schedules here are the paper's two: `LinearLogSNR`
(gamma(s) = b + |w| s, their `learnable_scalar`) and `MonotoneLogSNR` (a monotone network with positive weights,
their `learnable_nnet`), both `DiffusionProcess`es, so training optimizes them with the network, checkpoints and
exports save them, and the registry's samplers run on their discretized schedule.

Time: the process's t is the network's, in [0, T - 1] (`src.diffusion.process`), and s = t / (T - 1). With
T - 1 steps the discrete form is the DDPM grid itself (t = 1, ..., T - 1, the decoder at t = 0), and its terms equal
DDPM's KL terms with the posterior variance (the SNR-difference form, tests/test_vdm.py). Where we differ from the
reference code (google-research/vdm, `model_vdm.py`): the network is conditioned on t, as every network here, not
on gamma(t) rescaled by the initial endpoints (with a learned schedule these differ by a slowly moving monotone
map); pixels are scaled to 2k/255 - 1 as the rest of the template (the reference uses 2(k + 0.5)/256 - 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.diffusion.losses import unit_times
from src.diffusion.parameterization import eps_from_output
from src.diffusion.process import DiffusionProcess
from src.diffusion.schedule import alpha_sigma_from_log_snr

Denoiser = Callable[..., Tensor]


# --------------------------------------------------------------------------------------------- learned schedules
class LinearLogSNR(DiffusionProcess):
    """VDM's linear schedule gamma(s) = gamma_min + (gamma_max - gamma_min) s, with both ends learned (`learned`):
    the reference's `NoiseSchedule_Scalar`, gamma(s) = b + |w| s (|w| keeps it increasing). -13.3 and 5.0 are the
    paper's CIFAR-10 initial ends (SNR(0) = e^13.3, alpha^2(1) = sigmoid(-5) = 0.0067).

    Args:
        timesteps: T, the network's time units: t in [0, T - 1], s = t / (T - 1).
        gamma_min: the initial gamma(0) = -log SNR at t = 0.
        gamma_max: the initial gamma(1) = -log SNR at t = T - 1.
        learned: train the ends (parameters); False: a fixed linear gamma (buffers, VDM's `fixed`).
    """

    def __init__(
        self, timesteps: int = 1000, gamma_min: float = -13.3, gamma_max: float = 5.0, learned: bool = True
    ) -> None:
        super().__init__(timesteps)
        if not gamma_max > gamma_min:
            raise ValueError(f"gamma_max ({gamma_max}) must exceed gamma_min ({gamma_min}): -log SNR increases in t")
        self.config = dict(timesteps=timesteps, gamma_min=gamma_min, gamma_max=gamma_max, learned=learned)
        bias, scale = torch.tensor([float(gamma_min)]), torch.tensor([float(gamma_max - gamma_min)])
        if learned:
            self.bias, self.scale = nn.Parameter(bias), nn.Parameter(scale)
        else:
            self.register_buffer("bias", bias)
            self.register_buffer("scale", scale)

    def gamma(self, s: Tensor) -> Tensor:
        """gamma(s) = -log SNR at s in [0, 1]."""
        return self.bias + self.scale.abs() * s

    def log_snr(self, t: Tensor) -> Tensor:
        return -self.gamma(t.to(self.bias.dtype) / (self.num_timesteps - 1))


class _PositiveLinear(nn.Linear):
    """A linear layer with |weights|: increasing in every input (the reference's `DenseMonotone`)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.abs(), self.bias)


class MonotoneLogSNR(DiffusionProcess):
    """VDM's monotone-network schedule (the reference's `NoiseSchedule_NNet`): with u = s,

        gamma(s) = l1(u) + l3(2 (sigmoid(l2(2 u - 1)) - 1/2)) / n_features,

    l1 (1 -> 1), l2 (1 -> n_features), l3 (n_features -> 1, no bias) linear with positive weights, so gamma
    increases in s. l1 starts as the linear schedule from gamma_min to gamma_max; l2 and l3 start N(0, 0.01^2).
    """

    def __init__(
        self, timesteps: int = 1000, gamma_min: float = -13.3, gamma_max: float = 5.0, n_features: int = 1024
    ) -> None:
        super().__init__(timesteps)
        if not gamma_max > gamma_min:
            raise ValueError(f"gamma_max ({gamma_max}) must exceed gamma_min ({gamma_min}): -log SNR increases in t")
        self.config = dict(timesteps=timesteps, gamma_min=gamma_min, gamma_max=gamma_max, n_features=n_features)
        self.n_features = n_features
        self.l1 = _PositiveLinear(1, 1)
        self.l2 = _PositiveLinear(1, n_features)
        self.l3 = _PositiveLinear(n_features, 1, bias=False)
        with torch.no_grad():
            self.l1.weight.fill_(gamma_max - gamma_min)
            self.l1.bias.fill_(gamma_min)
            nn.init.normal_(self.l2.weight, std=0.01)
            nn.init.zeros_(self.l2.bias)
            nn.init.normal_(self.l3.weight, std=0.01)

    def gamma(self, s: Tensor) -> Tensor:
        # In the parameters' precision even under bf16 autocast (which would run these linear layers in bf16, and
        # gamma' from them): the schedule is a few thousand multiply-adds.
        with torch.autocast(s.device.type, enabled=False):
            u = s.reshape(-1, 1).to(self.l1.weight.dtype)
            h = 2.0 * (torch.sigmoid(self.l2(2.0 * (u - 0.5))) - 0.5)
            return (self.l1(u) + self.l3(h) / self.n_features).reshape(s.shape)

    def log_snr(self, t: Tensor) -> Tensor:
        return -self.gamma(t.to(self.l1.weight.dtype) / (self.num_timesteps - 1))


# --------------------------------------------------------------------------------------------- the three terms
def prior_kl(x0: Tensor, gamma_1: Tensor) -> Tensor:
    """KL(q(z_1 | x) || N(0, I)) per example (B,), nats: 1/2 sum(alpha_1^2 x^2 + sigma_1^2 - log sigma_1^2 - 1), with
    sigma_1^2 = sigmoid(gamma(1)) (the reference's `loss_klz`)."""
    var_1 = torch.sigmoid(gamma_1)
    terms = (1.0 - var_1) * x0.square() + var_1 - torch.log(var_1) - 1.0
    return 0.5 * terms.flatten(1).sum(dim=1)


def pixel_levels(levels: int = 256, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
    """The values an 8-bit pixel takes in the template's scaling: 2k / (levels - 1) - 1, k = 0..levels - 1."""
    return torch.linspace(-1.0, 1.0, levels, device=device, dtype=dtype)


def categorical_log_probs(z0_rescaled: Tensor, gamma_0: Tensor, levels: int = 256) -> Tensor:
    """log p(x = v_k | z_0) for every pixel and level, shape (*z0.shape, levels): VDM's factorised decoder (eq. 24 and
    the reference's `EncDec.decode`), logits -1/2 ((z_0 / alpha_0 - v_k) / (sigma_0 / alpha_0))^2 normalised over the
    levels v_k, with sigma_0 / alpha_0 = exp(gamma(0) / 2). `z0_rescaled` = z_0 / alpha_0 = x + exp(gamma_0 / 2) eps."""
    values = pixel_levels(levels, z0_rescaled.device, z0_rescaled.dtype)
    inv_std = torch.exp(-0.5 * gamma_0)
    logits = -0.5 * ((z0_rescaled.unsqueeze(-1) - values) * inv_std).square()
    return torch.log_softmax(logits, dim=-1)


def pixel_indices(x0: Tensor, levels: int = 256) -> Tensor:
    """The level index k of each pixel x = 2k / (levels - 1) - 1 (rounded), int64."""
    return ((x0 + 1.0) * (0.5 * (levels - 1))).round().clamp(0, levels - 1).long()


def reconstruction_nll(x0: Tensor, eps_0: Tensor, gamma_0: Tensor, levels: int = 256) -> Tensor:
    """-log p(x | z_0) per example (B,), nats, with z_0 / alpha_0 = x + exp(gamma(0) / 2) eps_0 (the reference's
    `loss_recon`). `x0` holds 8-bit data scaled to [-1, 1].

    The normaliser sums the levels within 13 standard deviations of z_0's nearest level only, not all 256: a level
    further away has a weight below e^-84 of the nearest one's, so the result is `categorical_log_probs`'s to float64
    precision (tested), at a few levels per pixel instead of 256 (this term was 40% of a training step's time at
    gamma(0) = -13.3 on the 2-core CPU we measured). The full sum is taken when the window would cover every level."""
    scale = torch.exp(0.5 * gamma_0)  # sigma_0 / alpha_0
    z = x0 + scale * eps_0
    spacing = 2.0 / (levels - 1)
    half_width = math.ceil(13.0 * float(scale.detach().max()) / spacing) + 1
    if 2 * half_width + 1 >= levels:
        log_probs = categorical_log_probs(z, gamma_0, levels)
        picked = log_probs.gather(-1, pixel_indices(x0, levels).unsqueeze(-1)).squeeze(-1)
        return -picked.flatten(1).sum(dim=1)
    nearest = pixel_indices(z.detach(), levels)
    window = nearest.unsqueeze(-1) + torch.arange(-half_width, half_width + 1, device=z.device)
    inside = (window >= 0) & (window < levels)
    values = window.clamp(0, levels - 1).to(z.dtype) * spacing - 1.0
    logits = -0.5 * ((z.unsqueeze(-1) - values) / scale).square()
    log_norm = torch.logsumexp(logits.masked_fill(~inside, -math.inf), dim=-1)
    own = -0.5 * ((z - (pixel_indices(x0, levels).to(z.dtype) * spacing - 1.0)) / scale).square()
    return -(own - log_norm).flatten(1).sum(dim=1)


def diffusion_weight(process: DiffusionProcess, t: Tensor, steps: int = 0) -> Tensor:
    """The weight w of ||eps - eps_hat||^2 in the diffusion term at process times t (B,), float, differentiable in the
    process's parameters: continuous time (`steps` 0) w = gamma'(s) / 2 with s = t / (T - 1), gamma' by autograd (any
    process; the reference's jvp); `steps` N > 0: w = N/2 (exp(gamma(s) - gamma(s - 1/N)) - 1)."""
    T = process.num_timesteps
    if steps == 0:
        # Also in evaluation (Lightning tests under inference mode): gamma' is a derivative in t.
        with torch.inference_mode(False), torch.enable_grad():
            t_grad = t.detach().clone().requires_grad_(True)
            gamma = -process.log_snr(t_grad)
            (slope,) = torch.autograd.grad(gamma.sum(), t_grad, create_graph=torch.is_grad_enabled())
        return 0.5 * (T - 1) * slope  # d gamma / ds = (T - 1) d gamma / dt
    gamma_t = -process.log_snr(t)
    gamma_prev = -process.log_snr(t - (T - 1) / steps)
    return 0.5 * steps * torch.expm1(gamma_t - gamma_prev)


def vdm_times(u: Tensor, num_timesteps: int, steps: int = 0) -> Tensor:
    """Process times t = s (T - 1) of unit times u in [0, 1): s = u (continuous) or s = ceil(u N) / N, N = `steps`
    (the reference's discretisation), at least 1/N."""
    if steps == 0:
        return u * (num_timesteps - 1)
    s = torch.ceil(u * steps).clamp(min=1) / steps
    return s * (num_timesteps - 1)


def process_ends(process: DiffusionProcess, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """(gamma(0), gamma(1)) = -log SNR at t = 0 and t = T - 1, differentiable in the process's parameters."""
    ends = torch.tensor([0.0, process.num_timesteps - 1.0], device=device)
    gamma_0, gamma_1 = (-process.log_snr(ends)).unbind()
    return gamma_0, gamma_1


def diffusion_term(
    model: Denoiser,
    x0: Tensor,
    process: DiffusionProcess,
    t: Tensor,
    noise: Tensor,
    prediction: str = "eps",
    steps: int = 0,
    **model_kwargs: object,
) -> Tensor:
    """The diffusion term's estimate w(t) ||eps - eps_hat(z_t; t)||^2 per example (B,), nats, at process times t
    (continuous, `vdm_times`) with noise `noise`: z_t = alpha(t) x + sigma(t) eps, the network's output read in its
    `prediction` parameterisation (eps_hat from x0 or v exactly, `parameterization.eps_from_output`), w from
    `diffusion_weight`. Float32 (float64 for float64 data); differentiable in the network and the process."""
    work = torch.float64 if x0.dtype == torch.float64 else torch.float32
    x, noise = x0.to(work), noise.to(work)
    alpha, sigma = alpha_sigma_from_log_snr(process.log_snr(t).to(work), x.ndim)  # in `work`, not the process's dtype
    z_t = alpha * x + sigma * noise
    out = model(z_t.to(x0.dtype), t, **model_kwargs)[:, : x.shape[1]].to(work)
    mse = (noise - eps_from_output(prediction, out, z_t, alpha, sigma)).square().flatten(1).sum(dim=1)
    return diffusion_weight(process, t, steps).to(work) * mse


def vdm_terms(
    model: Denoiser,
    x0: Tensor,
    process: DiffusionProcess,
    t: Tensor,
    noise: Tensor,
    noise_0: Tensor,
    prediction: str = "eps",
    steps: int = 0,
    levels: int = 256,
    **model_kwargs: object,
) -> dict[str, Tensor]:
    """The three terms of VDM's bound per example (B,), in nats: {"diffusion", "prior", "recon"}, the diffusion term
    at process times t with noise `noise` (`diffusion_term`), the decoder with noise `noise_0`."""
    work = torch.float64 if x0.dtype == torch.float64 else torch.float32
    gamma_0, gamma_1 = (g.to(work) for g in process_ends(process, t.device))
    return {
        "diffusion": diffusion_term(model, x0, process, t, noise, prediction, steps, **model_kwargs),
        "prior": prior_kl(x0.to(work), gamma_1),
        "recon": reconstruction_nll(x0.to(work), noise_0.to(work), gamma_0, levels),
    }


def bits_per_dim(nats: Tensor, x0: Tensor) -> Tensor:
    """Per-example nats -> bits per dimension of x0's examples."""
    return nats / (x0[0].numel() * math.log(2.0))


def vdm_loss(
    model: Denoiser,
    x0: Tensor,
    process: DiffusionProcess,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    prediction: str = "eps",
    steps: int = 0,
    **model_kwargs: object,
) -> dict[str, Tensor]:
    """VDM's bound as the training loss, per example, in bits/dim: {"loss", "diffusion_bpd", "prior_bpd",
    "recon_bpd"} of shape (B,). `t` (process times, float) uniform when not given
    (`vdm_times`); `steps` 0: continuous time, N: the N-step bound. Gradients reach the network and, through all
    three terms, the schedule's parameters (its ends through the prior and the decoder, gamma' through the diffusion
    term), as the reference trains them."""
    if t is None:
        t = vdm_times(unit_times(x0.shape[0], device=x0.device), process.num_timesteps, steps)
    if noise is None:
        noise = torch.randn_like(x0)
    terms = vdm_terms(model, x0, process, t, noise, torch.randn_like(x0), prediction, steps, **model_kwargs)
    bpd = {f"{name}_bpd": bits_per_dim(value, x0) for name, value in terms.items()}
    return {"loss": sum(bpd.values()), **{name: value.detach() for name, value in bpd.items()}}


@torch.no_grad()
def vdm_bits_per_dim(
    model: Denoiser,
    x0: Tensor,
    process: DiffusionProcess,
    num_times: int | None = None,
    prediction: str = "eps",
    steps: int = 0,
    generator: torch.Generator | None = None,
    **model_kwargs: object,
) -> dict[str, Tensor]:
    """VDM's bound per example in bits/dim, {"bpd", "prior_bpd", "recon_bpd", "diffusion_bpd"}, for evaluation: the
    prior exactly, the decoder with one noise draw, the diffusion term averaged over `num_times` stratified times per
    example (`steps` N: the N-step bound, summed exactly over its N terms when `num_times` is None or >= N;
    continuous: None means T - 1 times). Noise from `generator` (fixed per batch: reproducible)."""
    T = process.num_timesteps
    batch = x0.shape[0]
    draw_device = generator.device if generator is not None else x0.device

    def rand(*shape: int, dtype: torch.dtype = torch.float64) -> Tensor:
        return torch.rand(shape, generator=generator, device=draw_device, dtype=dtype).to(x0.device)

    def randn() -> Tensor:
        return torch.randn(x0.shape, generator=generator, device=draw_device, dtype=x0.dtype).to(x0.device)

    exact = steps > 0 and (num_times is None or num_times >= steps)
    count = steps if exact else (num_times or (T - 1))
    diffusion = torch.zeros(batch, device=x0.device, dtype=torch.float64)
    for k in range(count):
        # u in the k-th of `count` strata (exact: the midpoint of step k + 1, so ceil(u N) = k + 1).
        offset = torch.full((batch,), 0.5, device=x0.device, dtype=torch.float64) if exact else rand(batch)
        t = vdm_times(((k + offset) / count).clamp(max=1.0 - 1e-12), T, steps)
        diffusion += diffusion_term(model, x0, process, t, randn(), prediction, steps, **model_kwargs).double()
    diffusion = diffusion / count  # the N-step bound's N terms each carry N / 2: their mean is the sum of halves
    work = torch.float64 if x0.dtype == torch.float64 else torch.float32
    gamma_0, gamma_1 = (g.to(work) for g in process_ends(process, x0.device))
    prior = prior_kl(x0.to(work), gamma_1).double()
    recon = reconstruction_nll(x0.to(work), randn().to(work), gamma_0).double()
    terms = {"prior_bpd": prior, "recon_bpd": recon, "diffusion_bpd": diffusion}
    return {"bpd": bits_per_dim(prior + recon + diffusion, x0)} | {k: bits_per_dim(v, x0) for k, v in terms.items()}
