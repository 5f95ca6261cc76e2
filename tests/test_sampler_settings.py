"""SamplerSettings (src/diffusion/sampler_settings.py): one object, one set of names, from options to sampler."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest
import torch

from src.diffusion.k_samplers import CONTINUOUS_OPTIONS
from src.diffusion.sampler_settings import FLAGS, SamplerSettings
from src.diffusion.samplers import OPTION_TYPES, sample
from src.diffusion.schedule import NoiseSchedule
from src.errors import ConfigError
from src.module import DiffusionModule

REPO = Path(__file__).resolve().parents[1]


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
    # Each field's flag names a field of DiffusionModule's sampling group whose default is the field's, and the flat
    # name a checkpoint recorded before the groups maps to that same field.
    from src.diffusion.sampler_settings import FLAT_NAMES
    from src.options import RENAMED, Sampling

    assert inspect.signature(DiffusionModule).parameters["sampling"].default == Sampling()
    settings, sampling = SamplerSettings(), Sampling()
    for name, flag in FLAGS.items():
        group, field = flag.removeprefix("--model.").split(".")
        assert group == "sampling" and RENAMED[FLAT_NAMES[name]] == (group, field), flag
        default = getattr(sampling, field)
        assert (default or {}) == getattr(settings, name) if name == "options" else default == getattr(settings, name)


def test_from_options_reads_the_module_names() -> None:
    options = {"sampler": "ddim", "sampling_steps": 20, "eta": 0.5, "skip": "logsnr",
               "ddpm_variance": "fixed_large", "clip_denoised": True, "sampler_options": None, "lr": 1.0}  # fmt: skip
    assert SamplerSettings.from_options(options) == SamplerSettings(
        sampler="ddim", steps=20, eta=0.5, skip="logsnr", variance="fixed_large", clip_x0=True
    )
    assert SamplerSettings.from_options({}) == SamplerSettings()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sampler": "euler"}, "--model.sampling.sampler 'euler' is unknown"),
        ({"eta": 1.5}, r"--model.sampling.eta must be in \[0, 1\]"),
        ({"skip": "cubic"}, "--model.sampling.skip 'cubic' is unknown"),
        ({"variance": "big"}, "--model.sampling.variance 'big' is unknown"),
        ({"steps": 0}, "--model.sampling.steps must be at least 1"),
        (
            {"sampler": "ddim", "options": {"rho": 7}},
            "--model.sampling.sampler ddim does not read --model.sampling.options rho",
        ),
        ({"sampler": "ddim", "options": {"rhoo": 7}}, "--model.sampling.options: unknown rhoo"),
        ({"sampler": "heun", "options": {"rhoo": 7}}, "--model.sampling.options: unknown rhoo"),
        ({"sampler": "unipc", "options": {"solver_order": 2.5}}, "solver_order: 2.5 is not a whole number"),
        ({"sampler": "heun", "options": {"quantize": 2}}, "quantize: 2 is not true or false"),
        ({"sampler": "heun", "options": {"churn": True}}, "churn: True is not a number"),
        ({"sampler": "pc", "options": {"corrector_steps": "one"}}, "corrector_steps: 'one' is not a whole number"),
    ],
)
def test_bad_settings_name_the_flag(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SamplerSettings(**changes)


def test_options_are_read_as_their_types() -> None:
    """A switch is a bool, a count an int, the rest floats, whichever way YAML wrote them (`{quantize: 1}` was the
    only spelling that parsed before options were typed, so it still means true)."""
    settings = SamplerSettings(sampler="heun", options={"quantize": 1, "churn": 2, "rho": 5})
    assert settings.options == {"quantize": True, "churn": 2.0, "rho": 5.0}
    assert [type(v) for v in settings.options.values()] == [bool, float, float]
    settings = SamplerSettings(sampler="unipc", options={"solver_order": 3.0, "quantize": False})
    assert settings.options == {"solver_order": 3, "quantize": False} and type(settings.options["solver_order"]) is int
    assert set(CONTINUOUS_OPTIONS) <= set(OPTION_TYPES)  # every option a continuous sampler reads has a type
    own = SamplerSettings(sampler="my_extensions.denoise_once", options={"anything": 0.5})  # a sampler of one's own
    assert own.options == {"anything": 0.5}


def test_replace_and_steps_check() -> None:
    settings = SamplerSettings(steps=10)
    assert settings.replace(steps=3).steps == 3 and settings.steps == 10
    with pytest.raises(TypeError, match="unknown sampler setting"):
        settings.replace(sampling_steps=3)
    with pytest.raises(ConfigError, match=r"--model.sampling.steps must be in \[1, 5\]"):
        settings.check_steps(5)


def test_kwargs_run_the_sampler() -> None:
    schedule = NoiseSchedule.linear(50)
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))

    def model(x, t):
        return 0.1 * x

    settings = SamplerSettings(sampler="ddim", steps=5)
    expected = sample(model, x_T, schedule, sampler="ddim", steps=5)
    assert torch.equal(sample(model, x_T, schedule, **settings.kwargs()), expected)


# ------------------------------------------------------------------------------------------------ per-sampler options
@pytest.mark.parametrize(
    ("settings", "message"),
    [
        # The case: DPM-Solver++(3M) has no order to choose; it ran 3M unchanged.
        (
            {"sampler": "dpmpp_3m", "options": {"solver_order": 2}},
            "--model.sampling.sampler dpmpp_3m does not read --model.sampling.options solver_order (read by unipc, ipndm): pass "
            "--model.sampling.options without solver_order, or choose a sampler that reads it; dpmpp_3m takes "
            "--model.sampling.steps, --model.sampling.clip_denoised, --model.sampling.options {rho, quantize}",
        ),
        ({"sampler": "heun", "options": {"snr": 0.1}}, "does not read --model.sampling.options snr (read by pc)"),
        ({"sampler": "pc", "options": {"churn": 10}}, "does not read --model.sampling.options churn (read by heun)"),
        (
            {"sampler": "heun", "skip": "logsnr"},
            "--model.sampling.sampler heun does not read --model.sampling.skip logsnr (read by ddim, ddpm_respaced, dpmpp_2m, langevin): pass "
            "--model.sampling.skip uniform, or choose a sampler that reads it; heun takes --model.sampling.steps, "
            "--model.sampling.clip_denoised, --model.sampling.options {rho, churn, quantize}",
        ),
        (
            {"sampler": "dpmpp_2m", "eta": 0.5},
            "--model.sampling.sampler dpmpp_2m does not read --model.sampling.eta 0.5 (read by ddim",
        ),
        (
            {"sampler": "ddpm_respaced", "eta": 1.0},
            "--model.sampling.sampler ddpm_respaced does not read --model.sampling.eta 1.0",
        ),
        (
            {"sampler": "ddpm", "steps": 20},
            "--model.sampling.sampler ddpm does not read --model.sampling.steps 20 (read by all but ddpm): pass "
            "--model.sampling.steps 50, or choose a sampler that reads it; ddpm takes --model.sampling.variance, "
            "--model.sampling.clip_denoised",
        ),
    ],
)
def test_an_option_the_sampler_does_not_read_is_one_line(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        SamplerSettings(**settings)
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_what_each_sampler_reads_is_accepted() -> None:
    from src.diffusion.k_samplers import SAMPLER_OPTIONS
    from src.diffusion.samplers import SAMPLER_ARGUMENTS, SAMPLERS

    assert set(SAMPLER_ARGUMENTS) == set(SAMPLERS)
    values = {"steps": 20, "eta": 0.5, "skip": "logsnr"}
    for sampler, arguments in SAMPLER_ARGUMENTS.items():
        SamplerSettings(sampler=sampler, clip_x0=True, **{k: v for k, v in values.items() if k in arguments})
        for name in SAMPLER_OPTIONS.get(sampler, ()):  # a value of the option's type (a bool for a switch)
            SamplerSettings(sampler=sampler, options={name: True if OPTION_TYPES[name] is bool else 2})
    # Defaults are never "set": every sampler accepts the default settings, whatever it reads.
    for sampler in SAMPLERS:
        SamplerSettings(sampler=sampler, steps=50, eta=0.0, skip="uniform")
    # A sampler of one's own receives everything (docs/extending.md).
    SamplerSettings(sampler="my_extensions.ddim_eta0", eta=0.5, options={"anything": 1})


def test_replacing_the_sampler_drops_what_the_new_one_does_not_read() -> None:
    settings = SamplerSettings(sampler="dpmpp_2m", steps=20, skip="logsnr", clip_x0=True)
    assert settings.replace(sampler="heun") == SamplerSettings(sampler="heun", steps=20, clip_x0=True)
    assert settings.replace(sampler="ddim", eta=1.0) == SamplerSettings(
        sampler="ddim", steps=20, skip="logsnr", eta=1.0, clip_x0=True
    )
    unipc = SamplerSettings(sampler="unipc", options={"solver_order": 3, "rho": 5})
    assert unipc.replace(sampler="dpmpp_3m").options == {"rho": 5}
    with pytest.raises(ConfigError, match="does not read --model.sampling.skip logsnr"):  # given explicitly: refused
        settings.replace(sampler="heun", skip="logsnr")
    with pytest.raises(ConfigError, match="does not read --model.sampling.eta"):
        settings.replace(eta=0.5)


def test_recorded_settings_load_with_what_the_sampler_does_not_read_reset() -> None:
    """A checkpoint or export written before unread options were refused still loads, sampling as it did."""
    old = {"sampler": "dpmpp_3m", "sampling_steps": 10, "eta": 0.5, "skip": "logsnr", "ddpm_variance": "fixed_large",
           "sampler_options": {"solver_order": 2, "rho": 5}}  # fmt: skip
    with pytest.raises(ConfigError):
        SamplerSettings.from_options(old)
    assert SamplerSettings.from_options(old, stored=True) == SamplerSettings(
        sampler="dpmpp_3m", steps=10, variance="fixed_large", options={"rho": 5}
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--model.sampling.sampler", "ddim", "--model.sampling.variance", "fixed_large", "--model.evaluation.bpd_timesteps", "0"],
         "--model.sampling.sampler ddim does not read --model.sampling.variance fixed_large (read by --model.sampling.sampler ddpm, "
         "ddpm_respaced and by test/bpd with --model.evaluation.bpd_timesteps, 0 here): pass --model.sampling.variance fixed_small"),
        (["--model.sampling.sampler", "dpmpp_3m", "--model.sampling.skip", "uniform", "--model.sampling.options", "{solver_order: 2}"],
         "--model.sampling.sampler dpmpp_3m does not read --model.sampling.options solver_order"),
        # fashion_mnist.yaml samples with DPM-Solver++(2M) on log-SNR steps: switching to heun must reset --model.skip.
        (["--model.sampling.sampler", "heun"], "--model.sampling.sampler heun does not read --model.sampling.skip logsnr"),
    ],
)  # fmt: skip
def test_the_command_line_refuses_unread_options_before_anything_runs(options: list[str], message: str) -> None:
    from src.main import cli_main

    with pytest.raises(ConfigError) as error:
        cli_main(["--config", str(REPO / "configs" / "fashion_mnist.yaml"), *options], run=False)
    assert message in str(error.value), str(error.value)


def test_the_variance_of_test_bpd_is_read_with_any_sampler() -> None:
    from src.main import cli_main

    cli = cli_main(["--config", str(REPO / "configs" / "fashion_mnist.yaml"), "--model.sampling.variance", "fixed_large",
                    "--model.evaluation.bpd_timesteps", "10", "--trainer.logger", "false"], run=False)  # fmt: skip
    assert cli.model.model.settings.variance == "fixed_large"


@pytest.mark.slow
def test_an_unread_option_fails_in_one_line_before_training() -> None:
    """Through `python -m src.main` as a user runs it: one line on stderr, exit code non-zero, no run folder."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "src.main", "fit", "--config", "configs/fashion_mnist.yaml", "--model.sampling.sampler",
         "dpmpp_3m", "--model.sampling.skip", "uniform", "--model.sampling.options", "{solver_order: 2}", "--trainer.max_steps",
         "0", "--trainer.default_root_dir", "/nonexistent/should-not-be-created"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "does not read --model.sampling.options solver_order" in lines[0], result.stderr


def test_a_sample_grid_with_steps_is_refused_at_the_start_of_fit_for_ddpm(tiny_module) -> None:
    """SampleGrid's own sampling_steps would reach the grid's sampler as --model.sampling.steps: ddpm takes none."""
    from src.callbacks.sampling import SampleGrid

    module = tiny_module(sampler="ddpm", sampling_steps=50)
    with pytest.raises(
        ConfigError, match="SampleGrid's sampling_steps 3: --model.sampling.sampler ddpm takes no steps"
    ):
        SampleGrid(sampling_steps=3).setup(None, module, "fit")
    SampleGrid(sampling_steps=3).setup(None, tiny_module(), "fit")  # DDIM takes them
    SampleGrid().setup(None, module, "fit")
