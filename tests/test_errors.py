"""Bad input through the command line: one clear line naming the option to change, and nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from src.data import DatasetNotFoundError
from src.errors import ConfigError, ShapeMismatchError, did_you_mean
from src.main import cli_main
from src.options import Sampling

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "fashion_mnist.yaml")


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "args, hint",
    [
        (["--data.batchsize", "3"], "--data.batchsize: did you mean --data.batch_size?"),
        (["--model.emma_decay", "0.5"], "--model.emma_decay: did you mean --model.training.ema_decay?"),
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
    assert "did you mean --model.training.ema_decay?" in capsys.readouterr().err


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
        (["--model.sampling.steps", "2000"], r"--model.sampling.steps must be in \[1, 1000\]"),
        (["--model.sampling.eta", "-0.5"], "--model.sampling.eta must be in"),
        (["--model.sampling.skip", "cubic"], "--model.sampling.skip 'cubic' is unknown"),
    ],
)
def test_impossible_sampler_setting(args: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cli_main(["predict", "--config", CONFIG, "--allow_untrained", "true", *args])


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture
def tiny_diffusion_module(tiny_unet):
    """A factory: `tiny_diffusion_module(base_channels=8)`, a module with the default settings on a tiny 28x28 net."""
    from src.module import DiffusionModule

    def make(base_channels: int = 8):
        net = tiny_unet(base_channels=base_channels, channel_mult=(1, 2, 2), image_size=28, mid_attention=True)
        return DiffusionModule(net, sampling=Sampling(steps=2))

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
    assert "--model.emma_decay: did you mean --model.training.ema_decay?" in err[0]
    assert f"{subcommand} --help" in err[-1]


def test_a_bad_value_is_one_line(capsys) -> None:
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", CONFIG, "--trainer.max_steps", "abc"])
    assert capsys.readouterr().err.strip().splitlines()[0] == "error: --trainer.max_steps abc: expected int"


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--model.net.init_args.num_heads", "3"], "error: --model: num_heads=3 does not divide the attention width"),
        (["--model.net.init_args.conditioning", "concat"], "error: --model: conditioning 'concat' takes an image y"),
    ],
)
def test_a_network_that_refuses_its_arguments_is_one_line(option: list[str], message: str, capsys) -> None:
    """A constructor's ValueError in the model layer becomes a ConfigError: `run` prints one line."""
    from src.main import run

    argv = ["src.main", "fit", "--config", CONFIG, *option, "--trainer.max_steps", "1"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", argv)
        patch.delenv("DIFFUSION_TRACEBACK", raising=False)
        with pytest.raises(SystemExit) as exit_info:
            run()
    assert str(exit_info.value.code).startswith(message), exit_info.value.code
    assert "\n" not in str(exit_info.value.code)


def test_one_line_names_a_list_the_shell_split() -> None:
    from src.errors import one_line

    message = one_line(
        'Parser key "model.sampling.labels":\n  Does not validate against any of the Union subtypes\n'
        "  Subtypes: [list[int], <class 'NoneType'>]\n  Errors:\n    - Expected a <class 'list'>\n"
        "    - Expected a <class 'NoneType'>\n  Given value type: <class 'str'>\n  Given value: [3,"
    )
    assert "\n" not in message
    assert message.startswith("--model.sampling.labels [3,: expected one of list[int], None")
    assert "quote the whole value, '[3, 7]'" in message


def test_the_readme_sample_labels_flag_parses(capsys) -> None:
    # The flag exactly as the README writes it, split as a POSIX shell splits it.
    import re
    import shlex

    readme = (REPO / "README.md").read_text()
    written = re.findall(r"`(--model\.sampling\.labels [^`]+)`", readme)
    assert written, "the README no longer shows --model.sampling.labels"
    cond = str(REPO / "configs" / "fashion_mnist_cond.yaml")
    for flag in written:
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["predict", "--config", cond, *shlex.split(flag), "--print_config"])
        assert exit_info.value.code in (0, None), capsys.readouterr().err
        assert "    labels:\n    - 3\n    - 7\n" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- issue 22: one line each
@pytest.fixture(autouse=True)
def no_signal_watcher(monkeypatch: pytest.MonkeyPatch) -> None:
    """`run()` installs the process's SIGTERM watcher (src/signals.py), which would stay in the test process and end
    it at a later test's own SIGTERM (tests/test_faults.py): the suite stopped there without a word."""
    monkeypatch.setattr("src.main.exit_on_second_signal", lambda: True)


def run_main(monkeypatch: pytest.MonkeyPatch, *args: str, module: str = "src.main") -> str:
    """`python -m <module> ARGS` in this process (the same `run()` the module's __main__ calls): the one-line error
    it exits with. A traceback would be an exception other than SystemExit, failing the test."""
    import importlib

    monkeypatch.setattr(sys, "argv", [module, *args])
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).run()
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message, message
    return message


