"""Bad input through the command line: one clear line naming the option to change, and nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from src.data import DatasetNotFoundError
from src.errors import ConfigError, ShapeMismatchError, did_you_mean
from src.main import cli_main

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "fashion_mnist.yaml")


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "args, hint",
    [
        (["--data.batchsize", "3"], "--data.batchsize: did you mean --data.batch_size?"),
        (["--model.emma_decay", "0.5"], "--model.emma_decay: did you mean --model.ema_decay?"),
        (["--model.num_fid_samples", "10"], "--model.num_fid_samples moved to --fid.num_samples"),
    ],
)
def test_unknown_option_suggests_the_closest(args: list[str], hint: str, capsys) -> None:
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", CONFIG, *args])
    assert hint in capsys.readouterr().err


def test_unknown_config_key_suggests_the_closest(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  ema_decey: 0.5\n")
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", CONFIG, "--config", str(bad)])
    assert "did you mean --model.ema_decay?" in capsys.readouterr().err


def test_a_saved_config_with_the_old_fid_options_names_their_new_place(tmp_path: Path, capsys) -> None:
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  fid_extractor: standin\n")
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", CONFIG, "--config", str(old)])
    assert "--model.fid_extractor moved to --fid.extractor" in capsys.readouterr().err


def test_fid_callback_listed_under_trainer_callbacks_is_not_run_twice(tmp_path: Path) -> None:
    twice = tmp_path / "twice.yaml"
    twice.write_text("trainer:\n  callbacks:\n    - class_path: src.callbacks.fid.FIDCallback\n")
    with pytest.raises(ConfigError, match=r"remove it from trainer.callbacks and set its options with --fid"):
        cli_main(["validate", "--config", CONFIG, "--config", str(twice),
                  "--trainer.default_root_dir", str(tmp_path / "runs")])  # fmt: skip


def test_did_you_mean_stays_quiet_without_a_close_match() -> None:
    assert did_you_mean("unrecognized arguments: --model.zzz 1", ["--model.lr"]) == (
        "unrecognized arguments: --model.zzz 1"
    )


def test_image_shape_mismatch_fails_before_anything_runs(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    with pytest.raises(ShapeMismatchError, match=r"\(1, 28, 28\).*\(3, 28, 28\).*--model.net.init_args.in_channels 1"):
        cli_main(["fit", "--config", CONFIG, "--model.net.init_args.in_channels", "3",
                  "--trainer.default_root_dir", str(root)])  # fmt: skip
    assert not any(p.is_file() for p in root.rglob("*"))  # no checkpoints, logs or grids


def test_missing_data_set_is_one_line_and_touches_nothing(tmp_path: Path) -> None:
    # CIFAR-10, which has no system-wide copy to fall back on; the folder lacks four of its six files.
    data = tmp_path / "data"
    (data / "cifar-10-batches-py").mkdir(parents=True)
    (data / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"keep")
    before = files_under(data)
    with pytest.raises(DatasetNotFoundError, match="lacks data_batch_2") as error:
        cli_main(["fit", "--config", CONFIG, "--data.dataset", "cifar10", "--data.data_dir", str(data),
                  "--model.net.init_args.in_channels", "3", "--image_size", "32",
                  "--trainer.max_steps", "1", "--logger_backend", "csv",
                  "--trainer.default_root_dir", str(tmp_path / "runs")])  # fmt: skip
    assert "\n" not in str(error.value)
    assert files_under(data) == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model.sampling_steps", "2000"], r"--model.sampling_steps must be in \[1, 1000\]"),
        (["--model.eta", "-0.5"], "--model.eta must be in"),
        (["--model.skip", "cubic"], "--model.skip 'cubic' is unknown"),
    ],
)
def test_impossible_sampler_setting(args: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cli_main(["predict", "--config", CONFIG, *args])


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture
def tiny_diffusion_module(tiny_unet):
    """A factory: `tiny_diffusion_module(base_channels=8)`, a module with the default settings on a tiny 28x28 net."""
    from src.module import DiffusionModule

    def make(base_channels: int = 8):
        net = tiny_unet(base_channels=base_channels, channel_mult=(1, 2, 2), image_size=28, mid_attention=True)
        return DiffusionModule(net, sampling_steps=2)

    return make


def test_corrupt_or_missing_checkpoint_is_one_line(tmp_path, tiny_diffusion_module) -> None:
    import torch

    from src.errors import CheckpointError, check_checkpoint

    module = tiny_diffusion_module()
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, good)
    check_checkpoint(good, module)  # fits: no error
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for path, message in [(truncated, "is corrupt or not a checkpoint"), (tmp_path / "nope.ckpt", "no such file")]:
        with pytest.raises(CheckpointError, match=message) as info:
            check_checkpoint(path, module)
        assert "\n" not in str(info.value)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="holds no 'state_dict'"):
        check_checkpoint(tmp_path / "other.pt", module)


def test_incompatible_checkpoint_names_what_differs(tmp_path, tiny_diffusion_module) -> None:
    import torch

    from src.errors import CheckpointError, check_checkpoint

    state = tiny_diffusion_module(base_channels=8).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["net.conv_out.bias"]
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError) as info:
        check_checkpoint(path, tiny_diffusion_module(base_channels=16))
    message = str(info.value)
    assert "missing net.conv_out.bias" in message and "unexpected extra.weight" in message
    assert "shapes differ (checkpoint vs model): model.net.conv_in.bias (8,) vs (16,)" in message
    assert "and " in message and "more" in message and "\n" not in message


def test_cli_predict_with_a_corrupt_checkpoint_writes_nothing(tmp_path) -> None:
    from src.errors import CheckpointError
    from src.main import cli_main

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    out = tmp_path / "pngs"
    with pytest.raises(CheckpointError, match="corrupt"):
        cli_main(["predict", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist.yaml"), "--ckpt_path", str(bad), "--output_dir", str(out),
                  "--trainer.default_root_dir", str(tmp_path / "runs")])  # fmt: skip
    assert not out.exists() and bad.read_bytes() == b"PK\x03\x04 not really a zip"


def test_abbreviated_options_are_not_taken_for_others() -> None:
    from src.main import cli_main

    config = str(Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist.yaml")
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", config, "--trainer.max_step", "3", "--print_config"])


# ---------------------------------------------------------------------------------------------- bad flags, briefly
def test_a_mistyped_flag_is_one_line_and_a_pointer_to_help() -> None:
    # Through the command line as users run it: argparse's usage (about 100 lines) used to bury the error.
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "src.main", "fit", "--config", "configs/fashion_mnist.yaml", "--trainer.max_step", "4"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 2
    assert len(lines) <= 3, lines
    assert "error: unrecognized arguments: --trainer.max_step 4" in lines[0]
    assert "did you mean --trainer.max_steps?" in lines[0]
    assert any("python -m src.main fit --help" in line for line in lines)


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
def test_every_subcommand_prints_no_usage(subcommand: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main([subcommand, "--config", CONFIG, "--model.emma_decay", "0.5"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 3 and not any(line.startswith("usage:") for line in err), err
    assert "--model.emma_decay: did you mean --model.ema_decay?" in err[0]
    assert f"{subcommand} --help" in err[-1]


def test_a_bad_value_is_one_line(capsys) -> None:
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", CONFIG, "--trainer.max_steps", "abc"])
    assert capsys.readouterr().err.strip().splitlines()[0] == "error: --trainer.max_steps abc: expected int"


def test_one_line_names_a_list_the_shell_split() -> None:
    from src.errors import one_line

    message = one_line(
        'Parser key "model.sample_labels":\n  Does not validate against any of the Union subtypes\n'
        "  Subtypes: [list[int], <class 'NoneType'>]\n  Errors:\n    - Expected a <class 'list'>\n"
        "    - Expected a <class 'NoneType'>\n  Given value type: <class 'str'>\n  Given value: [3,"
    )
    assert "\n" not in message
    assert message.startswith("--model.sample_labels [3,: expected one of list[int], None")
    assert "quote the whole value, '[3, 7]'" in message


def test_the_readme_sample_labels_flag_parses(capsys) -> None:
    # The flag exactly as the README writes it, split as a POSIX shell splits it.
    import re
    import shlex

    readme = (REPO / "README.md").read_text()
    written = re.findall(r"`(--model\.sample_labels [^`]+)`", readme)
    assert written, "the README no longer shows --model.sample_labels"
    cond = str(REPO / "configs" / "fashion_mnist_cond.yaml")
    for flag in written:
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["predict", "--config", cond, *shlex.split(flag), "--print_config"])
        assert exit_info.value.code in (0, None), capsys.readouterr().err
        assert "  sample_labels:\n  - 3\n  - 7\n" in capsys.readouterr().out
