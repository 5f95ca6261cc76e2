"""The probability-flow likelihood (src/diffusion/ode_likelihood.py) on Gaussian data, whose exact denoiser and
marginal densities are closed form: x~ = x_0 + sigma n ~ N(mu, diag(s^2 + sigma^2)) for x_0 ~ N(mu, diag(s^2))."""

from __future__ import annotations

import math

import pytest
import torch

from src.diffusion.continuous import vp_sigmas
from src.diffusion.ode_likelihood import dequantize, gaussian_log_prob, ode_log_likelihood, ode_nll_bits_per_dim
from src.diffusion.schedule import NoiseSchedule

try:
    from ode_reference import DTYPE, SHAPE, gaussian_problem, mixture_problem
except ImportError:  # pragma: no cover
    from tests.ode_reference import DTYPE, SHAPE, gaussian_problem, mixture_problem

torch.set_num_threads(1)
SCHEDULE = NoiseSchedule.linear(1000)
SIGMA_MIN, SIGMA_MAX = float(vp_sigmas(SCHEDULE)[0]), float(vp_sigmas(SCHEDULE)[-1])
PROBLEM = gaussian_problem()


def data(batch: int = 4, seed: int = 0) -> torch.Tensor:
    """Samples of the marginal at sigma_min, N(mu, s^2 + sigma_min^2), where the integration starts."""
    z = torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    return PROBLEM.mu + (PROBLEM.s**2 + SIGMA_MIN**2).sqrt() * z


def test_exact_divergence_gives_the_gaussian_log_density() -> None:
    """With the exact prior at sigma_max the only error left is the ODE solver's (rtol = atol = 1e-8)."""
    x = data()
    out = ode_log_likelihood(
        PROBLEM, x, SIGMA_MIN, SIGMA_MAX, lambda z: PROBLEM.log_prob(z, SIGMA_MAX), rtol=1e-8, atol=1e-8
    )
    expected = PROBLEM.log_prob(x, SIGMA_MIN)
    torch.testing.assert_close(out["logp"], expected, rtol=0, atol=1e-5)
    # The end point is the exact flow of x to sigma_max.
    torch.testing.assert_close(out["z"], PROBLEM.exact_flow(x, SIGMA_MIN, SIGMA_MAX), rtol=1e-6, atol=1e-4)


def test_standard_prior_and_paper_tolerance() -> None:
    """With the SDE's own prior N(0, (1 + sigma_max^2) I) and the paper's rtol = atol = 1e-5, the error is the prior's
    mismatch (the data's mean and scale at sigma_max = 157) plus the solver's: well under 0.05 nats in D = 32."""
    x = data()
    std = math.sqrt(1 + SIGMA_MAX**2)
    out = ode_log_likelihood(PROBLEM, x, SIGMA_MIN, SIGMA_MAX, lambda z: gaussian_log_prob(z, std))
    mismatch = gaussian_log_prob(out["z"], std) - PROBLEM.log_prob(out["z"], SIGMA_MAX)
    torch.testing.assert_close(out["logp"] - mismatch, PROBLEM.log_prob(x, SIGMA_MIN), rtol=0, atol=1e-3)
    assert (out["logp"] - PROBLEM.log_prob(x, SIGMA_MIN)).abs().max() < 0.05


def test_rademacher_probe_is_exact_for_a_diagonal_jacobian() -> None:
    """eps^T J eps = sum_j J_jj eps_j^2 = tr J when J is diagonal and eps_j = +-1: for Gaussian data with diagonal
    covariance the Rademacher estimate has no variance."""
    x = data()
    prior = lambda z: PROBLEM.log_prob(z, SIGMA_MAX)  # noqa: E731
    out = ode_log_likelihood(PROBLEM, x, SIGMA_MIN, SIGMA_MAX, prior, "rademacher", rtol=1e-8, atol=1e-8,
                             generator=torch.Generator().manual_seed(0))  # fmt: skip
    torch.testing.assert_close(out["logp"], PROBLEM.log_prob(x, SIGMA_MIN), rtol=0, atol=1e-5)


@pytest.mark.parametrize("divergence", ["rademacher", "gaussian"])
def test_hutchinson_estimate_is_unbiased(divergence: str) -> None:
    """On the Gaussian mixture (a non-diagonal Jacobian), the Hutchinson estimate averaged over 64 independent probe
    vectors (one per copy of the same point) is within 4 standard errors of the exact-divergence log-density."""
    mixture = mixture_problem()
    x = data(1).expand(64, *SHAPE).contiguous()
    prior = lambda z: gaussian_log_prob(z, math.sqrt(1 + SIGMA_MAX**2))  # noqa: E731
    exact = ode_log_likelihood(mixture, x[:1], SIGMA_MIN, SIGMA_MAX, prior, rtol=1e-6, atol=1e-6)["logp"].item()
    out = ode_log_likelihood(mixture, x, SIGMA_MIN, SIGMA_MAX, prior, divergence, rtol=1e-6, atol=1e-6,
                             generator=torch.Generator().manual_seed(0))  # fmt: skip
    estimates = out["logp"]
    assert estimates.std() > 1e-3  # really stochastic
    assert abs(estimates.mean().item() - exact) < 4 * estimates.std().item() / 8, (estimates.mean(), exact)


