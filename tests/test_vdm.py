"""Variational diffusion models (src/diffusion/vdm.py) against closed forms, float64, and through the CLI.

The Gaussian reference: data x ~ N(0, c^2 I) in D dimensions has the exact denoiser eps_hat(z_t) = E[eps | z_t]
= sigma z_t / (alpha^2 c^2 + sigma^2), whose error E||eps - eps_hat||^2 = D alpha^2 c^2 / (alpha^2 c^2 + sigma^2)
= D c^2 SNR / (1 + c^2 SNR). The continuous diffusion term 1/2 int_0^1 gamma'(s) E||eps - eps_hat||^2 ds, with
d SNR = -SNR gamma' ds, is then 1/2 D [log(1 + c^2 SNR(0)) - log(1 + c^2 SNR(1))]: the endpoints alone.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import _fit, _predict, continued_equals_uninterrupted, needs_fashion_mnist

from src.diffusion.likelihood import gaussian_bound_term, model_log_variance, normal_kl
from src.diffusion.losses import TIMESTEP_SAMPLINGS, sample_timesteps, unit_times
from src.diffusion.process import DiffusionProcess, DiscreteProcess
from src.diffusion.samplers import ddpm_sample, sample
from src.diffusion.schedule import NoiseSchedule, extract
from src.diffusion.vdm import (
    LinearLogSNR,
    MonotoneLogSNR,
    categorical_log_probs,
    diffusion_term,
    diffusion_weight,
    prior_kl,
    reconstruction_nll,
    vdm_bits_per_dim,
    vdm_loss,
)
from src.errors import ConfigError
from src.metrics.estimate import MeanStandardError
from src.models.diffusion import DiffusionModel
from src.models.unet import fourier_features

G0, G1 = -10.0, 6.0  # the ends every schedule of the invariance test shares
C2 = 0.3**2  # the data variance c^2
D = 12


class ShapedLogSNR(DiffusionProcess):
    """gamma(s) = G0 + (G1 - G0) shape(s), shape increasing from 0 to 1: the same ends, another path between them."""

    def __init__(self, shape, timesteps: int = 1000) -> None:
        super().__init__(timesteps)
        self.shape = shape

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        s = t.to(torch.float64) / (self.num_timesteps - 1)
        return -(G0 + (G1 - G0) * self.shape(s))


def _cosine_shape(s: torch.Tensor) -> torch.Tensor:
    # -log SNR of improved DDPM's cosine schedule, alpha^2 = cos^2(pi/2 (s + 0.008) / 1.008), rescaled to [0, 1].
    def gamma(u):
        f = torch.cos(0.5 * math.pi * (u + 0.008) / 1.008)
        return torch.log((1 - f**2).clamp(min=1e-30) / f**2)

    lo, hi = gamma(torch.tensor(0.0, dtype=torch.float64)), gamma(torch.tensor(0.999, dtype=torch.float64))
    return (gamma(s * 0.999) - lo) / (hi - lo)


def _monotone_shape() -> callable:
    torch.manual_seed(3)
    net = MonotoneLogSNR(n_features=64).double().requires_grad_(False)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 2.0)  # far from linear
    g = net.gamma
    zero, one = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    return lambda s: (g(s) - g(zero)) / (g(one) - g(zero))


SHAPES = {"linear": lambda s: s, "cosine": _cosine_shape, "monotone_net": _monotone_shape()}


def _exact_mse(process: DiffusionProcess, t: torch.Tensor) -> torch.Tensor:
    snr = process.log_snr(t).to(torch.float64).exp()
    return D * C2 * snr / (1 + C2 * snr)


def _closed_form() -> float:
    return 0.5 * D * (math.log1p(C2 * math.exp(-G0)) - math.log1p(C2 * math.exp(-G1)))


def _quadrature(process: DiffusionProcess, nodes: int = 400) -> tuple[float, float]:
    """(the continuous diffusion term, its single-draw Monte-Carlo variance) by Gauss-Legendre in s on 8 panels."""
    x, w = np.polynomial.legendre.leggauss(nodes // 8)
    panels = np.linspace(0, 1, 9)
    s = np.concatenate([(b - a) / 2 * x + (a + b) / 2 for a, b in zip(panels[:-1], panels[1:], strict=True)])
    weights = np.concatenate([(b - a) / 2 * w for a, b in zip(panels[:-1], panels[1:], strict=True)])
    t = torch.tensor(s * (process.num_timesteps - 1), dtype=torch.float64)
    weight = diffusion_weight(process, t).detach().double()  # gamma'(s) / 2 by autograd
    mse = _exact_mse(process, t)
    per_dim = mse / D  # ||eps - eps_hat||^2 = per_dim chi^2_D: mean D per_dim, variance 2 D per_dim^2
    mean = float((torch.tensor(weights) * weight * mse).sum())
    second = float((torch.tensor(weights) * weight**2 * (mse**2 + 2 * D * per_dim**2)).sum())
    return mean, second - mean**2


# ---------------------------------------------------------------------------------------------- the bound's terms
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_each_kl_term_is_the_snr_difference_form(name: str) -> None:
    """KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) with the posterior variance is 1/2 (SNR(t-1) - SNR(t))
    ||x_0 - x0_hat||^2 (VDM eq. 13 written per step), for every t, to 1e-10."""
    schedule = NoiseSchedule.linear(1000) if name == "linear" else NoiseSchedule.cosine(1000)
    g = torch.Generator().manual_seed(0)
    T = schedule.num_timesteps
    t = torch.arange(1, T)
    x0 = torch.rand(T - 1, 2, 3, generator=g, dtype=torch.float64) * 2 - 1
    x0_hat = x0 + 0.1 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x_t = schedule.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    logvar = extract(model_log_variance(schedule, "fixed_small"), t, x0)
    kl = gaussian_bound_term(x0, x_t, x0_hat, t, schedule, logvar)
    snr_gap = (schedule.snr[t - 1] - schedule.snr[t]).reshape(-1, 1, 1)
    torch.testing.assert_close(kl, 0.5 * snr_gap * (x0 - x0_hat) ** 2, rtol=1e-10, atol=1e-12)


def test_the_continuous_bound_on_gaussian_data_is_the_closed_form_for_any_path_between_the_same_ends() -> None:
    """The invariance result (VDM section 5.1): linear, cosine-shaped and a random monotone network's gamma with
    equal ends give the closed form (quadrature, gamma' by autograd) to 1e-8; their Monte-Carlo variances differ."""
    closed = _closed_form()
    variances = {}
    for name, shape in SHAPES.items():
        value, variances[name] = _quadrature(ShapedLogSNR(shape))
        assert value == pytest.approx(closed, rel=1e-8), name
    print("single-draw variance of the diffusion term:", {k: round(v, 2) for k, v in variances.items()})
    assert variances["linear"] < variances["cosine"]
    assert len({round(v, 3) for v in variances.values()}) == 3


def test_the_monte_carlo_estimate_with_the_exact_denoiser_is_unbiased() -> None:
    """`diffusion_term` (the training estimate: network call, eps_hat, autograd gamma') averages to the closed form."""
    process = ShapedLogSNR(SHAPES["cosine"])
    g = torch.Generator().manual_seed(1)
    n = 200_000
    x0 = math.sqrt(C2) * torch.randn(n, D, generator=g, dtype=torch.float64)

    def exact(z_t, t):
        snr = process.log_snr(t).exp().unsqueeze(-1)
        alpha2, sigma2 = snr / (1 + snr), 1 / (1 + snr)
        return sigma2.sqrt() * z_t / (alpha2 * C2 + sigma2)

    t = unit_times(n, "stratified", generator=g) * (process.num_timesteps - 1)
    values = diffusion_term(exact, x0, process, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    values = values.detach()
    mean, se = float(values.mean()), float(values.std() / math.sqrt(n))
    assert abs(mean - _closed_form()) < 4 * se


def test_the_discrete_bound_decreases_in_t_towards_the_continuous_one() -> None:
    """VDM eq. 13 with the exact denoiser, summed exactly over its N steps, for N = 1, 2, 4, ..., 4096: decreasing
    towards the continuous term, the gap halving with each doubling of N (first order), under 1% at N = 4096."""
    process = ShapedLogSNR(SHAPES["cosine"])
    closed, values = _closed_form(), []
    for N in [2**k for k in range(13)]:
        t = torch.arange(1, N + 1, dtype=torch.float64) / N * (process.num_timesteps - 1)
        values.append(float((diffusion_weight(process, t, N) * _exact_mse(process, t)).sum() / N))
    assert all(a > b for a, b in zip(values, values[1:], strict=False)), values
    assert values[-1] > closed
    gaps = [v - closed for v in values]
    assert gaps[-1] / gaps[-2] == pytest.approx(0.5, abs=0.02)  # first order in 1/N: the gap halves with N
    assert gaps[-1] < 0.01 * closed


def test_the_categorical_decoder_sums_to_one_and_sharpens_with_the_snr() -> None:
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64)
    for gamma_0 in (-13.3, -5.0, 0.0):
        probs = categorical_log_probs(z, torch.tensor(gamma_0, dtype=torch.float64)).exp()
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(z), rtol=0, atol=1e-12)
    x = torch.randint(0, 256, (4, 1, 5, 5), generator=g).double() / 127.5 - 1
    eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
    sharp = reconstruction_nll(x, eps, torch.tensor(-13.3, dtype=torch.float64))
    blurred = reconstruction_nll(x, eps, torch.tensor(4.0, dtype=torch.float64))
    # sigma_0 / alpha_0 = 0.0013, a third of the half-bin 1/255: each pixel's own value near certain.
    assert float(sharp.max()) < 0.01 * 25
    assert bool((blurred > 25 * math.log(2) * 4).all())  # much wider than the bins: several bits per pixel


