"""Dynamic thresholding of x_0-hat (Saharia et al. 2022, Imagen, section 2.3): the pure function against diffusers'
`DDPMScheduler._threshold_sample`, the samplers that use it (discrete, continuous, the variational bound) against
diffusers' DDIM and against the static clip, and its command-line flags."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from src.diffusion.continuous import DiscreteVPDenoiser, karras_sigmas
from src.diffusion.guidance import classifier_free_guidance
from src.diffusion.k_samplers import sample_heun
from src.diffusion.likelihood import vb_terms
from src.diffusion.parameterization import (
    DynamicThreshold,
    dynamic_threshold,
    prediction_from_eps,
    threshold_x0,
)
from src.diffusion.sampler_settings import SamplerSettings, x0_clip
from src.diffusion.samplers import ddim_sample, sample
from src.diffusion.schedule import NoiseSchedule
from src.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
COND = str(REPO / "configs" / "fashion_mnist_cond.yaml")
T = 1000


def _wide_x0(dtype: torch.dtype) -> torch.Tensor:
    """x_0-hat of 5 samples of 2 x 6 x 6 whose spread differs per sample: the percentile is below 1 for the first
    (s clamped to 1: the static clip), between 1 and 1.5 for one, and above 3 for the widest."""
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.3, 0.8, 1.5, 2.5, 6.0], dtype=torch.float64).reshape(-1, 1, 1, 1)
    return (scale * torch.randn(5, 2, 6, 6, generator=g, dtype=torch.float64)).to(dtype)


def _diffusers_threshold(x0: torch.Tensor, percentile: float, max_value: float | None) -> torch.Tensor:
    diffusers = pytest.importorskip("diffusers")
    options = {} if max_value is None else {"sample_max_value": max_value}
    scheduler = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=percentile, **options)
    return scheduler._threshold_sample(x0)


# ------------------------------------------------------------------------------------------------ the function
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("max_value", [1.5, 3.0])
@pytest.mark.parametrize("percentile", [0.5, 0.9, 0.995, 1.0])
def test_dynamic_threshold_equals_diffusers(dtype: torch.dtype, max_value: float, percentile: float) -> None:
    x0 = _wide_x0(dtype)
    ours = dynamic_threshold(x0, percentile, max_value)
    reference = _diffusers_threshold(x0, percentile, max_value)
    assert ours.dtype == dtype and ours.shape == x0.shape
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-7)
    assert ours.abs().max() <= 1.0
    # Not the static clip: the wide samples are divided by an s > 1.
    assert not torch.allclose(ours, x0.clamp(-1, 1))


def test_dynamic_threshold_by_hand() -> None:
    """One sample written out: s = the p-quantile of |x_0| (linear interpolation), clamped to [1, max]."""
    x0 = torch.tensor([[-4.0, -2.0, 0.5, 1.0, 3.0]], dtype=torch.float64)  # |x0| sorted: 0.5 1 2 3 4
    # p = 0.75: position 0.75 * 4 = 3, s = 3; clip to [-3, 3] and divide by 3.
    expected = torch.tensor([[-1.0, -2 / 3, 0.5 / 3, 1 / 3, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(dynamic_threshold(x0, 0.75), expected, rtol=0, atol=1e-15)
    # max_value 2: s = 2.
    torch.testing.assert_close(dynamic_threshold(x0, 0.75, 2.0), (x0.clamp(-2, 2) / 2), rtol=0, atol=0)
    # p = 0.125: position 0.5, s = 0.75, raised to 1: the static clip.
    assert torch.equal(dynamic_threshold(x0, 0.125), x0.clamp(-1, 1))


def test_max_value_1_is_the_static_clip_as_diffusers_default() -> None:
    """diffusers' default sample_max_value = 1 clamps s to [1, 1]: its "dynamic" thresholding is the static clip."""
    x0 = _wide_x0(torch.float32)
    assert torch.equal(dynamic_threshold(x0, 0.995, 1.0), x0.clamp(-1, 1))
    assert torch.equal(_diffusers_threshold(x0, 0.995, None), x0.clamp(-1, 1))


def test_threshold_x0_chooses_none_static_or_dynamic() -> None:
    x0 = _wide_x0(torch.float64)
    assert threshold_x0(x0, False) is x0
    assert torch.equal(threshold_x0(x0, True), x0.clamp(-1, 1))
    assert torch.equal(threshold_x0(x0, DynamicThreshold(0.9, 3.0)), dynamic_threshold(x0, 0.9, 3.0))
    # Half precision: the quantile is taken in float32 and the result cast back (as diffusers does).
    half = x0.to(torch.bfloat16)
    out = threshold_x0(half, DynamicThreshold(0.9, 3.0))
    assert out.dtype == torch.bfloat16 and torch.equal(out, dynamic_threshold(half.float(), 0.9, 3.0).bfloat16())


