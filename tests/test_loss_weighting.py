"""Loss weightings of L_simple (src/diffusion/losses.py): Min-SNR-gamma (Hang et al. 2023) against diffusers'
training-script formula and against its definition as one x0-space loss; "none" leaves L_simple as it was."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_cli import _fit, needs_fashion_mnist

from src.diffusion.losses import LOSS_WEIGHTINGS, LogNormal, l_simple, loss_weighting, min_snr_weight
from src.diffusion.parameterization import training_target, x0_from_prediction
from src.diffusion.schedule import NoiseSchedule
from src.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_min_snr_closed_form() -> None:
    snr = torch.tensor([0.01, 1.0, 5.0, 10.0, 1e4], dtype=torch.float64)
    expected = {
        "x0": [0.01, 1.0, 5.0, 5.0, 5.0],
        "eps": [1.0, 1.0, 1.0, 0.5, 5e-4],
        "v": [0.01 / 1.01, 0.5, 5.0 / 6.0, 5.0 / 11.0, 5.0 / 10001.0],
        # EDM's F with sigma_data = 0.5: min(SNR, 5) / (4 + SNR).
        "edm": [0.01 / 4.01, 0.2, 5.0 / 9.0, 5.0 / 14.0, 5.0 / 10004.0],
    }
    for prediction, values in expected.items():
        weights = min_snr_weight(snr, prediction, gamma=5.0)
        torch.testing.assert_close(weights, torch.tensor(values, dtype=torch.float64), rtol=1e-12, atol=0)
    # A zero terminal SNR (SNR(T) = 0) weighs an eps error by 1, not 0 / 0.
    assert min_snr_weight(torch.zeros(1, dtype=torch.float64), "eps").item() == 1.0


def test_min_snr_matches_the_diffusers_training_script() -> None:
    """diffusers' examples/text_to_image/train_text_to_image.py: snr = compute_snr(scheduler, t), then
    min(snr, gamma), divided by snr for "epsilon" and by snr + 1 for "v_prediction" ("sample": as is)."""
    pytest.importorskip("diffusers")
    from diffusers.training_utils import compute_snr

    # compute_snr reads the scheduler's alphas_cumprod only; ours (float64) isolates the weighting formula from
    # float32 rounding of the schedule (at t = 0, 1 - alpha-bar = 1e-4 loses 4 digits in float32).
    schedule = NoiseSchedule.linear(1000, 1e-4, 0.02)
    t = torch.arange(1000)
    snr = compute_snr(SimpleNamespace(alphas_cumprod=schedule.alphas_cumprod), t)
    ours_snr = schedule.snr
    torch.testing.assert_close(ours_snr.float(), snr, rtol=1e-6, atol=0)
    for gamma in (1.0, 5.0):
        clamped = torch.stack([snr, gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
        reference = {"eps": clamped / snr, "v": clamped / (snr + 1), "x0": clamped}
        for prediction, expected in reference.items():
            weights = min_snr_weight(ours_snr, prediction, gamma=gamma)
            torch.testing.assert_close(weights.float(), expected, rtol=2e-5, atol=0)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "edm"])
def test_min_snr_is_one_x0_loss_in_each_target(prediction: str) -> None:
    """weight x ||target - output||^2 = min(SNR, gamma) x ||x_0 - x0_hat||^2 for the x0_hat the output implies."""
    torch.manual_seed(0)
    schedule = NoiseSchedule.cosine(1000)
    x0, noise = torch.randn(6, 3, 4, 4, dtype=torch.float64), torch.randn(6, 3, 4, 4, dtype=torch.float64)
    t = torch.tensor([0, 10, 200, 500, 900, 999])
    x_t = schedule.q_sample(x0, t, noise)
    output = torch.randn_like(x0)  # any network output
    target_error = (output - training_target(prediction, x0, noise, schedule, t)).pow(2).flatten(1).mean(1)
    x0_error = (x0_from_prediction(prediction, output, x_t, schedule, t) - x0).pow(2).flatten(1).mean(1)
    snr = schedule.snr[t]
    weighted = min_snr_weight(snr, prediction, gamma=5.0) * target_error
    torch.testing.assert_close(weighted, snr.clamp(max=5.0) * x0_error, rtol=1e-9, atol=0)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "edm"])
def test_l_simple_weighting(prediction: str) -> None:
    torch.manual_seed(0)
    schedule = NoiseSchedule.linear(1000)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    x0, noise = torch.randn(5, 1, 8, 8), torch.randn(5, 1, 8, 8)
    t = torch.tensor([0, 3, 100, 500, 999])

    def model(x, t):
        return net(x)

    # "none": L_simple as DDPM writes it, bit for bit.
    assert loss_weighting("none") is None
    x_t = schedule.q_sample(x0, t, noise)
    unweighted = (model(x_t, t) - training_target(prediction, x0, noise, schedule, t)).pow(2).flatten(1).mean(1)
    plain = l_simple(model, x0, schedule, t, noise, prediction=prediction, weighting=loss_weighting("none"))
    assert torch.equal(plain, unweighted)
    # "min_snr": each example times its weight; gradients flow to the net as usual.
    weighted = l_simple(model, x0, schedule, t, noise, prediction=prediction, weighting=loss_weighting("min_snr", 2.0))
    expected = plain * min_snr_weight(schedule.snr[t], prediction, gamma=2.0).float()
    torch.testing.assert_close(weighted, expected, rtol=1e-6, atol=0)
    weighted.mean().backward()
    assert net.weight.grad is not None and torch.isfinite(net.weight.grad).all()


def test_bad_weightings_are_one_clear_line() -> None:
    assert LOSS_WEIGHTINGS == ("none", "min_snr")
    with pytest.raises(
        ConfigError, match=r"^--model.training.loss_weighting 'minsnr' is unknown; choose one of none, min_snr, "
    ):
        loss_weighting("minsnr")
    with pytest.raises(ConfigError, match=r"--model.training.min_snr_gamma must be > 0"):
        loss_weighting("min_snr", 0.0)
    with pytest.raises(ConfigError, match=r"cannot import no_such_package"):
        loss_weighting("no_such_package.weights.fn")


# ---------------------------------------------------------------------------------------------- where t falls
def test_lognormal_levels_are_edm_s_distribution_on_the_schedule() -> None:
    """LogNormal maps u to the timestep of nearest log sigma_t: the same t as a brute-force search, and over a fine
    grid of u each t gets the probability scipy's normal gives ln sigma between the midpoints of its neighbours."""
    from scipy import stats

    schedule = NoiseSchedule.linear(1000, 1e-4, 0.02)
    dist = LogNormal(-1.2, 1.2)
    u = (torch.arange(200_000, dtype=torch.float64) + 0.5) / 200_000
    t = dist(u, schedule)
    log_sigma = 0.5 * torch.log((1 - schedule.alphas_cumprod) / schedule.alphas_cumprod)
    drawn = -1.2 + 1.2 * torch.special.ndtri(u)
    assert torch.equal(t[::97], (log_sigma[None, :] - drawn[::97, None]).abs().argmin(dim=1))
    edges = np.concatenate([[-np.inf], ((log_sigma[1:] + log_sigma[:-1]) / 2).numpy(), [np.inf]])
    expected = np.diff(stats.norm.cdf(edges, loc=-1.2, scale=1.2))
    counts = np.bincount(t.numpy(), minlength=1000) / len(u)
    np.testing.assert_allclose(counts, expected, atol=2e-5)
    assert t.dtype == torch.int64 and 80 <= int(t.median()) <= 95  # half the steps below sigma = exp(-1.2) = 0.30
    with pytest.raises(ConfigError, match="std must be > 0"):
        LogNormal(std=0)


