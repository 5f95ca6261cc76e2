"""Noise-conditional score networks (src/diffusion/score.py): the VE process, denoising and sliced score matching,
annealed Langevin dynamics, against closed forms (float64) and through the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_cli import _fit, _predict, continued_equals_uninterrupted, needs_fashion_mnist
from torch import nn

from src.diffusion.losses import l_simple
from src.diffusion.process import DiscreteProcess
from src.diffusion.samplers import sample, timestep_sequence
from src.diffusion.score import (
    GeometricVE,
    annealed_langevin_sample,
    denoising_score_matching,
    sliced_score_matching,
    ve_sigmas,
)
from src.errors import ConfigError


def test_the_geometric_ve_process_is_ncsns_ladder_as_a_vp_process() -> None:
    process = GeometricVE(timesteps=11, sigma_min=0.01, sigma_max=50.0)
    t = torch.arange(11)
    sigmas = process.sigma(t)
    torch.testing.assert_close(sigmas[[0, -1]], torch.tensor([0.01, 50.0], dtype=torch.float64), rtol=1e-12, atol=0)
    ratios = sigmas[1:] / sigmas[:-1]
    torch.testing.assert_close(ratios, ratios[:1].expand(10), rtol=1e-12, atol=0)  # geometric
    schedule = process.schedule
    torch.testing.assert_close(schedule.alphas_cumprod, 1.0 / (1.0 + sigmas**2), rtol=1e-12, atol=0)
    torch.testing.assert_close(ve_sigmas(schedule), sigmas, rtol=1e-10, atol=0)
    # log SNR is linear in t, so the discrete schedule's interpolation between grid points is the process itself.
    fractional = torch.tensor([0.25, 3.5, 9.99], dtype=torch.float64)
    torch.testing.assert_close(DiscreteProcess(schedule).log_snr(fractional), process.log_snr(fractional),
                               rtol=1e-10, atol=1e-10)  # fmt: skip
    assert not process.has_parameters() and process.state_dict() == {}


def test_denoising_score_matching_is_l_simple_of_the_eps_network() -> None:
    """NCSN's 1/2 sigma^2 ||s(x~) + eps / sigma||^2 with s = -eps_theta(x~ / sqrt(1 + sigma^2), t) / sigma equals
    D / 2 times the per-pixel L_simple of eps_theta on the process, example by example."""
    process = GeometricVE(timesteps=50, sigma_min=0.02, sigma_max=20.0)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 12, generator=g, dtype=torch.float64) / 4

    def eps_theta(x_t, t):
        return (x_t.flatten(1) @ weight).reshape(x_t.shape) * (1 + t.double().reshape(-1, 1, 1) / 50)

    x0 = torch.rand(6, 3, 4, generator=g, dtype=torch.float64) * 2 - 1
    t = torch.randint(0, 50, (6,), generator=g)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    sigma = process.sigma(t)

    def score(x_tilde, sigma):
        scale = (1 + sigma**2).rsqrt().reshape(-1, 1, 1)
        return -eps_theta(scale * x_tilde, t) / sigma.reshape(-1, 1, 1)

    dsm = denoising_score_matching(score, x0, sigma, noise)
    simple = l_simple(eps_theta, x0, process, t, noise, prediction="eps")
    torch.testing.assert_close(dsm, 0.5 * 12 * simple, rtol=1e-12, atol=1e-12)


def test_sliced_score_matching_is_l_simple_minus_one_in_expectation() -> None:
    """For a linear eps_theta(x) = A x: E[||eps_hat||^2 - 2 sigma v^T A v] / D = L_simple - 1 (Stein's lemma), by
    Monte Carlo within 4 standard errors."""
    process = GeometricVE(timesteps=2, sigma_min=0.5, sigma_max=1.0)
    g = torch.Generator().manual_seed(1)
    A = torch.randn(4, 4, generator=g, dtype=torch.float64) / 2

    def eps_theta(x_t, t):
        return x_t @ A.T

    n = 400_000
    x0 = 0.7 * torch.randn(n, 4, generator=g, dtype=torch.float64)
    t = torch.zeros(n, dtype=torch.int64)
    torch.manual_seed(2)
    ssm = sliced_score_matching(eps_theta, x0, process, t)["loss"].detach()
    simple = l_simple(eps_theta, x0, process, t, prediction="eps")
    difference = ssm - (simple - 1)
    assert abs(float(difference.mean())) < 4 * float(difference.std()) / math.sqrt(n)


# ---------------------------------------------------------------------------------------------- a 2-D mixture
MEANS = torch.tensor([[-1.0, -0.5], [1.0, 0.5], [0.0, 1.2]], dtype=torch.float64)
STD, WEIGHTS = 0.35, torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64)


def _mixture(n: int, g: torch.Generator) -> torch.Tensor:
    k = torch.multinomial(WEIGHTS, n, replacement=True, generator=g)
    return MEANS[k] + STD * torch.randn(n, 2, generator=g, dtype=torch.float64)


def _perturbed_log_density(x_t: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
    var = alpha**2 * STD**2 + sigma**2
    d2 = ((x_t.unsqueeze(1) - alpha * MEANS) ** 2).sum(-1)
    return torch.logsumexp(WEIGHTS.log() - 0.5 * d2 / var - math.log(2 * math.pi * var), dim=1)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 2))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("objective", ["dsm", "ssm"])
def test_dsm_and_ssm_recover_a_mixtures_score(objective: str) -> None:
    """Trained on a 2-D Gaussian mixture at one noise level, the net's score -eps_hat / sigma is within 10% (relative
    L2 over a grid) of the perturbed mixture's exact score where its density is above 1% of the maximum."""
    process = GeometricVE(timesteps=2, sigma_min=0.25, sigma_max=1.0)
    torch.manual_seed(3)
    net = MLP()  # trained in float32 (errors 8.3% / 8.6% against 7.9% / 8.6% in float64, at 2.3x / 1.6x the speed)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 2000)
    g = torch.Generator().manual_seed(4)
    for _ in range(2000):
        x0 = _mixture(2048, g).float()
        t = torch.zeros(2048, dtype=torch.int64)
        if objective == "dsm":
            loss = l_simple(net, x0, process, t, prediction="eps").mean()
        else:
            loss = sliced_score_matching(net, x0, process, t)["loss"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    a = float(process.schedule.alphas_cumprod[0].sqrt())
    s = math.sqrt(1 - a**2)
    axis = torch.linspace(-2.5, 2.5, 101, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis).requires_grad_(True)
    log_q = _perturbed_log_density(grid, a, s)
    (exact,) = torch.autograd.grad(log_q.sum(), grid)
    with torch.no_grad():
        model_score = -net.double()(grid, torch.zeros(len(grid), dtype=torch.int64)) / s
    region = log_q.detach() > log_q.detach().max() + math.log(0.01)
    error = (model_score - exact)[region].norm() / exact[region].norm()
    print(f"{objective}: relative L2 error of the score {float(error):.4f}")
    assert float(error) < 0.10, (objective, float(error))


# ---------------------------------------------------------------------------------------------- sampling
def test_annealed_langevin_on_an_exact_gaussian_score_matches_the_data_variance() -> None:
    """10 levels from sigma 10 to 0.01, 100 steps each, step_lr 1e-4: the samples' variance is the data's within 3%
    (0.2551 for 0.25; NCSN's step_lr 2e-5 relaxes too little at the small levels here: 0.2734)."""
    c = 0.5
    process = GeometricVE(timesteps=1000, sigma_min=0.01, sigma_max=10.0)
    schedule = process.schedule

    def exact_eps(x_t, t):  # E[eps | x_t] for x ~ N(0, c^2 I)
        a = schedule.alphas_cumprod[t].reshape(-1, 1)
        return (1 - a).sqrt() * x_t / (a * c**2 + (1 - a))

    g = torch.Generator().manual_seed(5)
    x_T = torch.randn(2000, 16, generator=g, dtype=torch.float64)
    levels = timestep_sequence(1000, 10, "linspace")
    assert levels[0] == 0 and levels[-1] == 999
    for final_denoise in (False, True):
        x = annealed_langevin_sample(exact_eps, x_T, schedule, levels, langevin_steps=100, step_lr=1e-4,
                                     final_denoise=final_denoise, generator=torch.Generator().manual_seed(6))  # fmt: skip
        assert float(x.var()) == pytest.approx(c**2, rel=0.03), final_denoise


def test_langevin_is_a_registry_sampler_with_its_own_options() -> None:
    process = GeometricVE(timesteps=100, sigma_min=0.01, sigma_max=5.0)
    x_T = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(7))
    calls = []

    def model(x, t):
        calls.append(int(t[0]))
        return torch.zeros_like(x)

    out = sample(model, x_T, process.schedule, "langevin", steps=4, skip="linspace", langevin_steps=3, step_lr=1e-4,
                 final_denoise=0.0, generator=torch.Generator().manual_seed(8))  # fmt: skip
    assert out.shape == x_T.shape and len(calls) == 4 * 3 and calls[0] == 99 and calls[-1] == 0
    with pytest.raises(ValueError, match="does not read the option"):
        sample(model, x_T, process.schedule, "langevin", steps=4, snr=0.1)