TINY_FIT = ["--model.net.init_args.base_channels", "8", "--model.net.init_args.norm_groups", "4",
            "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false"]  # fmt: skip


def test_a_missing_data_dir_is_one_line_never_the_system_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A given --data.data_dir is the only place looked in: it used to fall back to /usr/share/datasets/fashion-mnist
    # and train, with config.yaml recording the missing folder.
    runs = tmp_path / "runs"
    message = run_main(monkeypatch, "fit", "--config", CONFIG, *TINY_FIT, "--data.data_dir", str(tmp_path / "absent"),
                       "--trainer.default_root_dir", str(runs))  # fmt: skip
    assert message.startswith(f"error: --data.data_dir {tmp_path / 'absent'}: no such folder")
    assert "--data.download true" in message and "leave --data.data_dir unset" in message
    assert not runs.exists()
    # A folder that exists but lacks the files: named as the only place looked in; the run leaves no version folder
    # (the logger had made it before the data set was read) and keeps an earlier run's folder as it was.
    empty = tmp_path / "empty"
    empty.mkdir()
    earlier = runs / "fashion_mnist" / "version_0"
    earlier.mkdir(parents=True)
    (earlier / "notes.txt").write_text("mine")
    message = run_main(monkeypatch, "fit", "--config", CONFIG, *TINY_FIT, "--data.data_dir", str(empty),
                       "--trainer.default_root_dir", str(runs))  # fmt: skip
    assert f"looked in {empty / 'FashionMNIST' / 'raw'} and {empty}." in message
    assert [p.name for p in (runs / "fashion_mnist").iterdir()] == ["version_0"]
    assert files_under(runs) == {"fashion_mnist/version_0/notes.txt": b"mine"}


def test_a_folder_of_images_given_to_a_builtin_data_set_names_the_folder_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `make train ARGS="--data.data_dir my_photos"` trains the quickstart's Fashion-MNIST config: the folder holds
    # PNG files, not the idx files, and the fix is the folder recipe.
    from PIL import Image

    photos = tmp_path / "photos" / "cats"
    photos.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(photos / "0.png")
    message = run_main(monkeypatch, "fit", "--config", CONFIG, *TINY_FIT, "--data.data_dir", str(tmp_path / "photos"),
                       "--trainer.default_root_dir", str(tmp_path / "runs"))  # fmt: skip
    assert "holds image files" in message and "--config configs/folder32.yaml" in message
    assert "\n" not in message.strip()


