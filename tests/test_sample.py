"""Sampling from a checkpoint as a user does: `make sample`, `predict --grid_path`, and predict's refusals (no
checkpoint, guidance on an unconditional net)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from src.errors import ConfigError, UserError
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
    "--model.sampling_steps", "2",
    "--logger_backend", "csv",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]  # fmt: skip
CELL = 28 + 2  # make_grid: each image plus 2 pixels of padding, and 2 more at the right and bottom edges


def _grid_size(rows: int, columns: int) -> tuple[int, int]:
    """PIL's (width, height) of a grid of 28x28 images."""
    return (columns * CELL + 2, rows * CELL + 2)


def _cell(grid: Path, row: int, column: int) -> np.ndarray:
    top, left = 2 + row * CELL, 2 + column * CELL
    return np.asarray(Image.open(grid))[top : top + 28, left : left + 28]


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
        predict("b", "--model.sample_seed", "1")
    assert grid.read_bytes() == before and not (tmp_path / "b").exists()
    predict("b", "--model.sample_seed", "1", "--overwrite", "true")
    assert grid.read_bytes() != before


@pytest.mark.parametrize("subcommand", ["fit", "validate", "predict"])
def test_guidance_on_an_unconditional_net_is_an_error(subcommand: str, tmp_path: Path) -> None:
    extra = ["--allow_untrained", "true", "--output_dir", str(tmp_path / "pngs")] if subcommand == "predict" else []
    with pytest.raises(ConfigError, match=r"classifier-free guidance needs a class-conditional net.*num_classes"):
        cli_main([subcommand, "--config", UNCOND, *TINY, "--model.guidance_scale", "1.5",
                  "--trainer.default_root_dir", str(tmp_path / "runs"), *extra])  # fmt: skip