def test_the_module_refuses_ssm_with_a_learned_variance(tiny_module, tiny_unet) -> None:
    with pytest.raises(ConfigError, match="out_channels null"):
        tiny_module(tiny_unet(out_channels=2), objective="ssm")


def test_ssm_trains_a_unet_through_double_backward(tiny_unet) -> None:
    """The UNet (GroupNorm, attention) supports the second derivative that SSM's Jacobian-vector product needs."""
    net = tiny_unet(image_size=8, attn_resolutions=(4,))
    process = GeometricVE(timesteps=10)
    x0 = torch.rand(2, net.in_channels, 8, 8) * 2 - 1
    loss = sliced_score_matching(net, x0, process, torch.tensor([3, 7]))["loss"].mean()
    loss.backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------- through the CLI
NCSN = ["--config", str(Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist_ncsn.yaml"),
        "--model.net.init_args.base_channels", "8", "--model.net.init_args.norm_groups", "4",
        "--model.sampling.steps", "3", "--model.sampling.options", "{langevin_steps: 2}"]  # fmt: skip


@pytest.mark.slow
@needs_fashion_mnist
def test_the_ncsn_recipe_trains_resumes_exactly_and_samples_with_langevin_pc_and_heun(tmp_path: Path) -> None:
    straight = continued_equals_uninterrupted(tmp_path, *NCSN)
    for sampler, options in (("langevin", "{langevin_steps: 2}"), ("pc", "{}"), ("heun", "{}")):
        out = tmp_path / sampler
        _predict(straight, tmp_path / "r", out, *NCSN, "--model.sampling.sampler", sampler, "--model.sampling.skip",
                 "linspace" if sampler == "langevin" else "uniform", "--model.sampling.options", options)  # fmt: skip
        assert len(list(out.glob("*.png"))) == 5, sampler
    # The process (no state of its own) is rebuilt from its spec by DiffusionModel.load and kept by an export.
    from src.models.diffusion import DiffusionModel

    model = DiffusionModel.load(straight)
    again = DiffusionModel.load(model.save(tmp_path / "export"))
    assert isinstance(again.process, GeometricVE) and again.process.config == model.process.config
    indices = torch.arange(2)
    options = {"sampler": "langevin", "steps": 2, "skip": "linspace", "options": {"langevin_steps": 2}}
    assert torch.equal(again.sample_indices(indices, **options), model.sample_indices(indices, **options))


@pytest.mark.slow
@needs_fashion_mnist
def test_sliced_score_matching_trains_through_the_cli(tmp_path: Path) -> None:
    state = torch.load(_fit(tmp_path / "s", 2, *NCSN, "--model.training.objective", "ssm"), weights_only=False)[
        "state_dict"
    ]
    assert torch.isfinite(state["net.conv_in.weight"]).all()
