"""Callbacks that turn samples into files: periodic sample grids during fit, PNG files during predict."""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.utilities import rank_zero_info

from src.diffusion.samplers import SAMPLER_ARGUMENTS
from src.errors import ConfigError
from src.images import make_grid, save_png, to_uint8


def run_dir(trainer: L.Trainer) -> Path:
    """The folder of this run: the logger's versioned log dir, else the trainer's root dir.

    A collective under DDP (`trainer.log_dir` broadcasts rank 0's folder): every rank must call it, never rank 0
    alone, or rank 0 waits for a broadcast the other ranks never join.
    """
    log_dir = trainer.log_dir if trainer.loggers else None
    return Path(log_dir or trainer.default_root_dir)


class SampleGrid(Callback):
    """Every `every_n_steps` optimizer steps (and at the end of fit), sample a grid from the same fixed
    noise with the EMA weights, save it as `<run dir>/samples/step_<N>.png` and log it.

    Args:
        every_n_steps: steps between grids (0: only at the end of training).
        num_samples: images in the grid.
        seed: seed of the fixed noise (the same x_T every time, so grids show progress, not luck).
        sampling_steps: sampling steps for the grid (None: the model's `sampling_steps`); refused at the start of fit
            when the model's sampler does not take steps (ddpm).
    """

    def __init__(
        self, every_n_steps: int = 1000, num_samples: int = 64, seed: int = 1234, sampling_steps: int | None = None
    ) -> None:
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.seed = seed
        self.sampling_steps = sampling_steps
        self.last_path: Path | None = None
        self._last_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        sampler = pl_module.model.settings.sampler
        if stage == "fit" and self.sampling_steps and "steps" not in SAMPLER_ARGUMENTS.get(sampler, ("steps",)):
            raise ConfigError(f"SampleGrid's sampling_steps {self.sampling_steps}: --model.sampler {sampler} takes no "
                              "steps (it runs all --model.timesteps); remove sampling_steps from its init_args")  # fmt: skip

    def _make_grid(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        folder = run_dir(trainer) / "samples"  # on every rank: a broadcast under DDP
        if not trainer.is_global_zero:
            return
        start = time.perf_counter()
        overrides = {"steps": self.sampling_steps} if self.sampling_steps else {}
        # Fixed noise (sample i's own seeded generator): the grid at step N depends only on the weights.
        images = pl_module.model.sample_indices(torch.arange(self.num_samples), seed=self.seed, **overrides)
        grid = make_grid(to_uint8(images))
        self.last_path = save_png(grid, folder / f"step_{step:07d}.png")
        rank_zero_info(f"Saved sample grid {self.last_path} ({time.perf_counter() - start:.1f}s)")
        for logger in trainer.loggers:
            _log_image(logger, "samples", grid, step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0 and trainer.global_step > 0:
            self._make_grid(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._make_grid(trainer, pl_module)


def _log_image(logger, key: str, grid: torch.Tensor, step: int) -> None:
    """Log a uint8 (C, H, W) grid to whichever logger it is (TensorBoard, wandb); others keep the PNG only."""
    experiment = getattr(logger, "experiment", None)
    if hasattr(experiment, "add_image"):  # TensorBoard SummaryWriter
        experiment.add_image(key, grid, global_step=step)
    elif hasattr(logger, "log_image"):  # WandbLogger
        logger.log_image(key=key, images=[grid.permute(1, 2, 0).squeeze(-1).cpu().numpy()], step=step)


class PNGWriter(BasePredictionWriter):
    """Writes every predicted image as `<output_dir>/<index>.png` (`<label>_<index>.png` when the batch
    carries labels), one file per sample, each written atomically.

    Refuses to write into a folder that already holds files unless `overwrite` is set, so earlier samples
    are never silently replaced.
    """

    def __init__(self, output_dir: str | os.PathLike, overwrite: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.overwrite = overwrite
        self.num_written = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "predict":
            return
        if self.output_dir.exists() and not self.overwrite and any(self.output_dir.iterdir()):
            raise FileExistsError(
                f"--output_dir {self.output_dir} already holds files; choose an empty or new "
                "folder, or pass --overwrite true to replace them"
            )
        self.output_dir.mkdir(parents=True, exist_ok=True)

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        images = to_uint8(prediction["images"]).cpu()
        labels = prediction.get("labels")
        for k, index in enumerate(prediction["index"].tolist()):
            name = f"{int(labels[k])}_{index}.png" if labels is not None else f"{index}.png"
            save_png(images[k], self.output_dir / name)
            self.num_written += 1

    def on_predict_end(self, trainer, pl_module) -> None:
        rank_zero_info(
            f"Wrote {self.num_written} PNG files to {self.output_dir}"
            + (f" (rank 0; {trainer.world_size} processes)" if trainer.world_size > 1 else "")
        )