class ContinuousGaussianEps(torch.nn.Module):
    """The exact eps-network of the Gaussian data for a DDPM schedule, at fractional timesteps (an nn.Module, so the
    wrappers pass it fractional t): a(t) = 1 / (1 + sigma(t)^2) with sigma(t) interpolated in log sigma."""

    def __init__(self) -> None:
        super().__init__()
        self.log_sigmas = vp_sigmas(SCHEDULE).log()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.to(DTYPE)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        sigma = ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp().reshape(-1, 1, 1, 1)
        a = 1 / (1 + sigma**2)
        mu, s2 = PROBLEM.mu, PROBLEM.s**2
        return (1 - a).sqrt() * (x_t - a.sqrt() * mu) / (a * s2 + 1 - a)


def test_bits_per_dim_of_a_ddpm_network() -> None:
    """`ode_nll_bits_per_dim` wraps a DDPM eps-network, dequantises 8-bit data as the paper does and reports
    -log p / (D ln 2) + 7; compared with the exact density of the dequantised point under the Gaussian marginal at
    sigma_min (the prior mismatch bounded as above)."""
    x8 = (data(3) * 127.5 + 127.5).round().clamp(0, 255) / 127.5 - 1.0  # 8-bit images in [-1, 1]
    out = ode_nll_bits_per_dim(ContinuousGaussianEps(), x8, SCHEDULE, divergence="exact",
                               generator=torch.Generator().manual_seed(5))  # fmt: skip
    x = dequantize(x8, torch.Generator().manual_seed(5))
    assert ((x - x8).abs() <= 1 / 127.5).all() and not torch.equal(x, x8)
    dims = x[0].numel()
    expected = -PROBLEM.log_prob(x, SIGMA_MIN) / (dims * math.log(2)) + 7.0
    assert (out["bpd"] - expected).abs().max() < 0.05 / (dims * math.log(2)), (out["bpd"], expected)
    assert out["nfe"] > 10


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="divergence"):
        ode_log_likelihood(PROBLEM, data(1), SIGMA_MIN, SIGMA_MAX, lambda z: z.sum(), divergence="exact_ish")
    with pytest.raises(ValueError, match="sigma_min"):
        ode_log_likelihood(PROBLEM, data(1), SIGMA_MAX, SIGMA_MIN, lambda z: z.sum())


def test_runs_on_a_float32_unet(tiny_unet) -> None:
    """A (random, tiny) UNet in float32: fractional timesteps and the Hutchinson divergence through autograd give
    finite bits/dim."""
    torch.manual_seed(0)
    net = tiny_unet(mid_attention=True).eval()
    x8 = torch.randint(0, 256, (2, 1, 8, 8), generator=torch.Generator().manual_seed(0)).float() / 127.5 - 1.0
    out = ode_nll_bits_per_dim(net, x8, SCHEDULE, rtol=1e-3, atol=1e-3, generator=torch.Generator().manual_seed(1))
    assert out["bpd"].shape == (2,) and torch.isfinite(out["bpd"]).all() and out["nfe"] > 0


# ---------------------------------------------------------------------------------------------- generator device
@pytest.fixture
def draws(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, object, object]]:
    """Every torch.rand / randn / randint call given a generator, as (name, generator, device asked for). torch draws
    only on the generator's device (a CUDA generator with the default CPU device raises), so each must ask for it."""
    calls: list[tuple[str, object, object]] = []
    for name in ("rand", "randn", "randint"):
        real = getattr(torch, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            if kwargs.get("generator") is not None:
                calls.append((_name, kwargs["generator"], kwargs.get("device")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(torch, name, spy)
    return calls


def test_noise_is_drawn_on_the_generators_device(draws: list) -> None:
    """dequantize, the Hutchinson probe of ode_log_likelihood, the stratified timesteps and noise of the bound, the
    training timesteps draw on the generator's device, then move to the data's."""
    from src.diffusion.likelihood import nll_bits_per_dim
    from src.diffusion.losses import sample_timesteps

    g = torch.Generator().manual_seed(0)
    x = data(2)
    draws.clear()  # the test's own data
    dequantize(x.clamp(-1, 1), g)
    prior = lambda z: PROBLEM.log_prob(z, SIGMA_MAX)  # noqa: E731
    ode_log_likelihood(PROBLEM, x, SIGMA_MIN, SIGMA_MAX, prior, "rademacher", rtol=1e-3, atol=1e-3, generator=g)
    schedule = NoiseSchedule.linear(20)
    nll_bits_per_dim(lambda x_t, t: 0.1 * x_t, x.clamp(-1, 1), schedule, num_timesteps=3, generator=g)
    sample_timesteps(4, 20, "cpu", g)
    assert {name for name, _, _ in draws} == {"rand", "randn", "randint"}
    assert all(device == generator.device for _, generator, device in draws), draws


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_generator_draws_the_likelihood_noise() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = data(2).clamp(-1, 1)
    assert dequantize(x, g).device == x.device
    prior = lambda z: PROBLEM.log_prob(z, SIGMA_MAX)  # noqa: E731
    out = ode_log_likelihood(PROBLEM, x, SIGMA_MIN, SIGMA_MAX, prior, "rademacher", rtol=1e-3, atol=1e-3, generator=g)
    assert torch.isfinite(out["logp"]).all()
