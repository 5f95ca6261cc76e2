"""docs/extending.md: a sampler, a loss weighting and a network defined outside `src/` (tests/my_extensions.py),
selected by config alone and used through `python -m src.main fit|predict`, the way a user runs them."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from src.data import DATASETS
from src.diffusion.losses import l_simple
from src.diffusion.samplers import check_sampler, sample
from src.diffusion.schedule import NoiseSchedule
from src.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

needs_fashion_mnist = pytest.mark.skipif(
    not any(Path(d).is_dir() for d in DATASETS["fashion_mnist"].system_dirs),
    reason="Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)",
)

# The quickstart with a network of our own (tests/my_extensions.py), a few steps, one CSV row per step.
TINY_NET = [
    "--config", "configs/fashion_mnist.yaml",
    "--model.net.class_path", "my_extensions.TinyConvNet",
    "--model.net.init_args.width", "8",
    "--logger_backend", "csv",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]  # fmt: skip
LAST_CKPT = json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                         "init_args": {"save_last": True, "save_top_k": 0}}])  # fmt: skip
FIT = ["--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "0",
       "--data.batch_size", "8", "--data.val_size", "16", "--trainer.callbacks", LAST_CKPT]  # fmt: skip


def cli(*args: str) -> str:
    """`python -m src.main ARGS` from the repository root, with tests/ on the Python path as a user's project folder
    would be (so `my_extensions` imports); its output, after asserting that it succeeded."""
    # tests/ itself, not the package name "tests": torch-fidelity 0.4 installs a top-level "tests" package that
    # shadows this folder.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    done = subprocess.run([sys.executable, "-m", "src.main", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=env)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def images(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """Two training steps of the network defined in tests/my_extensions.py, selected by --model.net.class_path."""
    root = tmp_path_factory.mktemp("runs")
    cli("fit", *TINY_NET, *FIT, "--trainer.default_root_dir", str(root))
    (ckpt,) = root.glob("fashion_mnist/version_0/checkpoints/last.ckpt")
    return ckpt


@pytest.mark.slow
@needs_fashion_mnist
def test_a_network_outside_src_trains_and_is_rebuilt_from_its_checkpoint(checkpoint: Path) -> None:
    hparams = torch.load(checkpoint, map_location="cpu", weights_only=True)["hyper_parameters"]
    assert hparams["net"] == {"class_path": "my_extensions.TinyConvNet",
                              "init_args": {"in_channels": 1, "image_size": 28, "width": 8, "timesteps": 1000}}  # fmt: skip
    (metrics,) = checkpoint.parent.parent.glob("metrics.csv")
    losses = [float(row["train/loss"]) for row in csv.DictReader(metrics.open()) if row.get("train/loss")]
    assert len(losses) == 2 and all(np.isfinite(losses))


@pytest.mark.slow
@needs_fashion_mnist
def test_a_sampler_outside_src_is_used_by_predict(checkpoint: Path, tmp_path: Path) -> None:
    predict = ["predict", *TINY_NET, "--ckpt_path", str(checkpoint), "--data.num_samples", "3",
               "--model.sampling.steps", "4", "--model.sampling.skip", "uniform", "--output_dir"]  # fmt: skip
    cli(*predict, str(tmp_path / "builtin"), "--model.sampling.sampler", "ddim")
    cli(*predict, str(tmp_path / "ours"), "--model.sampling.sampler", "my_extensions.ddim_eta0")
    cli(*predict, str(tmp_path / "once"), "--model.sampling.sampler", "my_extensions.denoise_once")
    builtin, ours, once = images(tmp_path / "builtin"), images(tmp_path / "ours"), images(tmp_path / "once")
    assert list(ours) == list(once) == ["0.png", "1.png", "2.png"]
    assert ours["0.png"].shape == (28, 28) and ours["0.png"].dtype == np.uint8
    # my_extensions.ddim_eta0 re-derives DDIM (eta = 0) from the paper: the same PNG files, byte for byte, as
    # the built-in on the same timesteps; a different function of ours gives other images.
    assert all(np.array_equal(builtin[name], ours[name]) for name in builtin)
    assert not all(np.array_equal(once[name], ours[name]) for name in ours)


def test_a_sampler_path_is_called_with_the_builtins_convention() -> None:
    """`sample(sampler="package.module.function")` wraps x0 / v nets as an eps-predictor and hands over the
    timesteps of `steps` and `skip` (logsnr included), as the built-in DDIM sees them."""
    torch.manual_seed(0)
    schedule = NoiseSchedule.linear(100)
    net = torch.nn.Conv2d(1, 1, 3, padding=1).double()
    x_T = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    for prediction in ("eps", "x0", "v"):
        for skip in ("uniform", "quad", "logsnr"):
            options = dict(steps=7, skip=skip, clip_x0=True, prediction=prediction)
            ours = sample(lambda x, t: net(x), x_T, schedule, sampler="my_extensions.ddim_eta0", **options)
            builtin = sample(lambda x, t: net(x), x_T, schedule, sampler="ddim", **options)
            assert torch.equal(ours, builtin), (prediction, skip)
    from my_extensions import denoise_once

    assert torch.equal(sample(lambda x, t: net(x), x_T, schedule, sampler=denoise_once),
                       sample(lambda x, t: net(x), x_T, schedule, sampler="my_extensions.denoise_once"))  # fmt: skip


@pytest.mark.parametrize(
    "sampler, message",
    [
        ("euler", "--model.sampling.sampler 'euler' is unknown; choose one of ddim, "),
        ("no_such_package.samplers.euler", "--model.sampling.sampler 'no_such_package.samplers.euler': cannot import"),
        ("my_extensions.no_such_function", "my_extensions has no function 'no_such_function'"),
    ],
)
def test_a_bad_sampler_path_is_one_clear_line(sampler: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        check_sampler(sampler)
    assert "\n" not in str(error.value) and "package.module.function" in str(error.value)
    # The same line from the command line, before anything runs.
    from src.main import cli_main

    with pytest.raises(ConfigError, match="package.module.function"):
        cli_main(
            ["--config", str(REPO / "configs" / "fashion_mnist.yaml"), "--model.sampling.sampler", sampler], run=False
        )


def test_a_loss_weighting_path_weights_l_simple() -> None:
    torch.manual_seed(0)
    schedule = NoiseSchedule.linear(100)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    x0, t, noise = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 50, 99]), torch.randn(4, 1, 8, 8)
    from src.diffusion.losses import loss_weighting

    weighting = loss_weighting("my_extensions.double_weight")
    plain = l_simple(lambda x, t: net(x), x0, schedule, t, noise)
    assert torch.equal(l_simple(lambda x, t: net(x), x0, schedule, t, noise, weighting=weighting), 2 * plain)
    with pytest.raises(ConfigError, match="--model.training.loss_weighting 'my_extensions.nope'"):
        loss_weighting("my_extensions.nope")


@pytest.mark.slow
@needs_fashion_mnist
def test_a_loss_weighting_outside_src_is_used_by_fit(tmp_path: Path) -> None:
    """Same seed, same first batch, t and noise: the first step's logged loss is exactly twice the unweighted one."""
    first_loss = {}
    for weighting in ("none", "my_extensions.double_weight"):
        root = tmp_path / weighting
        cli(
            "fit",
            *TINY_NET,
            *FIT,
            "--trainer.default_root_dir",
            str(root),
            "--model.training.loss_weighting",
            weighting,
        )
        (metrics,) = root.glob("fashion_mnist/version_0/metrics.csv")
        rows = [row for row in csv.DictReader(metrics.open()) if row.get("train/loss")]
        first_loss[weighting] = float(rows[0]["train/loss"])
    assert first_loss["my_extensions.double_weight"] == 2 * first_loss["none"] > 0