@pytest.mark.parametrize(("percentile", "max_value"), [(0.0, None), (1.5, None), (99.5, None), (0.9, 0.5)])
def test_bad_threshold_raises(percentile: float, max_value: float | None) -> None:
    with pytest.raises(ValueError):
        DynamicThreshold(percentile, max_value)


# ------------------------------------------------------------------------------------------------ in the samplers
def _schedule() -> NoiseSchedule:
    return NoiseSchedule.linear(T)


class ToyConditional:
    """eps(x, t, y) whose x_0-hat leaves [-1, 1] more the more the label is guided (s eps_c + (1 - s) eps_u grows
    with s); counts its calls."""

    num_classes = 3

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x, t, y):
        self.calls += 1
        shape = (-1,) + (1,) * (x.ndim - 1)
        yy = y.to(x.dtype).reshape(shape)
        tt = t.to(x.dtype).reshape(shape) / T
        return 0.6 * torch.tanh(x) + 0.4 * (yy - 1.0) * (1.0 - tt) * torch.cos(3 * x)


def _x_T(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(4, 2, 6, 6, generator=torch.Generator().manual_seed(3), dtype=dtype)


LABELS = torch.tensor([0, 1, 2, 0])


@pytest.mark.parametrize(
    ("sampler", "extra"),
    [("ddim", {"steps": 20}), ("ddpm_respaced", {"steps": 20}), ("dpmpp_2m", {"steps": 10, "skip": "logsnr"}),
     ("heun", {"steps": 8}), ("unipc", {"steps": 8})],
)  # fmt: skip
def test_dynamic_thresholding_at_high_guidance_differs_from_static_and_stays_in_range(sampler: str, extra) -> None:
    guided = classifier_free_guidance(ToyConditional(), LABELS, guidance_scale=5.0)
    x_T = _x_T()
    generator = torch.Generator().manual_seed(4)

    def run(clip):
        return sample(guided, x_T, _schedule(), sampler=sampler, clip_x0=clip, generator=generator, **extra)

    unclipped, static = run(False), run(True)
    dynamic = run(DynamicThreshold(0.995, 3.0))
    assert unclipped.abs().max() > 1.5  # high guidance drives the unclipped samples out of the data range
    assert static.abs().max() <= 1.0 + 1e-6 and dynamic.abs().max() <= 1.0 + 1e-6
    assert (dynamic - static).abs().max() > 0.05
    # Fewer saturated pixels than the static clip: dynamic thresholding "pushes saturated pixels inwards".
    assert (dynamic.abs() > 0.999).float().mean() < (static.abs() > 0.999).float().mean()


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "edm"])
@pytest.mark.parametrize("sampler", ["ddim", "heun"])
def test_every_step_sees_the_thresholded_x0_whatever_the_net_predicts(prediction: str, sampler: str) -> None:
    """A net in the x0 or v parameterisation samples like its eps twin, and every x_0-hat the sampler forms (the
    callback's x0 / denoised) is the thresholded one, in [-1, 1]."""
    schedule = _schedule()
    guided = classifier_free_guidance(ToyConditional(), LABELS, guidance_scale=5.0)

    def net(x, t):  # the guided eps expressed in `prediction`, at integer t (heun rounds t: quantize)
        return prediction_from_eps(prediction, guided(x, t), x, schedule, t.long())

    clip = DynamicThreshold(0.995, 3.0)
    x0s: list[torch.Tensor] = []
    x_T = _x_T()
    if sampler == "ddim":
        out = sample(net, x_T, schedule, sampler="ddim", steps=10, clip_x0=clip, prediction=prediction)
        reference = ddim_sample(guided, x_T, schedule, steps=10, clip_x0=clip,
                                callback=lambda state: x0s.append(state["x0"]))  # fmt: skip
    else:
        out = sample(net, x_T, schedule, sampler="heun", steps=6, clip_x0=clip, prediction=prediction, quantize=True)
        denoiser = DiscreteVPDenoiser(guided, schedule, quantize=True, clip_x0=clip)
        x = x_T * math.sqrt(1.0 + denoiser.sigma_max**2)
        sigmas = karras_sigmas(6, denoiser.sigma_min, denoiser.sigma_max)
        reference = sample_heun(denoiser, x, sigmas, callback=lambda state: x0s.append(state["denoised"]))
    torch.testing.assert_close(out, reference, rtol=1e-9, atol=1e-9)
    assert len(x0s) > 3 and all(x0.abs().max() <= 1.0 for x0 in x0s)


