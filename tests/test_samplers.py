"""Samplers (src/diffusion/samplers.py) against independent references: the DDIM authors' reference code
(github.com/ermongroup/ddim, functions/denoising.py generalized_steps, copied in tests/reference_ddim.py),
diffusers' schedulers, DDPM's Algorithm 2 written out, and Gaussian data whose optimal denoiser and sampler output
distribution are known in closed form.

Everything runs in float64 on tiny shapes.
"""

import math

import numpy as np
import pytest
import torch

from src.diffusion.samplers import ddim_invert, ddim_sample, ddpm_sample, logsnr_timesteps, sample, timestep_sequence
from src.diffusion.schedule import NoiseSchedule

try:  # pytest puts tests/ on sys.path (rootdir-relative import when tests/ becomes a package)
    from reference_ddim import generalized_steps
except ImportError:  # pragma: no cover
    from tests.reference_ddim import generalized_steps

T = 1000
DTYPE = torch.float64


def numpy_alphas_cumprod(T=T):
    return np.cumprod(1 - np.linspace(1e-4, 0.02, T, dtype=np.float64))


def toy_model(x, t):
    """A smooth, deterministic, t-dependent denoiser. `t` may be int64 (ours) or float (the reference code)."""
    t = t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    w = 0.5 + 0.4 * torch.cos(t / 137.0)
    return torch.tanh(w * x + 0.2 * x.flip(-1)) * (1 + 0.3 * torch.sin(t / 50.0))


class GaussianEps:
    """The exact E[eps | x_t] for data x_0 ~ N(mu, diag(s^2)) (per dimension, along the last axis):

    x_t ~ N(sqrt(a) mu, a s^2 + 1 - a) and E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a).
    """

    def __init__(self, mu, s, alphas_cumprod, scale=1.0):
        self.mu = torch.as_tensor(mu, dtype=DTYPE)
        self.s = torch.as_tensor(s, dtype=DTYPE)
        self.a = torch.as_tensor(alphas_cumprod, dtype=DTYPE)
        self.scale = scale

    def __call__(self, x, t):
        a = self.a[t.long()].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return self.scale * (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.s**2 + 1 - a)


MU = np.array([0.5, -0.3, 0.0, 0.8])
S = np.array([0.3, 0.1, 0.5, 0.2])  # s = 0.1 is the hard case: the last steps of a coarse sampler are stiff there


def gaussian_model():
    return GaussianEps(MU, S, numpy_alphas_cumprod())


def ddpm_chain_moments(variance, mu=MU, s=S):
    """Exact mean and variance of DDPM Algorithm 2's output for Gaussian data and x_T ~ N(0, I), in numpy.

    x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - a_t) eps(x_t)) + sigma_t z with eps(x) = k_t (x - sqrt(a_t) mu)
    affine in x, so x_{t-1} = A x_t + B + sigma_t z and the moments follow m <- A m + B, v <- A^2 v + sigma_t^2.
    """
    betas = np.linspace(1e-4, 0.02, T)
    a = np.cumprod(1 - betas)
    a_prev = np.concatenate([[1.0], a[:-1]])
    m, v = np.zeros_like(mu), np.ones_like(s)
    for t in range(T - 1, -1, -1):
        k = np.sqrt(1 - a[t]) / (a[t] * s**2 + 1 - a[t])
        c = betas[t] / np.sqrt(1 - a[t])
        A = (1 - c * k) / np.sqrt(1 - betas[t])
        B = c * k * np.sqrt(a[t]) * mu / np.sqrt(1 - betas[t])
        sigma2 = 0.0 if t == 0 else ((1 - a_prev[t]) / (1 - a[t]) * betas[t] if variance == "fixed_small" else betas[t])
        m, v = A * m + B, A**2 * v + sigma2
    return m, v