@pytest.mark.parametrize("gamma_0", [-13.3, -9.0, -6.0, -2.0, 3.0])
def test_the_windowed_decoder_likelihood_is_the_full_ones(gamma_0: float) -> None:
    g = torch.Generator().manual_seed(9)
    x = torch.randint(0, 256, (3, 2, 6, 6), generator=g).double() / 127.5 - 1
    x[0, 0, 0, :3] = torch.tensor([-1.0, 1.0, 0.0], dtype=torch.float64)  # the edge levels
    eps = 3 * torch.randn(x.shape, generator=g, dtype=torch.float64)  # some pixels far from their level
    gamma = torch.tensor(gamma_0, dtype=torch.float64, requires_grad=True)
    full = -categorical_log_probs(x + torch.exp(0.5 * gamma) * eps, gamma).gather(
        -1, ((x + 1) * 127.5).round().long().unsqueeze(-1)).squeeze(-1).flatten(1).sum(1)  # fmt: skip
    windowed = reconstruction_nll(x, eps, gamma)
    torch.testing.assert_close(windowed, full, rtol=1e-12, atol=1e-12)
    (grad_full,) = torch.autograd.grad(full.sum(), gamma)
    (grad_windowed,) = torch.autograd.grad(windowed.sum(), gamma)
    torch.testing.assert_close(grad_windowed, grad_full, rtol=1e-10, atol=1e-12)