@pytest.mark.parametrize("backend", ["tensorboard", "csv"])
def test_a_run_failing_before_its_first_step_leaves_no_version_folder(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fails in the data module's setup, after Lightning created the logger's folder (README paths name version_0).
    runs = tmp_path / "runs"
    data = tmp_path / "data" / "FashionMNIST" / "raw"
    data.mkdir(parents=True)
    run_main(monkeypatch, "fit", "--config", CONFIG, *TINY_FIT, "--data.data_dir", str(tmp_path / "data"),
             "--logger_backend", backend, "--trainer.default_root_dir", str(runs))  # fmt: skip
    assert not runs.exists(), sorted(runs.rglob("*"))


def test_ckpt_path_last_without_a_run_names_the_runs_that_have_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The README's examples use configs/fashion_mnist.yaml, `make train` trains fashion_mnist_cond.yaml.
    runs = tmp_path / "runs"
    for name in ("fashion_mnist_cond", "mine"):
        (runs / name / "version_0" / "checkpoints").mkdir(parents=True)
        (runs / name / "version_0" / "checkpoints" / "last.ckpt").write_bytes(b"")
    message = run_main(monkeypatch, "fit", "--config", CONFIG, "--ckpt_path", "last",
                       "--trainer.default_root_dir", str(runs))  # fmt: skip
    assert f"no last.ckpt under {runs / 'fashion_mnist'}/*/checkpoints (--run_name fashion_mnist)" in message
    assert "fashion_mnist_cond (--config configs/fashion_mnist_cond.yaml), mine (--run_name mine)" in message
    assert not (runs / "fashion_mnist").exists()
    message = run_main(monkeypatch, "predict", "--config", CONFIG, "--ckpt_path", "last",
                       "--trainer.default_root_dir", str(tmp_path / "nothing"))  # fmt: skip
    assert "holds no run with a checkpoint" in message and "--trainer.default_root_dir" in message


def test_a_misspelled_logger_backend_is_one_line_with_the_choices(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", CONFIG, "--logger_backend", "tensorbord"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == (
        "error: --logger_backend tensorbord: choose one of auto, wandb, wandb_offline, tensorboard, csv "
        "(did you mean tensorboard?)"
    ), err


def test_evaluate_without_inception_weights_names_its_own_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DDIM_FID_WEIGHTS", raising=False)
    message = run_main(monkeypatch, "--samples", str(tmp_path), "--ref", "fashion_mnist",
                       "--weights", str(tmp_path / "nope.pth"), module="src.evaluate")  # fmt: skip
    assert "InceptionV3 weights" in message and "pass --weights FILE" in message
    assert "use --extractor standin" in message and "--fid." not in message


def test_a_failed_download_is_one_line_naming_where_the_files_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets

    def offline(self) -> None:  # torchvision's own message: one line per mirror tried
        raise RuntimeError(
            "Error downloading train-images-idx3-ubyte.gz:\nTried https://ossci-datasets.s3.amazonaws.com/mnist/, "
            "got:\n<urlopen error [Errno -2] Name or service not known>\n"
        )

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    data, runs = tmp_path / "data", tmp_path / "runs"
    message = run_main(monkeypatch, "fit", "--config", CONFIG, *TINY_FIT, "--data.dataset", "mnist",
                       "--data.download", "true", "--data.data_dir", str(data),
                       "--trainer.default_root_dir", str(runs))  # fmt: skip
    assert message.startswith("error: --data.download true: downloading MNIST failed (<urlopen error [Errno -2]")
    assert f"in {data / 'MNIST' / 'raw'}" in message and "drop --data.download" in message
    assert not runs.exists()


def test_a_missing_file_the_user_named_is_one_line_and_other_ones_are_bugs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import src.main
    from src.errors import names_a_given_path

    config = tmp_path / "mine.yaml"
    config.write_text("model:\n  classifier_path: clf/missing.pt\n")
    args = ["fit", "--config", str(config), "--fid.extractor", "other/missing.pt"]
    assert names_a_given_path(FileNotFoundError(2, "No such file or directory", "clf/missing.pt"), args)
    assert names_a_given_path(FileNotFoundError("feature classifier other/missing.pt does not exist"), args)
    assert not names_a_given_path(FileNotFoundError(2, "No such file or directory", "/opt/internal.json"), args)

    def fails(error: Exception):
        def cli_main(**kwargs):
            raise error

        return cli_main

    monkeypatch.setattr(src.main, "cli_main", fails(FileNotFoundError(2, "No such file or directory", "x/y.pt")))
    assert run_main(monkeypatch, "fit", "--model.guidance.classifier_path", "x/y.pt").endswith("'x/y.pt'")
    monkeypatch.setattr(src.main, "cli_main", fails(FileNotFoundError(2, "No such file or directory", "/opt/z.json")))
    monkeypatch.setattr(sys, "argv", ["src.main", "fit"])
    with pytest.raises(FileNotFoundError):  # not from the user: the traceback stays
        src.main.run()


def test_options_before_config_are_named_in_a_warning(capsys) -> None:
    with pytest.raises(SystemExit):
        cli_main(["fit", "--trainer.max_steps", "3", "--run_name=x", "--config", CONFIG, "--print_config"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "warning: --trainer.max_steps and --run_name come before --config, which is applied after them and replaces "
        "any value its file sets: put options after --config"
    ], err
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", CONFIG, "--trainer.max_steps", "3", "--print_config"])
    assert "warning" not in capsys.readouterr().err


def test_no_lightning_banner_before_a_one_line_error(tmp_path: Path) -> None:
    # Through a real process: Lightning's "GPU available: False", "TPU available: ..." and its product tips stood
    # before every error and every predict.
    result = subprocess.run(
        [sys.executable, "-m", "src.main", "predict", "--config", "configs/fashion_mnist_cond.yaml",
         "--ckpt_path", str(tmp_path / "nonexistent.ckpt"), "--trainer.default_root_dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode != 0
    assert (result.stdout + result.stderr).strip().splitlines() == [
        f"error: --ckpt_path {tmp_path / 'nonexistent.ckpt'}: no such file"
    ], result.stdout + result.stderr


def test_predict_from_a_checkpoint_warns_of_nothing(tmp_path: Path) -> None:
    # Lightning warned that the training callbacks (NonFiniteGuard, RNGStateCallback) were missing and that the
    # checkpoint folder had changed: both about resuming training, which predict does not do.
    import warnings

    from test_faults import write_fake_fashion_mnist

    data, runs = write_fake_fashion_mnist(tmp_path / "data", n_train=16, n_test=4), tmp_path / "runs"
    common = ["--config", CONFIG, *TINY_FIT, "--data.data_dir", str(data), "--data.val_size", "0",
              "--data.batch_size", "4", "--model.sampling.steps", "2", "--logger_backend", "csv",
              "--trainer.default_root_dir", str(runs)]  # fmt: skip
    cli_main(["fit", *common, "--trainer.callbacks", '[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",'
              ' "init_args": {"save_last": true}}]'])  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:  # the filters in force, as in `python -m src.main`
        cli_main(["predict", *common, "--ckpt_path", "last", "--data.num_samples", "2", "--output_dir",
                  str(tmp_path / "pngs")])  # fmt: skip
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "callbacks used to create the checkpoint" in m or "dirpath has changed" in m]
    assert len(list((tmp_path / "pngs").glob("*.png"))) == 2
