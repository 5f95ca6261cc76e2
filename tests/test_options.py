"""DiffusionModule's option groups (src/options.py): the constructor, the command line, config files and the flat
names of earlier versions (old checkpoints: tests/test_old_checkpoints.py)."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import yaml

from src.errors import ConfigError
from src.main import cli_main
from src.module import DiffusionModule
from src.options import (
    GROUPS,
    KEPT_FLAGS,
    RENAMED,
    Guidance,
    Sampling,
    Schedule,
    flag,
    flat_options,
    grouped_options,
    translate_arguments,
)

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "fashion_mnist_cond.yaml")


def test_the_constructor_takes_parts_two_options_and_five_groups() -> None:
    parameters = list(inspect.signature(DiffusionModule).parameters)
    assert sorted(parameters) == sorted(["net", "process", "prediction", "first_stage", "condition",
                                         "timestep_distribution", "optimizer", "lr_scheduler", *GROUPS])  # fmt: skip
    assert len(parameters) == 13


def test_every_old_name_is_a_field_of_its_group_and_every_field_has_one() -> None:
    fields = {(name, f.name) for name, cls in GROUPS.items() for f in dataclasses.fields(cls)}
    assert set(RENAMED.values()) == fields and len(RENAMED) == len(fields)
    assert flag("sampling_steps") == "--model.sampling.steps" and flag("guidance_model") == "--model.guidance.model"


def test_flat_and_grouped_options_are_inverse() -> None:
    flat = {old: f"value of {old}" for old in RENAMED} | {"net": {"class_path": "x"}, "prediction": "v"}
    grouped = grouped_options(flat)
    assert set(grouped) == set(GROUPS) | {"net", "prediction"}
    assert (
        grouped["sampling"]["steps"] == "value of sampling_steps" and grouped["schedule"]["name"] == "value of schedule"
    )
    assert flat_options(grouped) == flat
    # Grouped options stay as they are; a group given as its dataclass reads as its fields.
    assert grouped_options(grouped) == grouped
    assert flat_options({"sampling": Sampling(steps=7)})["sampling_steps"] == 7
    # The schedule group given as itself, with a flat option beside it; a flat "schedule" is the schedule's name.
    assert grouped_options({"schedule": Schedule(name="cosine"), "timesteps": 50})["schedule"] == dataclasses.asdict(
        Schedule(name="cosine", timesteps=50)
    )
    assert grouped_options({"schedule": "cosine"})["schedule"]["name"] == "cosine"
    # A flat override on top of a group's defaults (tests' tiny_module(eta=0.5)).
    assert grouped_options({"sampling": Sampling(steps=7), "eta": 0.5})["sampling"] == dataclasses.asdict(
        Sampling(steps=7, eta=0.5)
    )


def test_groups_are_given_as_dataclasses_or_dicts(tiny_unet) -> None:
    by_class = DiffusionModule(tiny_unet(), sampling=Sampling(steps=3, eta=0.5), guidance=Guidance(scale=1.0))
    by_dict = DiffusionModule(tiny_unet(), sampling={"steps": 3, "eta": 0.5}, guidance={"scale": 1.0})
    assert by_class.hparams["sampling"] == by_dict.hparams["sampling"] == dataclasses.asdict(Sampling(steps=3, eta=0.5))
    assert by_dict.model.settings.steps == 3 and by_dict.model.settings.eta == 0.5
    with pytest.raises(TypeError, match="Sampling has no option sampling_steps"):
        DiffusionModule(tiny_unet(), sampling={"sampling_steps": 3})


def _printed_model(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["predict", "--config", CONFIG, *args, "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)["model"]


def test_the_four_stable_flags_keep_working(capsys) -> None:
    """design.md's command line names --model.sampler, --model.sampling_steps, --model.eta and --model.guidance_scale
    as stable: they set the grouped options, as their new names do."""
    assert set(KEPT_FLAGS) == {"sampler", "sampling_steps", "eta", "guidance_scale"}
    old = _printed_model(capsys, "--model.sampler", "ddim", "--model.sampling_steps=7", "--model.eta", "0.5",
                         "--model.guidance_scale", "2.5")  # fmt: skip
    new = _printed_model(capsys, "--model.sampling.sampler", "ddim", "--model.sampling.steps=7",
                         "--model.sampling.eta", "0.5", "--model.guidance.scale", "2.5")  # fmt: skip
    assert old == new
    assert (old["sampling"]["sampler"], old["sampling"]["steps"], old["sampling"]["eta"]) == ("ddim", 7, 0.5)
    assert old["guidance"]["scale"] == 2.5


@pytest.mark.parametrize("old", sorted(set(RENAMED) - set(KEPT_FLAGS)))
def test_every_other_old_flag_is_one_line_naming_its_replacement(old: str) -> None:
    value = "cosine" if old == "schedule" else "1"
    with pytest.raises(ConfigError) as error:
        cli_main(["fit", "--config", CONFIG, f"--model.{old}", value])
    assert str(error.value) == f"--model.{old} is now {flag(old)} (DiffusionModule's options are grouped by concern)"


def test_the_schedule_group_flag_still_takes_a_config() -> None:
    # --model.schedule is also the new group's own flag (a YAML of its fields): only a schedule's name is the old one.
    assert translate_arguments(["--model.schedule", "{name: cosine}"]) == ["--model.schedule", "{name: cosine}"]
    assert translate_arguments(["--model.sampler=heun", "--data.eta", "1"]) == [
        "--model.sampling.sampler=heun",
        "--data.eta",
        "1",
    ]


def test_an_old_key_in_a_config_file_names_its_replacement(tmp_path: Path, capsys) -> None:
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  sample_seed: 3\n")
    with pytest.raises(SystemExit):
        cli_main(["predict", "--config", CONFIG, "--config", str(old)])
    assert "--model.sample_seed moved to --model.sampling.seed" in capsys.readouterr().err
