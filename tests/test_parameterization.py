"""eps / x0 / v / EDM conversions (src/diffusion/parameterization.py): exact round trips in float64, targets, the wrapper."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from test_cli import _fit, _predict, needs_fashion_mnist

from src.diffusion.losses import l_simple
from src.diffusion.parameterization import (
    PREDICTIONS,
    EpsPredictor,
    eps_from_prediction,
    prediction_from_eps,
    training_target,
    x0_from_prediction,
)
from src.diffusion.schedule import NoiseSchedule

SCHEDULE = NoiseSchedule.linear(1000)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(16, 2, 3, 3, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(16, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.cat([torch.tensor([0, 999]), torch.randint(0, 1000, (14,), generator=g)])
    return x0, noise, t, SCHEDULE.q_sample(x0, t, noise)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_target_converts_back_to_eps_and_x0(prediction: str) -> None:
    x0, noise, t, x_t = _batch()
    target = training_target(prediction, x0, noise, SCHEDULE, t)
    torch.testing.assert_close(eps_from_prediction(prediction, target, x_t, SCHEDULE, t), noise, rtol=0, atol=1e-12)
    torch.testing.assert_close(x0_from_prediction(prediction, target, x_t, SCHEDULE, t), x0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_round_trip_through_eps(prediction: str) -> None:
    _, noise, t, x_t = _batch(1)
    out = torch.randn(x_t.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    eps = eps_from_prediction(prediction, out, x_t, SCHEDULE, t)
    torch.testing.assert_close(prediction_from_eps(prediction, eps, x_t, SCHEDULE, t), out, rtol=0, atol=1e-12)


def test_v_definition() -> None:
    """v = alpha eps - sigma x0 (Salimans & Ho 2022), and x_t, v are a rotation of (x0, eps)."""
    x0, noise, t, x_t = _batch(2)
    a = SCHEDULE.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    v = training_target("v", x0, noise, SCHEDULE, t)
    torch.testing.assert_close(v, a.sqrt() * noise - (1 - a).sqrt() * x0, rtol=0, atol=1e-14)
    torch.testing.assert_close(x_t.pow(2) + v.pow(2), x0.pow(2) + noise.pow(2), rtol=0, atol=1e-12)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_eps_predictor_wraps_an_oracle_and_keeps_extra_channels(prediction: str) -> None:
    x0, noise, t, x_t = _batch(4)
    extra = torch.full_like(x0, 0.25)

    def oracle(x, tt, y=None):
        assert torch.equal(x, x_t) and y == 7
        return torch.cat([training_target(prediction, x0, noise, SCHEDULE, tt), extra], dim=1)

    out = EpsPredictor(oracle, SCHEDULE, prediction)(x_t, t, y=7)
    torch.testing.assert_close(out[:, :2], noise, rtol=0, atol=1e-12)
    assert torch.equal(out[:, 2:], extra)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_l_simple_regresses_the_chosen_target(prediction: str) -> None:
    x0, noise, t, _ = _batch(5)
    perfect = l_simple(lambda x, tt: training_target(prediction, x0, noise, SCHEDULE, tt), x0, SCHEDULE, t, noise,
                       prediction=prediction)  # fmt: skip
    assert perfect.abs().max() < 1e-24
    zero = l_simple(lambda x, tt: torch.zeros_like(x), x0, SCHEDULE, t, noise, prediction=prediction)
    target = training_target(prediction, x0, noise, SCHEDULE, t)
    # float32 at least (bf16 nets), float64 for float64 inputs
    assert zero.dtype == torch.promote_types(target.dtype, torch.float32)
    torch.testing.assert_close(zero, target.pow(2).flatten(1).mean(1).to(zero.dtype))


def test_unknown_prediction_raises() -> None:
    with pytest.raises(ValueError, match="unknown prediction"):
        EpsPredictor(lambda x, t: x, SCHEDULE, "score")


def test_edm_is_karras_preconditioning_in_its_own_variables() -> None:
    """EDM's D(x~; s) = c_skip x~ + c_out F with Table 1's c_skip, c_out in the variance-exploding variables
    x~ = x_t / alpha, s = sigma / alpha (written here from the paper, independently of edm_coefficients): the target F
    gives x_0 back, and the unweighted F-loss is EDM's lambda(s) ||D - x_0||^2 with lambda = 1 / c_out^2."""
    from src.diffusion.parameterization import EDM_SIGMA_DATA

    x0, noise, t, x_t = _batch(3)
    alpha, sigma = SCHEDULE.alpha_sigma(t, x_t)
    x_tilde, s, sd = x_t / alpha, sigma / alpha, EDM_SIGMA_DATA
    c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt()
    target = training_target("edm", x0, noise, SCHEDULE, t)
    torch.testing.assert_close(c_skip * x_tilde + c_out * target, x0, rtol=0, atol=1e-12)
    guess = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    denoised = x0_from_prediction("edm", guess, x_t, SCHEDULE, t)
    torch.testing.assert_close(denoised, c_skip * x_tilde + c_out * guess, rtol=0, atol=1e-12)
    lam = (s**2 + sd**2) / (s * sd) ** 2
    torch.testing.assert_close((guess - target).square(), lam * (denoised - x0).square(), rtol=1e-9, atol=1e-12)


def test_edm_at_sigma_data_one_is_minus_v() -> None:
    from src.diffusion.parameterization import edm_coefficients

    x0, noise, t, x_t = _batch(5)
    alpha, sigma = SCHEDULE.alpha_sigma(t, x_t)
    c_skip, c_out = edm_coefficients(alpha, sigma, sigma_data=1.0)
    v = training_target("v", x0, noise, SCHEDULE, t)
    torch.testing.assert_close((x0 - c_skip * x_t) / c_out, -v, rtol=0, atol=1e-12)


@pytest.mark.slow
@needs_fashion_mnist
def test_an_edm_network_trains_and_predicts_through_the_cli(tmp_path) -> None:
    """`--model.prediction edm` with Min-SNR weighting fits and predicts; the checkpoint fixes the prediction."""
    ckpt = _fit(tmp_path / "runs", 2, "--model.prediction", "edm", "--model.training.loss_weighting", "min_snr")
    assert torch.load(ckpt, weights_only=False)["hyper_parameters"]["prediction"] == "edm"
    _predict(ckpt, tmp_path / "runs", tmp_path / "out")
    images = sorted((tmp_path / "out").glob("*.png"))
    assert len(images) == 5 and Image.open(images[0]).size == (28, 28)
