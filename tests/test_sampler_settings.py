"""SamplerSettings (src/diffusion/sampler_settings.py): one object, one set of names, from options to sampler."""

from __future__ import annotations

import inspect

import pytest
import torch

from src.diffusion.sampler_settings import FLAGS, SamplerSettings
from src.diffusion.samplers import sample
from src.diffusion.schedule import NoiseSchedule
from src.errors import ConfigError
from src.module import DiffusionModule


def test_field_names_are_the_sampler_arguments() -> None:
    # Every field except `options` is a keyword argument of samplers.sample, under the same name.
    parameters = inspect.signature(sample).parameters
    fields = [name for name in FLAGS if name != "options"]
    assert all(name in parameters for name in fields)
    assert SamplerSettings(sampler="heun", steps=9, options={"rho": 5.0}).kwargs() == {
        "sampler": "heun", "steps": 9, "eta": 0.0, "skip": "uniform", "variance": "fixed_small", "clip_x0": False,
        "rho": 5.0,
    }  # fmt: skip


def test_every_flag_is_a_module_option_with_the_same_default() -> None:
    # The one translation table: each field's flag names a DiffusionModule argument whose default is the field's.
    module_defaults = {k: p.default for k, p in inspect.signature(DiffusionModule).parameters.items()}
    settings = SamplerSettings()
    for name, flag in FLAGS.items():
        option = flag.removeprefix("--model.")
        assert option in module_defaults, flag
        default = module_defaults[option]
        assert (default or {}) == getattr(settings, name) if name == "options" else default == getattr(settings, name)


def test_from_options_reads_the_module_names() -> None:
    options = {"sampler": "dpmpp_2m", "sampling_steps": 20, "eta": 0.5, "skip": "logsnr",
               "ddpm_variance": "fixed_large", "clip_denoised": True, "sampler_options": None, "lr": 1.0}  # fmt: skip
    assert SamplerSettings.from_options(options) == SamplerSettings(
        sampler="dpmpp_2m", steps=20, eta=0.5, skip="logsnr", variance="fixed_large", clip_x0=True
    )
    assert SamplerSettings.from_options({}) == SamplerSettings()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sampler": "euler"}, "--model.sampler 'euler' is unknown"),
        ({"eta": 1.5}, r"--model.eta must be in \[0, 1\]"),
        ({"skip": "cubic"}, "--model.skip 'cubic' is unknown"),
        ({"variance": "big"}, "--model.ddpm_variance 'big' is unknown"),
        ({"steps": 0}, "--model.sampling_steps must be at least 1"),
        ({"sampler": "ddim", "options": {"rho": 7}}, "--model.sampler_options apply to"),
        ({"sampler": "heun", "options": {"rhoo": 7}}, "--model.sampler_options: unknown rhoo"),
    ],
)
def test_bad_settings_name_the_flag(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SamplerSettings(**changes)


def test_replace_and_steps_check() -> None:
    settings = SamplerSettings(steps=10)
    assert settings.replace(steps=3).steps == 3 and settings.steps == 10
    with pytest.raises(TypeError, match="unknown sampler setting"):
        settings.replace(sampling_steps=3)
    with pytest.raises(ConfigError, match=r"--model.sampling_steps must be in \[1, 5\]"):
        settings.check_steps(5)


def test_kwargs_run_the_sampler() -> None:
    schedule = NoiseSchedule.linear(50)
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))

    def model(x, t):
        return 0.1 * x

    settings = SamplerSettings(sampler="ddim", steps=5)
    expected = sample(model, x_T, schedule, sampler="ddim", steps=5)
    assert torch.equal(sample(model, x_T, schedule, **settings.kwargs()), expected)