def test_ddim_dynamic_thresholding_matches_diffusers() -> None:
    """DDIM with dynamic thresholding and eps re-derived from the thresholded x_0 is diffusers' DDIMScheduler with
    thresholding=True and use_clipped_model_output=True, step for step (float64 constants)."""
    diffusers = pytest.importorskip("diffusers")
    percentile, max_value = 0.95, 2.0
    sched = diffusers.DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                    clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading", steps_offset=0,
                                    thresholding=True, dynamic_thresholding_ratio=percentile,
                                    sample_max_value=max_value)  # fmt: skip
    sched.alphas_cumprod = torch.cumprod(1 - sched.betas.double(), dim=0)
    sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    schedule = NoiseSchedule(sched.betas.double())
    sched.set_timesteps(25)
    guided = classifier_free_guidance(ToyConditional(), LABELS, guidance_scale=5.0)
    x_T = _x_T()
    x = x_T
    for t in sched.timesteps:
        eps = guided(x, torch.full((x.shape[0],), int(t)))
        x = sched.step(eps, int(t), x, eta=0.0, use_clipped_model_output=True).prev_sample
    ours = ddim_sample(guided, x_T, schedule, steps=25, clip_x0=DynamicThreshold(percentile, max_value))
    static = ddim_sample(guided, x_T, schedule, steps=25, clip_x0=True)
    torch.testing.assert_close(ours, x, rtol=1e-10, atol=1e-10)
    assert (ours - static).abs().max() > 0.05


def test_the_variational_bound_thresholds_x0_as_the_samplers_do() -> None:
    schedule = NoiseSchedule.linear(50)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([5, 20, 40])

    def model(x, t):  # x_0-hat = x_t (1 + 2 sqrt(1 - a_t)) / sqrt(a_t): beyond [-1, 1] at large t
        return -2.0 * x

    unclipped, static = (vb_terms(model, x0, t, schedule, noise, clip_x0=clip) for clip in (False, True))
    dynamic = vb_terms(model, x0, t, schedule, noise, clip_x0=DynamicThreshold(0.9, 2.0))
    # The same bound from a net whose own eps implies the thresholded x_0-hat (eps re-derived from it, as the
    # samplers do), evaluated without any clipping.
    a = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_t = schedule.q_sample(x0, t, noise)
    x0_hat = (x_t - (1 - a).sqrt() * model(x_t.float(), t).double()) / a.sqrt()
    thresholded = dynamic_threshold(x0_hat, 0.9, 2.0)
    eps = (x_t - a.sqrt() * thresholded) / (1 - a).sqrt()
    torch.testing.assert_close(dynamic, vb_terms(lambda x, t: eps, x0, t, schedule, noise), rtol=1e-9, atol=1e-9)
    # t = 5: x_0-hat stays in [-1, 1], nothing to bound; t = 20, 40: all three differ.
    assert (dynamic - static)[1:].abs().min() > 1e-3 and (dynamic - unclipped)[1:].abs().min() > 1e-3


# ------------------------------------------------------------------------------------------------ settings and flags
def test_settings_build_the_threshold_from_the_module_options() -> None:
    options = {"clip_denoised": True, "dynamic_threshold_percentile": 0.995, "dynamic_threshold_max": 1.5}
    settings = SamplerSettings.from_options(options)
    assert settings.clip_x0 == DynamicThreshold(0.995, 1.5)
    assert settings.kwargs()["clip_x0"] == DynamicThreshold(0.995, 1.5)
    # An export's JSON entry reads back to the same settings.
    assert SamplerSettings(**json.loads(json.dumps(settings.to_dict()))) == settings
    assert settings.replace(sampler="heun", skip="uniform").clip_x0 == DynamicThreshold(0.995, 1.5)
    assert SamplerSettings.from_options({"clip_denoised": True}).clip_x0 is True
    assert SamplerSettings.from_options({"clip_denoised": True, "dynamic_threshold_percentile": 0.99}).clip_x0 == (
        DynamicThreshold(0.99, None)
    )


@pytest.mark.parametrize(
    ("clip", "percentile", "max_value", "message"),
    [
        (True, None, 1.5, "--model.sampling.dynamic_threshold_max 1.5 bounds the dynamic threshold, which is off: pass "
                          "--model.sampling.dynamic_threshold_percentile too"),
        (False, 0.995, None, "--model.sampling.dynamic_threshold_percentile 0.995 chooses how --model.sampling.clip_denoised clips x_0, "
                             "and --model.sampling.clip_denoised is false: pass --model.sampling.clip_denoised true"),
        (True, 99.5, None, r"--model.sampling.dynamic_threshold_percentile must be in \(0, 1\] \(a fraction: 0.995"),
        (True, 0.0, None, r"--model.sampling.dynamic_threshold_percentile must be in \(0, 1\]"),
        (True, 0.995, 0.8, "--model.sampling.dynamic_threshold_max must be at least 1"),
    ],
)  # fmt: skip
def test_meaningless_threshold_options_are_one_line(clip, percentile, max_value, message) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        x0_clip(clip, percentile, max_value)
    assert "\n" not in str(error.value)