def test_the_prior_term_is_the_gaussian_kl() -> None:
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64) * 2 - 1
    gamma_1 = torch.tensor(5.0, dtype=torch.float64)
    var_1 = torch.sigmoid(gamma_1)
    reference = normal_kl((1 - var_1).sqrt() * x, var_1.log().expand_as(x), torch.zeros_like(x), torch.zeros_like(x))
    torch.testing.assert_close(prior_kl(x, gamma_1), reference.flatten(1).sum(1), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------- schedules
def test_the_learned_schedules_start_at_their_ends_and_increase() -> None:
    linear = LinearLogSNR(timesteps=100, gamma_min=-13.3, gamma_max=5.0)
    ends = linear.log_snr(torch.tensor([0.0, 99.0]))
    torch.testing.assert_close(ends, torch.tensor([13.3, -5.0]))
    torch.testing.assert_close(linear.schedule.alphas_cumprod[0], torch.sigmoid(torch.tensor(13.3, dtype=torch.float64)),
                               rtol=1e-6, atol=0)  # fmt: skip
    net = MonotoneLogSNR(timesteps=100, n_features=32)
    t = torch.linspace(0, 99, 500)
    gamma = -net.log_snr(t).detach()
    assert bool((gamma[1:] > gamma[:-1]).all())
    assert abs(float(gamma[0]) + 13.3) < 0.1 and abs(float(gamma[-1]) - 5.0) < 0.1
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16-mixed training: the schedule stays float32
        torch.testing.assert_close(net.log_snr(t).detach(), -gamma, rtol=0, atol=0)
    fixed = LinearLogSNR(timesteps=100, learned=False)
    assert not fixed.has_parameters() and set(fixed.state_dict()) == {"bias", "scale"}


def test_the_bound_trains_the_schedule_ends_through_every_term() -> None:
    process = LinearLogSNR(timesteps=100)
    x0 = torch.randint(0, 256, (6, 1, 4, 4)).float() / 127.5 - 1
    out = vdm_loss(lambda z, t: 0.5 * z, x0, process)
    assert set(out) == {"loss", "diffusion_bpd", "prior_bpd", "recon_bpd"}
    out["loss"].mean().backward()
    assert process.bias.grad is not None and process.scale.grad is not None
    assert float(process.bias.grad) != 0 and float(process.scale.grad) != 0


def test_the_evaluation_bound_sums_the_discrete_terms_exactly() -> None:
    """With `steps` N and enough times, the diffusion term is the exact sum of the N terms (deterministic in t)."""
    process = DiscreteProcess(NoiseSchedule.linear(20))
    x0 = torch.randint(0, 256, (3, 1, 2, 2)).double() / 127.5 - 1
    model = lambda z, t: 0.3 * z  # noqa: E731

    def bound(seed: int):
        return vdm_bits_per_dim(model, x0, process, None, steps=19, generator=torch.Generator().manual_seed(seed))

    one, two = bound(0), bound(0)
    torch.testing.assert_close(one["bpd"], two["bpd"], rtol=0, atol=0)
    assert set(one) == {"bpd", "prior_bpd", "recon_bpd", "diffusion_bpd"}
    torch.testing.assert_close(one["bpd"], one["prior_bpd"] + one["recon_bpd"] + one["diffusion_bpd"])


# ---------------------------------------------------------------------------------------------- timesteps, sampler
@pytest.mark.parametrize("method", TIMESTEP_SAMPLINGS)
def test_every_timestep_sampling_is_uniform_per_example(method: str) -> None:
    g = torch.Generator().manual_seed(4)
    u = torch.stack([unit_times(8, method, generator=g) for _ in range(4000)])  # (draws, batch)
    assert float(u.min()) >= 0 and float(u.max()) < 1
    for column in u.T:  # each example's u: uniform (Kolmogorov-Smirnov distance of 4,000 draws)
        sorted_u = column.sort().values
        ks = float((sorted_u - torch.arange(1, 4001, dtype=torch.float64) / 4000).abs().max())
        assert ks < 0.035, (method, ks)
    if method == "antithetic":
        torch.testing.assert_close(u[:, :4] + u[:, 4:], torch.ones(4000, 4, dtype=torch.float64))
    if method in ("low_discrepancy", "stratified"):
        assert bool(((u * 8).floor().sort(dim=1).values == torch.arange(8)).all())  # one per stratum
    t = sample_timesteps(8, 10, generator=g, method=method)
    assert t.dtype == torch.int64 and int(t.min()) >= 0 and int(t.max()) <= 9


def test_uniform_timesteps_are_the_unchanged_draw() -> None:
    one = sample_timesteps(16, 1000, generator=torch.Generator().manual_seed(5))
    assert torch.equal(one, torch.randint(0, 1000, (16,), generator=torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("respaced", [False, True])
def test_the_interpolated_variance_at_0_and_1_is_fixed_small_and_fixed_large_step_for_step(respaced: bool) -> None:
    """Imagen Video's (sigma-tilde^2)^(1 - gamma) (sigma^2)^gamma: gamma 0 and 1 are the two fixed variances exactly."""
    schedule = NoiseSchedule.linear(50)
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    model = lambda x, t: 0.5 * x  # noqa: E731
    steps = {"timesteps": list(range(0, 50, 5))} if respaced else {}

    def run(**kw):
        seen = []
        out = ddpm_sample(model, x_T, schedule, generator=torch.Generator().manual_seed(7),
                          callback=lambda d: seen.append(d["x"].clone()), **steps, **kw)  # fmt: skip
        return [*seen, out]

    for gamma, variance in ((0.0, "fixed_small"), (1.0, "fixed_large")):
        for a, b in zip(run(variance_gamma=gamma), run(variance=variance), strict=True):
            assert torch.equal(a, b)
    between = run(variance_gamma=0.5)[-1]
    assert not torch.equal(between, run(variance="fixed_small")[-1])
    with pytest.raises(ValueError, match="does not read the option"):
        sample(model, x_T, schedule, "ddim", steps=3, variance_gamma=0.5)


# ---------------------------------------------------------------------------------------------- parts
def test_fourier_features_append_sin_and_cos_per_channel() -> None:
    x = torch.tensor([[[[0.25]], [[-0.5]]]])  # (1, 2, 1, 1)
    out = fourier_features(x, [0, 1])
    expected = [0.25, -0.5]
    for c in (0.25, -0.5):
        expected += [math.sin(2 * math.pi * c), math.sin(4 * math.pi * c)]
    for c in (0.25, -0.5):
        expected += [math.cos(2 * math.pi * c), math.cos(4 * math.pi * c)]
    torch.testing.assert_close(out.flatten(), torch.tensor(expected), atol=1e-6, rtol=0)


def test_a_unet_with_fourier_features_runs_records_them_and_refuses_diffusers(tiny_unet) -> None:
    from src.models.convert import DiffusersConversionError, diffusers_config_from_unet

    net = tiny_unet(fourier_features=[6, 7])
    assert net.config["fourier_features"] == [6, 7] and "fourier_features" not in tiny_unet().config
    assert net.conv_in.in_channels == 5 * tiny_unet().conv_in.in_channels
    x = torch.randn(2, net.in_channels, net.image_size, net.image_size)
    assert net(x, torch.tensor([1.5, 900.0])).shape == x.shape
    with pytest.raises(DiffusersConversionError, match="fourier_features"):
        diffusers_config_from_unet(net)


def test_the_mean_standard_error_is_numpys() -> None:
    values = np.random.default_rng(8).normal(3.0, 0.5, 257)
    metric = MeanStandardError()
    for chunk in np.array_split(values, 5):
        metric.update(torch.tensor(chunk))
    mean, se = metric.compute()
    assert float(mean) == pytest.approx(values.mean(), rel=1e-12)
    assert float(se) == pytest.approx(values.std(ddof=1) / math.sqrt(len(values)), rel=1e-9)


def test_the_module_refuses_what_the_bound_cannot_read(tiny_module, tiny_unet) -> None:
    with pytest.raises(ConfigError, match="out_channels null"):
        tiny_module(tiny_unet(out_channels=2), objective="vdm")
    with pytest.raises(ConfigError, match="timestep_sampling"):
        tiny_module(timestep_sampling="sobol")
    assert tiny_module(objective="vdm", process=LinearLogSNR(timesteps=50)).vdm_steps == 0
    assert tiny_module(objective="vdm_discrete").vdm_steps == tiny_module().process.num_timesteps - 1


# ---------------------------------------------------------------------------------------------- through the CLI
VDM = ["--config", str(Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist_vdm.yaml"),
       "--model.net.init_args.base_channels", "8", "--model.net.init_args.norm_groups", "4",
       "--model.sampling.steps", "3"]  # fmt: skip


@pytest.mark.slow
@needs_fashion_mnist
def test_the_vdm_recipe_trains_resumes_exactly_tests_and_samples(tmp_path: Path) -> None:
    """configs/fashion_mnist_vdm.yaml through the CLI: 6 steps continued to 10 equal the 10-step run bit for bit
    (net, learned gamma ends, their averages, optimizer); the ends moved; test logs the bound and its standard error;
    predict writes images; an export keeps the learned schedule."""
    straight = continued_equals_uninterrupted(tmp_path, *VDM, "--trainer.log_every_n_steps", "1")
    state = torch.load(straight, weights_only=False)["state_dict"]
    assert not torch.equal(state["process.bias"], torch.tensor([-13.3]))
    assert not torch.equal(state["process.scale"], torch.tensor([5.0 + 13.3]))
    metrics = next((tmp_path / "straight").rglob("metrics.csv")).read_text().splitlines()[0]
    for name in ("train/gamma_0", "train/gamma_1", "train/diffusion_bpd", "train/prior_bpd", "train/recon_bpd"):
        assert name in metrics
    from src.main import cli_main

    cli_main(["test", *VDM, "--ckpt_path", str(straight), "--trainer.default_root_dir", str(tmp_path / "t"),
              "--data.batch_size", "8", "--trainer.limit_test_batches", "2", "--model.evaluation.bpd_timesteps", "2",
              "--logger_backend", "csv"])  # fmt: skip
    header, row = next((tmp_path / "t").rglob("metrics.csv")).read_text().splitlines()[:2]
    logged = dict(zip(header.split(","), row.split(","), strict=True))
    bpd, se = float(logged["test/bpd"]), float(logged["test/bpd_se"])
    terms = sum(float(logged[f"test/{k}_bpd"]) for k in ("prior", "recon", "diffusion"))
    assert 0 < se < bpd and bpd == pytest.approx(terms, rel=1e-5)
    _predict(straight, tmp_path / "r", tmp_path / "pngs", *VDM)
    assert len(list((tmp_path / "pngs").glob("*.png"))) == 5
    model = DiffusionModel.load(straight)
    again = DiffusionModel.load(model.save(tmp_path / "export"))
    assert isinstance(again.process, LinearLogSNR)
    assert torch.equal(again.process.bias, model.process.bias)


@pytest.mark.slow
@needs_fashion_mnist
def test_the_discrete_bound_and_every_timestep_sampling_train_through_the_cli(tmp_path: Path) -> None:
    _fit(tmp_path / "d", 2, *VDM, "--model.training.objective", "vdm_discrete", "--model.process",
         "src.diffusion.vdm.MonotoneLogSNR")  # fmt: skip
    plain = torch.load(_fit(tmp_path / "u", 2), weights_only=False)["state_dict"]
    spread = torch.load(_fit(tmp_path / "a", 2, "--model.training.timestep_sampling", "antithetic"), weights_only=False)
    assert not torch.equal(plain["net.conv_in.weight"], spread["state_dict"]["net.conv_in.weight"])