def ddim_chain_moments(seq, eta, mu=MU, s=S):
    """Exact mean and variance of DDIM's output (eq. 12, sigma of eq. 16) for Gaussian data, x_T ~ N(0, I).

    For eta = 0 this is written in the variables of DDIM section 4.3: y = x / sqrt(a), sig = sqrt((1 - a) / a); the
    optimal eps is sig (y - mu) / (s^2 + sig^2) and DDIM is Euler's method on dy = eps d(sig), so
    y_prev - mu = (y - mu) (1 - (sig - sig_prev) sig / (s^2 + sig^2)).
    """
    a_all = numpy_alphas_cumprod()
    a_seq = [a_all[t] for t in seq]
    pairs = list(zip(reversed(a_seq), reversed([1.0] + a_seq[:-1])))
    if eta == 0:
        y_mean, y_var = 0.0, 1.0 / a_seq[-1]  # y_T = x_T / sqrt(a_T) with x_T ~ N(0, 1)
        factor = np.ones_like(mu)
        for a, a_prev in pairs:
            sig, sig_prev = math.sqrt((1 - a) / a), math.sqrt((1 - a_prev) / a_prev)
            factor = factor * (1 - (sig - sig_prev) * sig / (s**2 + sig**2))
        # y_0 = mu + (y_T - mu) * factor, and x_0 = y_0 since a_{-1} = 1.
        return mu + (y_mean - mu) * factor, y_var * factor**2
    m, v = np.zeros_like(mu), np.ones_like(s)
    for a, a_prev in pairs:
        k = math.sqrt(1 - a) / (a * s**2 + 1 - a)  # eps = k (x - sqrt(a) mu)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        c_eps = math.sqrt(1 - a_prev - sigma**2) - math.sqrt(a_prev) * math.sqrt(1 - a) / math.sqrt(a)
        A = math.sqrt(a_prev) / math.sqrt(a) + c_eps * k
        B = -c_eps * k * math.sqrt(a) * mu
        m, v = A * m + B, A**2 * v + sigma**2
    return m, v


def check_moments(x, mean, var, n_se=4.0):
    """Per-dimension sample mean and std of x (N, 1, 1, D) within n_se standard errors of the exact values."""
    n = x.shape[0]
    x = x.reshape(n, -1)
    std = np.sqrt(var)
    emp_mean, emp_std = x.mean(0).numpy(), x.std(0).numpy()
    np.testing.assert_array_less(np.abs(emp_mean - mean), n_se * std / math.sqrt(n))
    np.testing.assert_array_less(np.abs(emp_std - std), n_se * std / math.sqrt(2 * n))
    return emp_mean, emp_std


N_GAUSS = 20_000


pytestmark = pytest.mark.usefixtures("one_thread")


