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
from src.images import label_columns, make_grid, read_png, save_png, to_uint8


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
        num_samples: images in the grid (a class-conditional grid rounds it up to fill its last row of classes).
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
            raise ConfigError(
                f"SampleGrid's sampling_steps {self.sampling_steps}: --model.sampling.sampler {sampler} takes no steps "
                "(it runs all --model.schedule.timesteps); remove sampling_steps from its init_args"
            )

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
        names = column_names(trainer, pl_module)
        # A class-conditional grid fills its last row (64 samples, 10 classes: 70), so every column is one class.
        num_samples = -(-self.num_samples // len(names)) * len(names) if names else self.num_samples
        conditioned = getattr(pl_module.model, "condition", None) is not None
        if conditioned:  # whole rows of 8 (`condition_grid`)
            num_samples = -(-num_samples // 8) * 8
        images = pl_module.model.sample_indices(torch.arange(num_samples), seed=self.seed, **overrides)
        if conditioned:
            grid = condition_grid(pl_module.model, torch.arange(num_samples), images)
        else:
            grid = labelled_grid(to_uint8(images), names)
        self.last_path = save_png(grid, folder / f"step_{step:07d}.png")
        rank_zero_info(f"Saved sample grid {self.last_path} ({time.perf_counter() - start:.1f}s)")
        for logger in trainer.loggers:
            _log_image(logger, "samples", grid, step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0 and trainer.global_step > 0:
            self._make_grid(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._make_grid(trainer, pl_module)


def grid_columns(pl_module: L.LightningModule) -> int | None:
    """Columns of a sample grid: one per label for a class-conditional model (labels cycle with the sample index,
    so each column shows one class: 10 for the built-in data sets); None (a near-square grid) otherwise."""
    label_choices = getattr(getattr(pl_module, "model", None), "label_choices", None)
    choices = label_choices() if callable(label_choices) else None
    return len(choices) if choices else None


def column_names(trainer: L.Trainer, pl_module: L.LightningModule) -> list[str] | None:
    """The header of a class-conditional grid: for each column, the data set's name of the class it holds (the
    label number where the data module has no names, e.g. a folder no longer on disk); None: unconditional."""
    label_choices = getattr(getattr(pl_module, "model", None), "label_choices", None)
    choices = label_choices() if callable(label_choices) else None
    if not choices:
        return None
    try:
        names = list(getattr(trainer.datamodule, "class_names", None) or [])
    except FileNotFoundError:  # a folder's names come from the folder (or the checkpoint, once restored)
        names = []
    return [names[label] if label < len(names) else str(label) for label in choices]


def labelled_grid(images: torch.Tensor, names: list[str] | None) -> torch.Tensor:
    """uint8 images (B, C, H, W) -> one grid: with `names`, one column per name and a header naming them (a
    class-conditional model's samples cycle through the classes, so each column is one class); else near-square."""
    grid = make_grid(images, nrow=len(names) if names else None)
    return label_columns(grid, names, cell_width=images.shape[-1]) if names else grid


def condition_grid(model, indices: torch.Tensor, samples: torch.Tensor, columns: int = 8) -> torch.Tensor:
    """The samples of a model conditioned on images (`DiffusionModel.condition`) beside what they were made from:
    for each `columns` samples, a row of their conditions as a person sees them (the condition's `visible`, e.g. the
    low-resolution pixels enlarged; left out for a condition without one), the row of samples, and the row of the
    clean images the conditions were made from."""
    originals = model.source_images(indices).to(samples.device)
    visible = getattr(model.condition, "visible", None)
    rows = ([visible(originals)] if callable(visible) else []) + [samples, originals]
    columns = min(columns, len(samples))

    def part(row: torch.Tensor, start: int) -> torch.Tensor:  # a last, shorter block is padded with white cells
        chunk = row[start : start + columns]
        return torch.cat([chunk, chunk.new_ones((columns - len(chunk), *chunk.shape[1:]))])

    blocks = [torch.cat([part(row, i) for row in rows]) for i in range(0, len(samples), columns)]
    return make_grid(to_uint8(torch.cat(blocks)), nrow=columns)


def _log_image(logger, key: str, grid: torch.Tensor, step: int) -> None:
    """Log a uint8 (C, H, W) grid to whichever logger it is (TensorBoard, wandb); others keep the PNG only."""
    experiment = getattr(logger, "experiment", None)
    if hasattr(experiment, "add_image"):  # TensorBoard SummaryWriter
        experiment.add_image(key, grid, global_step=step)
    elif hasattr(logger, "log_image"):  # WandbLogger
        logger.log_image(key=key, images=[grid.permute(1, 2, 0).squeeze(-1).cpu().numpy()], step=step)


class PNGWriter(BasePredictionWriter):
    """Writes every predicted image as `<output_dir>/<index>.png` (`<label>_<index>.png` when the batch
    carries labels), one file per sample, each written atomically; with `grid_path`, also one PNG grid of all of
    them in index order, `grid_columns` per row (None: near-square), with a header naming each column's class when
    the samples are labelled (`column_names`); for a model conditioned on images, the grid of `condition_grid`
    (per 8 samples: their inputs, the samples, the originals).

    Refuses to write into a folder that already holds files, or over an existing grid file, unless `overwrite` is
    set, so earlier samples are never silently replaced.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        overwrite: bool = False,
        grid_path: str | os.PathLike | None = None,
        grid_columns: int | None = None,
    ) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.overwrite = overwrite
        self.grid_path = Path(grid_path) if grid_path else None
        self.grid_columns = grid_columns
        self.num_written = 0
        self._labels: dict[int, int] = {}  # index -> label (-1: none) of the files this process wrote

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "predict":
            return
        if self.output_dir.exists() and not self.overwrite and any(self.output_dir.iterdir()):
            raise FileExistsError(
                f"--output_dir {self.output_dir} already holds files; choose an empty or new "
                "folder, or pass --overwrite true to replace them"
            )
        if self.grid_path is not None and self.grid_path.exists() and not self.overwrite:
            raise FileExistsError(
                f"--grid_path {self.grid_path} already exists; choose another file, or pass --overwrite true to "
                "replace it"
            )
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.num_written = 0
        self._labels = {}

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        images = to_uint8(prediction["images"]).cpu()
        labels = prediction.get("labels")
        for k, index in enumerate(prediction["index"].tolist()):
            save_png(images[k], self.output_dir / self._name(index, int(labels[k]) if labels is not None else -1))
            self._labels[index] = int(labels[k]) if labels is not None else -1
            self.num_written += 1

    @staticmethod
    def _name(index: int, label: int) -> str:
        return f"{label}_{index}.png" if label >= 0 else f"{index}.png"

    def on_predict_end(self, trainer, pl_module) -> None:
        rank_zero_info(
            f"Wrote {self.num_written} PNG files to {self.output_dir}"
            + (f" (rank 0; {trainer.world_size} processes)" if trainer.world_size > 1 else "")
        )
        if self.grid_path is not None:
            self._write_grid(trainer, pl_module)

    def _write_grid(self, trainer, pl_module) -> None:
        """One grid of every sample of this run, read back from the files (under DDP each process wrote its own
        share): every process contributes the labels of its indices, then rank 0 alone reads and tiles."""
        strategy = trainer.strategy
        # A collective on every rank (a barrier too: no process reads before all have written): which index holds
        # which label, as the maximum over ranks of -2 (not written here), -1 (no label) or the label.
        last = torch.tensor(max(self._labels, default=-1), device=pl_module.device)
        size = int(strategy.reduce(last, reduce_op="max")) + 1
        labels = torch.full((size,), -2, dtype=torch.int64)
        for index, label in self._labels.items():
            labels[index] = label
        labels = strategy.reduce(labels.to(pl_module.device), reduce_op="max").cpu().tolist()
        if trainer.is_global_zero:
            written = [(i, label) for i, label in enumerate(labels) if label > -2]
            images = [read_png(self.output_dir / self._name(i, label)) for i, label in written]
            if images:
                names = column_names(trainer, pl_module) if self.grid_columns else None
                model = getattr(pl_module, "model", None)
                if getattr(model, "condition", None) is not None:  # inputs, samples and originals, 8 at a time
                    indices = torch.tensor([i for i, _ in written])
                    grid = condition_grid(model, indices, torch.stack(images).float() / 127.5 - 1.0)
                elif names is not None and len(names) == self.grid_columns:
                    grid = labelled_grid(torch.stack(images), names)
                else:
                    grid = make_grid(torch.stack(images), nrow=self.grid_columns)
                save_png(grid, self.grid_path)
                rank_zero_info(f"Wrote a grid of {len(images)} samples to {self.grid_path}")
        strategy.barrier("grid")  # the grid exists when predict returns, on every rank
