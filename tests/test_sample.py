"""Sampling from a checkpoint as a user does: `make sample`, `predict --grid_path`, and predict's refusals (no
checkpoint, guidance on an unconditional net)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_faults import write_fake_fashion_mnist

from src.callbacks.sampling import column_names
from src.errors import ConfigError, UserError
from src.images import HEADER_HEIGHT, label_columns, make_grid
from src.main import cli_main

REPO = Path(__file__).resolve().parents[1]
UNCOND = str(REPO / "configs" / "fashion_mnist.yaml")
COND = str(REPO / "configs" / "fashion_mnist_cond.yaml")
# A tiny 28x28 net and 2 sampling steps: each predict takes about a second.
TINY_NET = {
    "base_channels": 8,
    "norm_groups": 4,
    "channel_mult": [1, 2],
    "attn_resolutions": [],
    "mid_attention": False,
}
TINY = [arg for key, value in TINY_NET.items() for arg in (f"--model.net.init_args.{key}", json.dumps(value))] + [
    "--model.sampling.steps", "2",
    "--logger_backend", "csv",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]  # fmt: skip
CELL = 28 + 2  # make_grid: each image plus 2 pixels of padding, and 2 more at the right and bottom edges


def _grid_size(rows: int, columns: int, header: bool = False) -> tuple[int, int]:
    """PIL's (width, height) of a grid of 28x28 images (with `header`: the strip naming a conditional grid's classes)."""
    return (columns * CELL + 2, rows * CELL + 2 + (HEADER_HEIGHT if header else 0))


def _cell(grid: Path, row: int, column: int, header: bool = False) -> np.ndarray:
    top, left = 2 + row * CELL + (HEADER_HEIGHT if header else 0), 2 + column * CELL
    return np.asarray(Image.open(grid))[top : top + 28, left : left + 28]


def _unconditional_checkpoint(path: Path) -> Path:
    """A checkpoint of an unconditional tiny net of run_name `fashion_mnist` (the unconditional recipe's run), untrained
    and written without a Trainer: what `predict --ckpt_path` reads of it is the network spec and the weights."""
    from src.models.unet import UNet
    from src.module import DiffusionModule

    module = DiffusionModule(UNet(in_channels=1, image_size=28, num_res_blocks=1, dropout=0.0, **TINY_NET))
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_sample_samples_the_configured_run_and_writes_its_grid(tmp_path: Path) -> None:
    """`make sample` after `make train` of the conditional quickstart config, with a newer last.ckpt of another run
    under the same ROOT (the unconditional recipe's; the classifier's would do the same): it samples the configured
    run (--ckpt_path last: CONFIG's run_name), writes NUM_SAMPLES files to OUT and the grid OUT.png, 10 columns."""
    root, data = tmp_path / "runs", write_fake_fashion_mnist(tmp_path / "data", n_train=24, n_test=8)
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}},
        {"class_path": "src.callbacks.sampling.SampleGrid", "init_args": {"every_n_steps": 0, "num_samples": 12}},
        # The autoguidance GUIDANCE passes below reconstructs its guide from these.
        {"class_path": "src.callbacks.posthoc_ema.PostHocEMA", "init_args": {"every_n_steps": 1}},
    ]
    cli_main(["fit", "--config", COND, *TINY, "--data.data_dir", str(data), "--trainer.default_root_dir", str(root),
              "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--data.batch_size", "8",
              "--data.val_size", "8", "--trainer.callbacks", json.dumps(callbacks)])  # fmt: skip
    # The fit-time grid of a class-conditional model: one column per class as well.
    (fit_grid,) = root.glob("fashion_mnist_cond/version_0/samples/step_*.png")
    assert Image.open(fit_grid).size == _grid_size(2, 10, header=True)
    other = _unconditional_checkpoint(root / "fashion_mnist" / "version_0" / "checkpoints" / "last.ckpt")
    later = other.stat().st_mtime + 60
    os.utime(other, (later, later))  # the newest last.ckpt under ROOT, of another run

    # `make` runs this interpreter (BIN) and skips the install step (-o install); the net comes from the checkpoint.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    out = root / "samples" / "first"
    make = ["make", "-o", "install", "sample", f"BIN={bin_dir}", f"CONFIG={COND}", f"ROOT={root}", f"OUT={out}",
            "NUM_SAMPLES=12", "ARGS=--model.sampling.steps 2 --trainer.enable_progress_bar false",
            "GUIDANCE=--model.guidance.model posthoc_ema@0.25 --model.guidance.autoguidance_scale 1.5"]  # fmt: skip
    result = subprocess.run(make, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "Autoguidance: the guide is this run's EMA (sigma_rel 0.05) at step 1 of 2" in result.stdout + result.stderr
    # Labelled file names: the conditional run's checkpoint, not the newer unconditional one.
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{i % 10}_{i}.png" for i in range(12))
    grid = root / "samples" / "first.png"
    assert Image.open(grid).size == _grid_size(2, 10, header=True)
    # Sample 11 (label 1) is in row 1, column 1: each column holds one class, named in the header (dark text on white
    # above each column; Fashion-MNIST's class 1 is "Trouser").
    assert np.array_equal(_cell(grid, 1, 1, header=True), np.asarray(Image.open(out / "1_11.png")))
    header = np.asarray(Image.open(grid))[:HEADER_HEIGHT]
    assert all((header[:, 2 + c * CELL : 2 + c * CELL + 28] < 128).any() for c in range(10))

    # CKPT=path is passed as given.
    dry = subprocess.run(["make", "-n", "-o", "install", "sample", f"CKPT={other}"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert f"--ckpt_path {other}" in dry.stdout and "--ckpt_path last" not in dry.stdout

    # Guidance on that unconditional checkpoint: one clear error instead of a scale silently ignored.
    with pytest.raises(ConfigError, match=r"--model.guidance.scale 1.3: .* --ckpt_path .* is unconditional"):
        cli_main(["predict", "--config", COND, *TINY, "--ckpt_path", str(other), "--model.guidance.scale", "1.3",
                  "--output_dir", str(tmp_path / "guided")])  # fmt: skip
    assert not (tmp_path / "guided").exists()


def test_predict_without_a_checkpoint_is_one_line_and_writes_nothing(tmp_path: Path, capfd) -> None:
    """Refused before the model or the trainer is built (nothing else printed); a UserError, which `python -m
    src.main` prints as its one line `error: ...` (tests/test_errors.py)."""
    out = tmp_path / "pngs"
    with pytest.raises(UserError) as error:
        cli_main(["predict", "--config", UNCOND, "--output_dir", str(out)])
    message = str(error.value)
    assert "\n" not in message and message.startswith("predict needs trained weights"), message
    assert "--ckpt_path CKPT" in message and "--ckpt_path last" in message and "--allow_untrained true" in message
    captured = capfd.readouterr()
    assert captured.out.strip() == "" and "GPU available" not in captured.err
    assert not out.exists()


def test_grid_path_writes_one_grid_of_the_samples_and_never_overwrites(tmp_path: Path) -> None:
    """--allow_untrained true samples the untrained net on purpose; --grid_path tiles the samples in index order,
    near-square for an unconditional model; an existing grid is kept unless --overwrite true."""
    grid = tmp_path / "grid.png"

    def predict(out: str, *extra: str) -> None:
        cli_main(["predict", "--config", UNCOND, *TINY, "--allow_untrained", "true", "--data.num_samples", "5",
                  "--data.predict_batch_size", "2", "--output_dir", str(tmp_path / out), "--grid_path", str(grid),
                  "--trainer.default_root_dir", str(tmp_path / "runs"), *extra])  # fmt: skip

    predict("a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [f"{i}.png" for i in range(5)]
    assert Image.open(grid).size == _grid_size(2, 3)  # 5 samples: 3 columns, 2 rows
    for i in range(5):
        assert np.array_equal(_cell(grid, *divmod(i, 3)), np.asarray(Image.open(tmp_path / "a" / f"{i}.png")))

    before = grid.read_bytes()
    with pytest.raises(FileExistsError, match="--grid_path .* --overwrite true"):
        predict("b", "--model.sampling.seed", "1")
    assert grid.read_bytes() == before and not (tmp_path / "b").exists()
    predict("b", "--model.sampling.seed", "1", "--overwrite", "true")
    assert grid.read_bytes() != before


@pytest.mark.parametrize("subcommand", ["fit", "validate", "predict"])
def test_guidance_on_an_unconditional_net_is_an_error(subcommand: str, tmp_path: Path) -> None:
    extra = ["--allow_untrained", "true", "--output_dir", str(tmp_path / "pngs")] if subcommand == "predict" else []
    with pytest.raises(ConfigError, match=r"classifier-free guidance needs a class-conditional net.*num_classes"):
        cli_main([subcommand, "--config", UNCOND, *TINY, "--model.guidance.scale", "1.5",
                  "--trainer.default_root_dir", str(tmp_path / "runs"), *extra])  # fmt: skip


def test_column_names_name_each_column_by_its_class() -> None:
    """A conditional grid's header: the data set's class name of each label the samples cycle through (sample_labels
    picks and orders them), the label number where the data module has none; no header for an unconditional model."""
    from types import SimpleNamespace

    def names(choices, class_names):
        model = SimpleNamespace(label_choices=lambda: choices)
        return column_names(
            SimpleNamespace(datamodule=SimpleNamespace(class_names=class_names)), SimpleNamespace(model=model)
        )

    fashion = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert names(list(range(10)), fashion) == fashion
    assert names([9, 1], fashion) == ["Ankle boot", "Trouser"]
    assert names([0, 1, 2], []) == ["0", "1", "2"]
    assert names(None, fashion) is None


def test_label_columns_keeps_the_grid_and_writes_inside_each_column() -> None:
    """The header is a strip on top: the grid below is unchanged, and each name is cut to its column's width, so no
    text runs into the next column's space."""
    images = torch.full((4, 1, 28, 28), 200, dtype=torch.uint8)
    grid = make_grid(images, nrow=2)
    labelled = label_columns(grid, ["a very long class name", "b"], cell_width=28)
    assert labelled.shape == (1, grid.shape[1] + HEADER_HEIGHT, grid.shape[2])
    assert torch.equal(labelled[:, HEADER_HEIGHT:], grid)
    header = labelled[0, :HEADER_HEIGHT].numpy()
    assert (header[:, 2:30] < 128).any() and (header[:, 32:60] < 128).any()  # ink above both columns
    assert (header[:, 30:32] == 255).all()  # none in the gap between them
    # A grid of samples made on a GPU stays there: the header joins it on its device (the "meta" device stands in
    # for CUDA on a CPU machine; a CPU header would not concatenate with it).
    assert label_columns(grid.to("meta"), ["a", "b"], cell_width=28).device.type == "meta"