def gaussian_x_T(seed=0):
    return torch.randn(N_GAUSS, 1, 1, len(MU), generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


# ---------------------------------------------------------------------------------------------- timestep_sequence
@pytest.mark.parametrize(
    ("num_timesteps", "steps"), [(1000, 50), (1000, 100), (1000, 30), (1000, 1), (1000, 1000), (10, 3), (4000, 7)]
)
def test_uniform_sequence(num_timesteps, steps):
    seq = timestep_sequence(num_timesteps, steps, "uniform")
    assert seq == list(range(0, num_timesteps, num_timesteps // steps))
    assert all(type(t) is int for t in seq)
    if num_timesteps % steps == 0:
        assert len(seq) == steps
    # When steps does not divide T there are more entries than steps, as in the reference code.
    assert len(timestep_sequence(1000, 30)) == 31 and len(timestep_sequence(1000, 300)) == 334


@pytest.mark.parametrize(("num_timesteps", "steps"), [(1000, 10), (1000, 50), (1000, 100), (4000, 20), (1000, 1)])
def test_quad_sequence_is_the_seed_formula(num_timesteps, steps):
    seq = np.linspace(0, np.sqrt(num_timesteps * 0.8), steps) ** 2
    assert timestep_sequence(num_timesteps, steps, "quad") == [int(s) for s in list(seq)]
    assert timestep_sequence(1000, 10, "quad") == [0, 9, 39, 88, 158, 246, 355, 483, 632, 800]


@pytest.mark.parametrize("skip", ["trailing", "linspace"])
def test_trailing_and_linspace_match_diffusers(skip):
    diffusers = pytest.importorskip("diffusers")
    for num_timesteps in (1000, 37):
        sched = diffusers.DDIMScheduler(num_train_timesteps=num_timesteps, timestep_spacing=skip, steps_offset=0)
        for steps in range(1, num_timesteps + 1):
            sched.set_timesteps(steps)
            seq = timestep_sequence(num_timesteps, steps, skip)
            # diffusers' float arange can yield one entry too many, rounded to -1 (e.g. T=1000, steps=463): not a
            # timestep. A correct sequence is diffusers' without it.
            assert seq == sorted(t for t in sched.timesteps.tolist() if t >= 0), (num_timesteps, steps)


@pytest.mark.parametrize("num_timesteps", [1000, 37, 4000])
def test_trailing_and_linspace_properties(num_timesteps):
    for steps in range(1, num_timesteps + 1, 7 if num_timesteps > 1000 else 1):
        trailing = timestep_sequence(num_timesteps, steps, "trailing")
        assert trailing[-1] == num_timesteps - 1
        assert len(trailing) == steps and trailing == sorted(set(trailing)) and trailing[0] >= 0
        linspace = timestep_sequence(num_timesteps, steps, "linspace")
        assert len(linspace) == steps and linspace == sorted(set(linspace)) and linspace[0] == 0
        assert steps == 1 or linspace[-1] == num_timesteps - 1


@pytest.mark.parametrize("skip", ["uniform", "quad", "trailing", "linspace"])
def test_ddim_calls_the_model_with_valid_timesteps_only(skip):
    """One model evaluation per timestep of the sequence, all in [0, T) (T=1000, steps=61 is a case where a float
    arange gives the trailing sequence a 62nd entry, -1)."""
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    for steps in (61, 50, 463):
        seen.clear()
        ddim_sample(model, torch.zeros(1, 1, 2, 2, dtype=DTYPE), NoiseSchedule.linear(T), steps=steps, skip=skip)
        ts = torch.cat(seen)
        assert ts.dtype == torch.int64 and int(ts.min()) >= 0 and int(ts.max()) < T, (skip, steps)
        assert len(seen) == len(timestep_sequence(T, steps, skip))
        if skip != "uniform":
            assert len(seen) == steps, (skip, steps)


def test_uniform_equals_diffusers_leading_when_steps_divide_T():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing="leading", steps_offset=0)
    for steps in (1, 2, 10, 20, 50, 100, 125, 250, 500, 1000):
        sched.set_timesteps(steps)
        assert timestep_sequence(1000, steps, "uniform") == sorted(sched.timesteps.tolist())


@pytest.mark.parametrize("steps", [0, -1, 1001])
def test_steps_out_of_range_raise(steps):
    with pytest.raises(ValueError, match=r"steps must be in \[1, 1000\]"):
        timestep_sequence(1000, steps)


def test_unknown_skip_raises():
    with pytest.raises(ValueError, match=r"unknown skip 'cubic'.*uniform.*quad"):
        timestep_sequence(1000, 10, "cubic")


# ------------------------------------------------------------------------ DDIM vs the authors' generalized_steps
@pytest.mark.parametrize(
    ("skip", "steps"), [("uniform", 50), ("uniform", 30), ("uniform", 1), ("quad", 10), ("quad", 100)]
)
@pytest.mark.parametrize("model_name", ["toy", "gaussian"])
def test_ddim_eta0_matches_reference_generalized_steps(skip, steps, model_name):
    schedule = NoiseSchedule.linear(T)
    model = toy_model if model_name == "toy" else gaussian_model()
    x_T = torch.randn(3, 1, 2, 4, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    seq = timestep_sequence(T, steps, skip)
    xs, _ = generalized_steps(x_T, seq, model, schedule.betas, eta=0)
    ref = xs[-1]
    assert ref.dtype == DTYPE
    ours = ddim_sample(model, x_T, schedule, steps=steps, eta=0.0, skip=skip)
    rel = ((ours - ref).norm() / ref.norm()).item()
    assert rel < 1e-5
    assert rel < 1e-10  # in float64 both compute the same expression; measured ~1e-15
    # An explicit timesteps= sequence is the same as skip=.
    explicit = ddim_sample(model, x_T, schedule, timesteps=seq, eta=0.0)
    torch.testing.assert_close(explicit, ours, rtol=0, atol=0)


def test_ddim_eta_positive_matches_reference_on_uniform_sequence():
    """With noise from the global RNG in both, eta > 0 matches too: the reference draws at every step, ours only where
    sigma > 0, but on a uniform sequence sigma = 0 only at the very last step, so the draws line up."""
    schedule = NoiseSchedule.linear(T)
    x_T = torch.randn(2, 1, 2, 3, generator=torch.Generator().manual_seed(4), dtype=DTYPE)
    seq = timestep_sequence(T, 20, "uniform")
    torch.manual_seed(99)
    ref = generalized_steps(x_T, seq, toy_model, schedule.betas, eta=0.5)[0][-1]
    torch.manual_seed(99)
    ours = ddim_sample(toy_model, x_T, schedule, steps=20, eta=0.5)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------- DDIM vs diffusers
def float64_diffusers_ddim():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(
        num_train_timesteps=T,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing="leading",
        steps_offset=0,
    )
    # diffusers keeps float32 constants; recompute them in float64 from its own (float32) betas.
    sched.alphas_cumprod = torch.cumprod(1 - sched.betas.double(), dim=0)
    sched.final_alpha_cumprod = torch.tensor(1.0, dtype=DTYPE)
    return sched, NoiseSchedule(sched.betas.double())


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_matches_diffusers_scheduler(eta):
    sched, schedule = float64_diffusers_ddim()
    sched.set_timesteps(50)
    x_T = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(5), dtype=DTYPE)
    g = torch.Generator().manual_seed(6)
    x = x_T
    for t in sched.timesteps:
        x = sched.step(toy_model(x, torch.full((x.shape[0],), int(t))), int(t), x, eta=eta, generator=g).prev_sample
    ours = ddim_sample(toy_model, x_T, schedule, steps=50, eta=eta, generator=torch.Generator().manual_seed(6))
    assert x.dtype == DTYPE
    torch.testing.assert_close(ours, x, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_with_clipping_matches_diffusers_clipped_model_output(eta):
    # A model whose x_0 prediction leaves [-1, 1]: clipping then changes x_0, and eps is re-derived from it
    # (ADM's ddim_sample; diffusers' clip_sample=True with use_clipped_model_output=True).
    sched, schedule = float64_diffusers_ddim()
    sched.config.clip_sample = True  # clip_sample_range stays 1.0
    sched.set_timesteps(50)

    def wide_model(x, t):
        return 0.3 * toy_model(x, t) - 0.5 * x

    x_T = 3.0 * torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(5), dtype=DTYPE)
    g = torch.Generator().manual_seed(6)
    x = x_T
    clipped_steps = 0
    for t in sched.timesteps:
        eps = wide_model(x, torch.full((x.shape[0],), int(t)))
        a_t = float(sched.alphas_cumprod[int(t)])
        clipped_steps += bool(((x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)).abs().max() > 1)
        x = sched.step(eps, int(t), x, eta=eta, generator=g, use_clipped_model_output=True).prev_sample
    ours = ddim_sample(wide_model, x_T, schedule, steps=50, eta=eta, clip_x0=True,
                       generator=torch.Generator().manual_seed(6))  # fmt: skip
    assert clipped_steps > 10  # the test exercises clipping
    torch.testing.assert_close(ours, x, rtol=1e-10, atol=1e-10)


def test_ddim_matches_float32_diffusers_scheduler():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(
        num_train_timesteps=T,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing="leading",
        steps_offset=0,
    )
    sched.set_timesteps(50)
    x_T = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(5))
    x = x_T
    for t in sched.timesteps:
        x = sched.step(toy_model(x, torch.full((x.shape[0],), int(t))), int(t), x, eta=0.0).prev_sample
    ours = ddim_sample(toy_model, x_T, NoiseSchedule.linear(T), steps=50)
    assert ours.dtype == torch.float32
    assert ((ours - x).norm() / x.norm()).item() < 1e-5


# ---------------------------------------------------------------------------------------------- DDPM
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_is_algorithm_2(variance):
    """Three steps of DDPM Algorithm 2 written out, with the noise drawn in the sampler's order (t = 2, 1)."""
    betas = np.array([0.1, 0.3, 0.6])
    alphas = 1 - betas
    a = np.cumprod(alphas)
    schedule = NoiseSchedule(torch.tensor(betas))
    x_T = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(7), dtype=DTYPE)
    g = torch.Generator().manual_seed(8)
    x = x_T
    for t in (2, 1, 0):
        eps = toy_model(x, torch.full((2,), t))
        x = (x - betas[t] / math.sqrt(1 - a[t]) * eps) / math.sqrt(alphas[t])
        if t > 0:
            sigma2 = betas[t] * (1 - a[t - 1]) / (1 - a[t]) if variance == "fixed_small" else betas[t]
            z = torch.randn(x.shape, generator=g, dtype=DTYPE)
            x = x + math.sqrt(sigma2) * z
    ours = ddpm_sample(toy_model, x_T, schedule, variance=variance, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(ours, x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_matches_diffusers_scheduler(variance):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(
        num_train_timesteps=T,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        clip_sample=False,
        variance_type=variance,
    )
    sched.alphas_cumprod = torch.cumprod(1 - sched.betas.double(), dim=0)
    sched.one = torch.tensor(1.0, dtype=DTYPE)
    schedule = NoiseSchedule(sched.betas.double())
    x_T = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(9), dtype=DTYPE)
    g = torch.Generator().manual_seed(10)
    x = x_T
    for t in sched.timesteps:
        x = sched.step(toy_model(x, torch.full((2,), int(t))), int(t), x, generator=g).prev_sample
    ours = ddpm_sample(toy_model, x_T, schedule, variance=variance, generator=torch.Generator().manual_seed(10))
    torch.testing.assert_close(ours, x, rtol=1e-9, atol=1e-9)


def test_ddim_eta1_full_sequence_is_ddpm_fixed_small():
    """DDIM eq. 16 with eta = 1 on tau = (0, ..., T-1) is DDPM with sigma_t^2 = beta-tilde_t, draw for draw."""
    schedule = NoiseSchedule.linear(T)
    x_T = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(11), dtype=DTYPE)
    ddim = ddim_sample(toy_model, x_T, schedule, steps=T, eta=1.0, generator=torch.Generator().manual_seed(12))
    ddpm = ddpm_sample(toy_model, x_T, schedule, "fixed_small", generator=torch.Generator().manual_seed(12))
    torch.testing.assert_close(ddim, ddpm, rtol=1e-10, atol=1e-10)
    # ... and the noise matters: another seed gives another sample.
    other = ddpm_sample(toy_model, x_T, schedule, "fixed_small", generator=torch.Generator().manual_seed(13))
    assert (other - ddpm).abs().max() > 1e-3