def test_predict_with_dynamic_thresholding_through_the_command_line(tmp_path: Path) -> None:
    """An untrained eps-net predicts eps ~ 0, so x_0-hat = x_t / sqrt(a_t) is far outside [-1, 1] (a v-net's x_0-hat
    would be ~ 0): the static clip and the dynamic threshold give different images."""
    from test_sample import TINY

    from src.main import cli_main

    def predict(out: str, *extra: str) -> list[bytes]:
        cli_main(["predict", "--config", COND, *TINY, "--allow_untrained", "true", "--data.num_samples", "3",
                  "--output_dir", str(tmp_path / out), "--trainer.default_root_dir", str(tmp_path / "runs"),
                  "--model.guidance.scale", "4.0", "--model.prediction", "eps", *extra])  # fmt: skip
        return [p.read_bytes() for p in sorted((tmp_path / out).iterdir())]

    static = predict("static")
    dynamic = predict(
        "dynamic", "--model.sampling.dynamic_threshold_percentile", "0.9", "--model.sampling.dynamic_threshold_max", "3"
    )
    assert len(dynamic) == 3 and dynamic != static
    with pytest.raises(ConfigError, match="--model.sampling.dynamic_threshold_max 2.0 bounds the dynamic threshold"):
        predict("bad", "--model.sampling.dynamic_threshold_max", "2")
    with pytest.raises(ConfigError, match="--model.sampling.clip_denoised is false"):
        predict(
            "bad", "--model.sampling.clip_denoised", "false", "--model.sampling.dynamic_threshold_percentile", "0.995"
        )
    assert not (tmp_path / "bad").exists()


def test_the_guidance_quality_benchmark_runs_valid_predict_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/guidance_quality.py's variants: every one is a valid command line (parsed and the model built),
    an interval only where there is guidance."""
    import runpy

    from src.main import cli_main

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # as python does for a script: it imports common.py
    bench = runpy.run_path(str(REPO / "benchmarks" / "guidance_quality.py"))
    grid = bench["variants"]([1.0, 3.0], ["none", "static", "0.995:1.5", "0.99"], ["none", "0.3:5"])
    assert len(grid) == 4 + 8 and all(interval == "none" for scale, _, interval, _ in grid if scale == 1.0)
    # Guides multiply the guided variants only: at s = 1 only the first runs.
    guides = bench["variants"]([1.0, 3.0], ["static"], ["none"], ["cfg", "weak.ckpt", "weaker.ckpt"])
    assert guides == [(1.0, "static", "none", "cfg")] + [(3.0, "static", "none", g) for g in ("cfg", "weak.ckpt",
                                                                                             "weaker.ckpt")]  # fmt: skip
    # A guide runs without classifier-free guidance, so a list of intervals does not multiply its runs.
    assert bench["variants"]([3.0], ["static"], ["none", "0.3:5"], ["cfg", "weak.ckpt"]) == [
        (3.0, "static", "none", "cfg"), (3.0, "static", "none", "weak.ckpt"), (3.0, "static", "0.3:5", "cfg")
    ]  # fmt: skip
    assert bench["predict_args"](3.0, "static", "none", "weak.ckpt")[-4:] == [
        "--model.guidance.model", "weak.ckpt", "--model.guidance.autoguidance_scale", "3.0"
    ]  # fmt: skip
    assert "--model.guidance.model" not in bench["predict_args"](1.0, "static", "none", "weak.ckpt")
    assert bench["predict_args"](3.0, "0.995:1.5", "0.3:5") == [
        "--model.guidance.scale", "3.0", "--model.sampling.clip_denoised", "true", "--model.sampling.dynamic_threshold_percentile",
        "0.995", "--model.sampling.dynamic_threshold_max", "1.5", "--model.guidance.interval", "[0.3, 5.0]",
    ]  # fmt: skip
    expected = {
        "none": False,
        "static": True,
        "0.995:1.5": DynamicThreshold(0.995, 1.5),
        "0.99": DynamicThreshold(0.99),
    }
    for scale, threshold, interval, _ in grid:
        cli = cli_main(["--config", COND, *bench["predict_args"](scale, threshold, interval), "--trainer.logger",
                        "false"], run=False)  # fmt: skip
        model = cli.model.model
        assert model.settings.clip_x0 == expected[threshold] and model.guidance_scale == scale
        assert model.guidance_interval == (None if interval == "none" else (0.3, 5.0))
