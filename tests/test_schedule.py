"""NoiseSchedule (src/diffusion/schedule.py) against independent float64 numpy computations and DDPM identities."""

import math

import numpy as np
import pytest
import torch

from src.diffusion.schedule import NoiseSchedule


def numpy_cosine_betas(T, s=0.008, max_beta=0.999):
    """Improved DDPM's `betas_for_alpha_bar` (Nichol & Dhariwal 2021, eq. 17), written as in their code."""

    def alpha_bar(t):
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)])


# ---------------------------------------------------------------------------------------------- constructors
def test_linear_matches_numpy_float64():
    s = NoiseSchedule.linear(1000, 1e-4, 0.02)
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    alphas_cumprod = np.cumprod(1 - betas)
    assert s.num_timesteps == 1000
    for name in ("betas", "alphas_cumprod"):
        value = getattr(s, name)
        assert value.dtype == torch.float64 and value.shape == (1000,), name
    np.testing.assert_allclose(s.betas.numpy(), betas, rtol=0, atol=1e-12)
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), alphas_cumprod, rtol=1e-12, atol=1e-15)
    # The DDPM paper's numbers: alpha-bar_T ~ 4.04e-5 for the linear schedule (SNR(T) ~ 1e-5 in the paper's text).
    assert s.alphas_cumprod[-1].item() == pytest.approx(4.0358e-5, rel=1e-3)
    np.testing.assert_allclose(s.sqrt_alphas_cumprod.numpy(), np.sqrt(alphas_cumprod), rtol=1e-12)
    np.testing.assert_allclose(s.sqrt_one_minus_alphas_cumprod.numpy(), np.sqrt(1 - alphas_cumprod), rtol=1e-12)


@pytest.mark.parametrize("T", [1000, 4000, 50])
def test_cosine_matches_improved_ddpm_formula(T):
    s = NoiseSchedule.cosine(T)
    betas = numpy_cosine_betas(T)
    assert s.betas.dtype == torch.float64 and s.betas.shape == (T,)
    np.testing.assert_allclose(s.betas.numpy(), betas, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-12, atol=1e-15)
    # Where the clipping at 0.999 does not act, alpha-bar_t = f(t + 1) / f(0) (0-based t is the paper's t + 1).
    f = np.cos((np.arange(T + 1) / T + 0.008) / 1.008 * np.pi / 2) ** 2
    unclipped = np.cumprod(betas < 0.999).astype(bool)  # from the first clipped beta on, the products differ
    assert unclipped.sum() >= T - 2
    np.testing.assert_allclose(s.alphas_cumprod.numpy()[unclipped], (f[1:] / f[0])[unclipped], rtol=1e-10)
    assert s.betas.max().item() <= 0.999


def test_from_name():
    np.testing.assert_array_equal(NoiseSchedule.from_name("linear", 100).betas, NoiseSchedule.linear(100).betas)
    np.testing.assert_array_equal(NoiseSchedule.from_name("cosine", 100).betas, NoiseSchedule.cosine(100).betas)
    with pytest.raises(ValueError, match="unknown noise schedule"):
        NoiseSchedule.from_name("sigmoid", 100)


def test_arbitrary_betas_constructor():
    betas = [0.1, 0.2, 0.5, 1.0]  # beta = 1 is allowed (zero terminal SNR)
    s = NoiseSchedule(betas)
    assert s.num_timesteps == 4
    assert s.betas.dtype == torch.float64
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), np.cumprod(1 - np.array(betas)), rtol=0, atol=1e-15)
    np.testing.assert_allclose(s.alphas_cumprod_prev.numpy(), [1.0, 0.9, 0.72, 0.36], rtol=1e-15)
    # A float32 tensor input is promoted; the caller's tensor is not shared.
    src = torch.tensor([0.1, 0.2], dtype=torch.float32)
    s2 = NoiseSchedule(src)
    assert s2.betas.dtype == torch.float64
    src[0] = 0.5
    assert s2.betas[0].item() == pytest.approx(0.1, rel=1e-6)


@pytest.mark.parametrize("betas", [[0.0, 0.1], [-0.1, 0.1], [0.1, 1.5], [[0.1, 0.2]], [], [float("nan")]])
def test_bad_betas_raise(betas):
    with pytest.raises(ValueError):
        NoiseSchedule(betas)


# ---------------------------------------------------------------------------------------------- posterior q(x_{t-1} | x_t, x_0)
@pytest.mark.parametrize("make", [lambda: NoiseSchedule.linear(1000), lambda: NoiseSchedule.cosine(1000)])
def test_posterior_closed_forms(make):
    s = make()
    b = s.betas.numpy()
    a = np.cumprod(1 - b)
    a_prev = np.concatenate([[1.0], a[:-1]])
    # DDPM eq. 7: beta-tilde_t = (1 - a_{t-1}) / (1 - a_t) beta_t, mu-tilde = c0 x_0 + ct x_t.
    np.testing.assert_allclose(s.posterior_variance.numpy(), (1 - a_prev) / (1 - a) * b, rtol=1e-10, atol=1e-300)
    np.testing.assert_allclose(s.posterior_mean_coef_x0.numpy(), np.sqrt(a_prev) * b / (1 - a), rtol=1e-10)
    np.testing.assert_allclose(s.posterior_mean_coef_xt.numpy(), np.sqrt(1 - b) * (1 - a_prev) / (1 - a), rtol=1e-10)
    assert s.posterior_variance[0].item() == 0.0  # the first step is deterministic given x_0


