"""Bad input through the command line: one clear line naming the option to change, and nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from src.data import DatasetNotFoundError
from src.errors import ShapeMismatchError, did_you_mean
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
                  "--model.net.init_args.in_channels", "3", "--model.net.init_args.image_size", "32",
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
