"""Plumbing shared by the notebooks; the math itself is always imported from `src`.

- `import _common` (from notebooks/, where Jupyter starts a notebook's kernel) puts the repository root on
  `sys.path`, so `import src` works without installing the project;
- `checkpoint_path()` resolves the checkpoint a notebook's parameters cell names (NOTEBOOK_CHECKPOINT or
  NOTEBOOK_COND_CHECKPOINT), else the newest `runs/<config>/*/checkpoints/last.ckpt` (`make train` writes
  `runs/fashion_mnist_cond/`, `make train CONFIG=configs/fashion_mnist.yaml` `runs/fashion_mnist/`), else trains a
  small model through the project's command line;
- `show_grid()` shows a batch of images with matplotlib (`src.images.make_grid` does the tiling).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from src.images import make_grid  # noqa: E402

# The samplers import tqdm.auto, which warns in Jupyter without ipywidgets; the notebooks show no progress bars.
warnings.filterwarnings("ignore", message="IProgress not found")

# Where a notebook trains its own model when it finds none (gitignored, like every run folder).
FALLBACK_ROOT = REPO_ROOT / "runs" / "notebooks"
# Training steps of that fallback model: the `make train` network learns blurry but recognisable shapes in a few
# hundred steps (600 took about 6 minutes on a busy 2-core CPU); `make train` trains for 15 minutes (3,000 to 4,900 steps
# of batch 64 on a 2-core CPU, docs/quality.md).
FALLBACK_STEPS = 600
FALLBACK_STEPS_QUICK = 100


def newest_checkpoint(run_name: str, root: Path = REPO_ROOT / "runs") -> Path | None:
    """The newest `<root>/<run_name>/*/checkpoints/last.ckpt` (the CLI's `--ckpt_path last` rule), or None."""
    from src.main import latest_checkpoint

    try:
        return latest_checkpoint(str(root), run_name)
    except FileNotFoundError:
        return None


def train_checkpoint(config: str, root: Path, max_steps: int) -> Path:
    """Train `configs/<config>.yaml` for `max_steps` steps through `python -m src.main fit` into `root`; the new
    `last.ckpt`. A subprocess, so the notebook's own process keeps its RNG state and threads untouched."""
    command = [
        sys.executable, "-m", "src.main", "fit", "--config", str(REPO_ROOT / "configs" / f"{config}.yaml"),
        "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(max_steps),
        "--trainer.enable_progress_bar", "false", "--logger_backend", "csv",
    ]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"training failed ({' '.join(command)}):\n{result.stderr[-3000:]}")
    checkpoint = newest_checkpoint(config, root)
    if checkpoint is None:
        raise RuntimeError(f"training finished but wrote no last.ckpt under {root / config}")
    print(f"trained {checkpoint} in {time.perf_counter() - start:.0f} s")
    return checkpoint


def checkpoint_path(given: str | os.PathLike | None, config: str = "fashion_mnist", quick: bool = False) -> Path:
    """The checkpoint a notebook uses, first found of:

    1. `given` (the notebook's parameter, from NOTEBOOK_CHECKPOINT or NOTEBOOK_COND_CHECKPOINT);
    2. the newest `runs/<config>/*/checkpoints/last.ckpt` (`make train`, or `python -m src.main fit --config
       configs/<config>.yaml`; the config's run_name is its file name);
    3. the newest one an earlier notebook trained under `runs/notebooks/`;
    4. a small model trained now with `configs/<config>.yaml` (a few CPU minutes; fewer steps in quick mode).
    """
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{given}: no such checkpoint file")
        return path
    for root in (REPO_ROOT / "runs", FALLBACK_ROOT):
        found = newest_checkpoint(config, root)
        if found is not None:
            return found
    steps = FALLBACK_STEPS_QUICK if quick else FALLBACK_STEPS
    # The notebooks that show an unconditional model name "fashion_mnist"; plain `make train` writes the
    # class-conditional run, which they do not use: say so rather than leave the user wondering.
    config_option = "" if config == "fashion_mnist_cond" else f" CONFIG=configs/{config}.yaml"
    print(
        f"No checkpoint given and none under runs/{config}/: training a small model now "
        f"(configs/{config}.yaml, {steps} steps, a few CPU minutes) into {FALLBACK_ROOT.relative_to(REPO_ROOT)}/; "
        f"`make train{config_option}` trains the full one into runs/{config}/"
    )
    return train_checkpoint(config, FALLBACK_ROOT, steps)


def show_grid(
    images: Tensor,
    nrow: int | None = None,
    title: str | None = None,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    ax: plt.Axes | None = None,
    scale: float = 0.6,
) -> plt.Axes:
    """Show images (B, C, H, W) in [-1, 1] (or uint8) as one grid, `nrow` per row, with optional labels for the
    rows (left) and columns (top). Draws into `ax`, or into a new figure sized to the grid."""
    images = images.detach().cpu()
    grid = make_grid(images, nrow=nrow)  # uint8 (C, H', W'), 2-pixel white padding
    height, width = images.shape[-2:]
    if ax is None:
        _, ax = plt.subplots(figsize=(scale * grid.shape[2] / (width + 2), scale * grid.shape[1] / (height + 2)))
    pixels = grid.permute(1, 2, 0).numpy()
    ax.imshow(pixels[..., 0] if pixels.shape[-1] == 1 else pixels, cmap="gray", vmin=0, vmax=255)
    # Tick at the centre of each cell (make_grid puts 2 pixels of padding before every row and column).
    ax.set_yticks([2 + k * (height + 2) + height / 2 for k in range(len(row_labels or []))], row_labels or [])
    ax.set_xticks([2 + k * (width + 2) + width / 2 for k in range(len(col_labels or []))], col_labels or [])
    if col_labels:
        ax.xaxis.tick_top()
        plt.setp(ax.get_xticklabels(), rotation=45, ha="left", rotation_mode="anchor")
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title)
    return ax


def fixed_noise(num_images: int, shape: Sequence[int], seed: int = 0) -> Tensor:
    """x_T ~ N(0, I) for `num_images` images from a seeded generator: the same noise every run, so that grids
    compare samplers and settings, not luck."""
    return torch.randn((num_images, *shape), generator=torch.Generator().manual_seed(seed))