@pytest.mark.slow
@needs_fashion_mnist
def test_a_timestep_distribution_trains_through_the_cli(tmp_path: Path, monkeypatch) -> None:
    """--model.timestep_distribution src.diffusion.losses.LogNormal: the training steps draw their t from it (seen by
    the network), the checkpoint records it and rebuilds it; with a vdm objective it is one line naming the fix."""
    from src.module import DiffusionModule

    seen: list[torch.Tensor] = []
    step = DiffusionModule.training_step

    def recording(self, batch, batch_idx):
        loss = step(self, batch, batch_idx)
        seen.append(self.last_t.clone())
        return loss

    monkeypatch.setattr(DiffusionModule, "training_step", recording)
    edm = ["--model.timestep_distribution", "src.diffusion.losses.LogNormal", "--model.timestep_distribution.std", "1"]
    ckpt = _fit(tmp_path / "edm", 3, *edm)
    drawn = torch.cat(seen)
    schedule = DiffusionModule.load_from_checkpoint(ckpt, map_location="cpu").process.schedule
    sigmas = ((1 - schedule.alphas_cumprod) / schedule.alphas_cumprod).sqrt()[drawn]
    assert len(drawn) == 24 and float(sigmas.log().mean()) == pytest.approx(-1.2, abs=0.6)  # 24 draws of N(-1.2, 1)
    hparams = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    assert hparams["timestep_distribution"] == {
        "class_path": "src.diffusion.losses.LogNormal", "init_args": {"mean": -1.2, "std": 1.0}
    }  # fmt: skip
    rebuilt = DiffusionModule.load_from_checkpoint(ckpt, map_location="cpu").timestep_distribution
    assert isinstance(rebuilt, LogNormal) and (rebuilt.mean, rebuilt.std) == (-1.2, 1.0)
    with pytest.raises(ConfigError, match="objective vdm draws its own continuous t") as error:
        _fit(tmp_path / "vdm", 1, *edm, "--model.training.objective", "vdm")
    assert "\n" not in str(error.value)
    # The part's own refusal, raised while jsonargparse instantiates it, reaches the user as that one line.
    with pytest.raises(ConfigError, match="--model.timestep_distribution LogNormal std must be > 0") as error:
        _fit(tmp_path / "bad", 1, "--model.timestep_distribution", "src.diffusion.losses.LogNormal",
             "--model.timestep_distribution.std", "0")  # fmt: skip
    assert "\n" not in str(error.value)