@pytest.mark.parametrize("make", [lambda: NoiseSchedule.linear(1000), lambda: NoiseSchedule.cosine(1000)])
def test_posterior_consistency_identities(make):
    """Identities that any correct posterior must satisfy, independent of how its coefficients are written.

    1. Marginalising q(x_{t-1} | x_t, x_0) over q(x_t | x_0) gives q(x_{t-1} | x_0):
       c0 + ct sqrt(a_t) = sqrt(a_{t-1}) and ct^2 (1 - a_t) + beta-tilde_t = 1 - a_{t-1}.
    2. With x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, mu-tilde(x_t, x_0) equals Algorithm 2's
       1 / sqrt(alpha_t) (x_t - beta_t / sqrt(1 - a_t) eps).
    """
    s = make()
    a, a_prev = s.alphas_cumprod, s.alphas_cumprod_prev
    c0, ct, var = s.posterior_mean_coef_x0, s.posterior_mean_coef_xt, s.posterior_variance
    torch.testing.assert_close(c0 + ct * a.sqrt(), a_prev.sqrt(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ct**2 * (1 - a) + var, 1 - a_prev, rtol=1e-12, atol=1e-12)

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(s.num_timesteps, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(s.num_timesteps, 3, generator=g, dtype=torch.float64)
    t = torch.arange(s.num_timesteps)
    x_t = s.q_sample(x0, t, eps)
    mean = c0[:, None] * x0 + ct[:, None] * x_t
    alg2 = (x_t - (s.betas / (1 - a).sqrt())[:, None] * eps) / (1 - s.betas).sqrt()[:, None]
    torch.testing.assert_close(mean, alg2, rtol=1e-9, atol=1e-9)


def test_posterior_matches_diffusers_ddpm_scheduler():
    """diffusers' DDPMScheduler variances, with its float32 alphas_cumprod replaced by a float64 one (its float32
    1 - a_t / a_{t-1} loses ~4 digits at small t)."""
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    np.testing.assert_allclose(NoiseSchedule.linear(1000).alphas_cumprod.numpy(), ref.alphas_cumprod.numpy(), rtol=2e-5)
    ref.alphas_cumprod = torch.cumprod(1 - ref.betas.double(), dim=0)
    ref.one = torch.tensor(1.0, dtype=torch.float64)
    s = NoiseSchedule(ref.betas.double())
    small = torch.stack([ref._get_variance(t, variance_type="fixed_small") for t in range(1, 1000)])
    large = torch.stack([ref._get_variance(t, variance_type="fixed_large") for t in range(1000)])
    assert small.dtype == torch.float64
    np.testing.assert_allclose(s.posterior_variance.numpy()[1:], small.numpy(), rtol=1e-9)
    np.testing.assert_allclose(s.betas.numpy(), large.numpy(), rtol=1e-9)


# ---------------------------------------------------------------------------------------------- forward process
def test_q_sample_with_noise_is_the_formula():
    s = NoiseSchedule.linear(1000)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 500, 998, 999])
    a = torch.from_numpy(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))[t].reshape(5, 1, 1, 1)
    expected = a.sqrt() * x0 + (1 - a).sqrt() * noise
    torch.testing.assert_close(s.q_sample(x0, t, noise), expected, rtol=1e-13, atol=1e-13)
    # The working dtype is the input's: float32 in, float32 out.
    out32 = s.q_sample(x0.float(), t, noise.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, expected.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("t_value", [0, 300, 999])
def test_q_sample_statistics(t_value):
    """x_t | x_0 ~ N(sqrt(a_t) x_0, (1 - a_t)): empirical moments of 200k draws within 5 standard errors."""
    s = NoiseSchedule.linear(1000)
    n = 200_000
    x0 = torch.full((n,), 0.7, dtype=torch.float64)
    torch.manual_seed(1234)  # q_sample draws its own noise from the global RNG
    x_t = s.q_sample(x0, torch.full((n,), t_value))
    a = float(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t_value])
    mean, var = math.sqrt(a) * 0.7, 1 - a
    assert abs(x_t.mean().item() - mean) < 5 * math.sqrt(var / n)
    assert abs(x_t.var().item() - var) < 5 * var * math.sqrt(2 / n)


def test_to_cpu_copy():
    s = NoiseSchedule.cosine(100)
    c = s.to("cpu")
    assert c is not s and isinstance(c, NoiseSchedule)
    assert c.num_timesteps == 100
    for name, value in vars(s).items():
        if isinstance(value, torch.Tensor):
            other = getattr(c, name)
            assert other.device.type == "cpu" and other.dtype == torch.float64, name
            torch.testing.assert_close(other, value, rtol=0, atol=0)
    x0, t, noise = torch.ones(2, 1, 2, 2), torch.tensor([3, 90]), torch.zeros(2, 1, 2, 2)
    torch.testing.assert_close(c.q_sample(x0, t, noise), s.q_sample(x0, t, noise))
    assert "T=100" in repr(c)