def test_callback_sees_every_step():
    schedule = NoiseSchedule.linear(T)
    seen = []
    x_T = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    out = ddim_sample(toy_model, x_T, schedule, steps=10, callback=seen.append)
    assert [d["t"] for d in seen] == list(range(900, -1, -100)) and [d["i"] for d in seen] == list(range(10))
    torch.testing.assert_close(seen[-1]["x"], out, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- argument checks
@pytest.mark.parametrize("eta", [-0.1, 1.5])
def test_eta_out_of_range_raises(eta):
    with pytest.raises(ValueError, match="eta"):
        ddim_sample(toy_model, torch.zeros(1, 1, 2, 2, dtype=DTYPE), NoiseSchedule.linear(T), steps=10, eta=eta)


@pytest.mark.parametrize("timesteps", [[10, 5], [0, 500, 499], [-1, 5], [0, 1000], []])
def test_bad_timesteps_raise(timesteps):
    x = torch.zeros(1, 1, 2, 2, dtype=DTYPE)
    with pytest.raises(ValueError, match="ascending"):
        ddim_sample(toy_model, x, NoiseSchedule.linear(T), timesteps=timesteps)
    with pytest.raises(ValueError, match="ascending"):
        ddim_invert(toy_model, x, NoiseSchedule.linear(T), timesteps=timesteps)


def test_unknown_ddpm_variance_raises():
    with pytest.raises(ValueError, match="unknown variance"):
        ddpm_sample(toy_model, torch.zeros(1, 1, 2, 2, dtype=DTYPE), NoiseSchedule.linear(T), variance="cubic")


# ---------------------------------------------------------------------------------------------- Gaussian data
def test_gaussian_chain_moments_are_close_to_the_data():
    """The exact output distributions of the samplers (computed in numpy) against the data N(MU, S^2): how good each
    sampler is with a perfect denoiser. Exact relative std errors (s = 0.3, 0.1, 0.5, 0.2):
    DDPM fixed_small -1.3%, -3.7%, -0.8%, -1.9% (it leaves out the c0^2 Var[x_0 | x_t] part of the true reverse
    variance), fixed_large +0.3%, +0.8%, +0.2%, +0.5%; DDIM eta=0 (Euler on the probability-flow ODE, stiff near t=0
    for small s) -20%, -44%, -13%, -27% at 20 steps, -8%, -22%, -6%, -12% at 50, -0.5%, -1.7%, -0.3%, -0.8% at 1000.
    """
    for variance, tol in (("fixed_small", 0.05), ("fixed_large", 0.01)):
        m, v = ddpm_chain_moments(variance)
        np.testing.assert_allclose(m, MU, atol=2e-3)
        np.testing.assert_allclose(np.sqrt(v), S, rtol=tol)
    previous = None
    for steps in (20, 50, 100, 1000):
        m, v = ddim_chain_moments(timestep_sequence(T, steps), 0.0)
        err = np.abs(np.sqrt(v) / S - 1)
        np.testing.assert_allclose(m, MU, atol=2e-3)  # the prior mismatch N(0, 1) vs q(x_T) biases by ~1e-3
        assert previous is None or (err < previous).all()
        previous = err
    assert (previous < 0.02).all()


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_gaussian_data(variance):
    model = gaussian_model()
    schedule = NoiseSchedule.linear(T)
    x = ddpm_sample(model, gaussian_x_T(), schedule, variance, generator=torch.Generator().manual_seed(1))
    m, v = ddpm_chain_moments(variance)
    _, emp_std = check_moments(x, m, v)
    # Loose checks against the data itself (the sampler's own bias is in test_gaussian_chain_moments_...).
    se = S / math.sqrt(N_GAUSS)
    np.testing.assert_array_less(np.abs(x.reshape(N_GAUSS, -1).mean(0).numpy() - MU), 4 * se + 2e-3)
    np.testing.assert_allclose(emp_std, S, rtol=0.06 if variance == "fixed_small" else 0.02)


@pytest.mark.parametrize(("steps", "eta"), [(50, 0.0), (100, 0.0), (100, 1.0), (200, 1.0), (50, 0.5)])
def test_ddim_gaussian_data(steps, eta):
    model = gaussian_model()
    schedule = NoiseSchedule.linear(T)
    x_T = gaussian_x_T()
    x = ddim_sample(model, x_T, schedule, steps=steps, eta=eta, generator=torch.Generator().manual_seed(2))
    m, v = ddim_chain_moments(timestep_sequence(T, steps), eta)
    check_moments(x, m, v)
    se = S / math.sqrt(N_GAUSS)
    np.testing.assert_array_less(np.abs(x.reshape(N_GAUSS, -1).mean(0).numpy() - MU), 4 * se + 2e-3)
    if eta == 0:
        # Deterministic and affine per dimension: x_0 = mu + (x_T / sqrt(a_T) - mu) * factor, checked sample by sample.
        a_last = numpy_alphas_cumprod()[timestep_sequence(T, steps)[-1]]
        factor = np.sqrt(v * a_last)
        expected = MU + (x_T.reshape(N_GAUSS, -1).numpy() / math.sqrt(a_last) - MU) * factor
        np.testing.assert_allclose(x.reshape(N_GAUSS, -1).numpy(), expected, rtol=1e-9, atol=1e-9)


def test_sampler_reproducibility():
    model = gaussian_model()
    schedule = NoiseSchedule.linear(T)
    x_T = gaussian_x_T()[:8]
    for fn in (
        lambda g: ddim_sample(model, x_T, schedule, steps=20, eta=1.0, generator=g),
        lambda g: ddpm_sample(model, x_T, schedule, generator=g),
    ):
        a = fn(torch.Generator().manual_seed(5))
        b = fn(torch.Generator().manual_seed(5))
        c = fn(torch.Generator().manual_seed(6))
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert (a - c).abs().max() > 1e-3
    # eta = 0 is deterministic and ignores the generator.
    torch.testing.assert_close(
        ddim_sample(model, x_T, schedule, steps=20, generator=torch.Generator().manual_seed(1)),
        ddim_sample(model, x_T, schedule, steps=20),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("steps", [50, 10])
def test_ddim_invert_matches_diffusers_inverse_scheduler(steps):
    """diffusers' DDIMInverseScheduler loop as its pipelines run it: eps = model(x_{t_prev}, t) at the target t."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMInverseScheduler(
        num_train_timesteps=T,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing="leading",
        steps_offset=0,
    )
    sched.alphas_cumprod = torch.cumprod(1 - sched.betas.double(), dim=0)
    sched.initial_alpha_cumprod = torch.tensor(1.0, dtype=DTYPE)
    schedule = NoiseSchedule(sched.betas.double())
    sched.set_timesteps(steps)
    x_0 = torch.randn(3, 1, 2, 3, generator=torch.Generator().manual_seed(14), dtype=DTYPE)
    x = x_0
    for t in sched.timesteps:
        x = sched.step(toy_model(x, torch.full((3,), int(t))), int(t), x).prev_sample
    ours = ddim_invert(toy_model, x_0, schedule, steps=steps)
    torch.testing.assert_close(ours, x, rtol=1e-10, atol=1e-10)


def test_ddim_invert_reconstructs_gaussian_data():
    """ddim_invert then ddim_sample (eta = 0, same steps) returns x_0; the error is the explicit-Euler mismatch and
    shrinks with the step size. Measured relative errors: 6.4e-2 at 50 steps, 1.7e-2 at 200 steps."""
    model = gaussian_model()
    schedule = NoiseSchedule.linear(T)
    g = torch.Generator().manual_seed(21)
    x0 = torch.as_tensor(MU) + torch.as_tensor(S) * torch.randn(2000, 1, 1, len(MU), generator=g, dtype=DTYPE)
    errors = {}
    for steps in (50, 200):
        x_T = ddim_invert(model, x0, schedule, steps=steps)
        # The encoding is (close to) the prior N(0, I).
        np.testing.assert_allclose(x_T.reshape(len(x0), -1).std(0).numpy(), 1.0, atol=0.25)
        rec = ddim_sample(model, x_T, schedule, steps=steps)
        errors[steps] = ((rec - x0).norm() / x0.norm()).item()
    assert errors[50] < 0.2
    assert errors[200] < 0.055
    assert errors[200] < errors[50] / 2


# ---------------------------------------------------------------------------------------------- review fixes
@pytest.mark.parametrize("schedule", [NoiseSchedule.linear(1000, 1e-4, 0.02), NoiseSchedule.cosine(1000)],
                         ids=["linear", "cosine"])  # fmt: skip
@pytest.mark.parametrize("steps", [1, 2, 5, 10, 20, 50, 100, 500, 1000])
def test_logsnr_spacing_gives_exactly_the_steps_asked_for(schedule: NoiseSchedule, steps: int) -> None:
    seq = logsnr_timesteps(schedule, steps)
    assert len(seq) == len(set(seq)) == steps and seq == sorted(seq) and 0 <= seq[0] and seq[-1] == 999


def test_logsnr_spacing_is_unchanged_where_nothing_collided() -> None:
    # The linear schedule's grids of 5 to 20 steps had no duplicate to move: the same timesteps as before.
    linear = NoiseSchedule.linear(1000, 1e-4, 0.02)
    assert logsnr_timesteps(linear, 5) == [0, 30, 302, 722, 999]
    assert logsnr_timesteps(linear, 10) == [0, 5, 22, 73, 202, 410, 603, 757, 886, 999]


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "ddpm_respaced"])
def test_per_sample_generators_make_each_sample_independent_of_its_batch(sampler: str) -> None:
    """One generator per sample: sample i's every noise draw comes from its own stream."""
    schedule = NoiseSchedule.linear(100, 1e-4, 0.02)

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.1 * x + 1e-3 * t[:, None, None, None]

    def generators(indices):
        return [torch.Generator().manual_seed(1000 + i) for i in indices]

    x_T = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    options = dict(sampler=sampler, steps=10, eta=1.0)
    whole = sample(model, x_T, schedule, generator=generators(range(5)), **options)
    parts = [sample(model, x_T[i : i + 2], schedule, generator=generators(range(i, i + 2)), **options)
             for i in (0, 2)] + [sample(model, x_T[4:], schedule, generator=generators([4]), **options)]  # fmt: skip
    assert torch.equal(whole, torch.cat(parts))
    # A single generator for the batch (the previous behaviour) does depend on the batch.
    shared = sample(model, x_T[2:4], schedule, generator=torch.Generator().manual_seed(0), **options)
    assert not torch.equal(shared, whole[2:4])
    with pytest.raises(ValueError, match="one generator per sample"):
        sample(model, x_T, schedule, generator=generators(range(4)), **options)
