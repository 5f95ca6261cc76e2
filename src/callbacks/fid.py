"""Periodic FID during fit, logged as `val/fid` so that ModelCheckpoint can monitor it."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback

from src.errors import ConfigError


class FIDCallback(Callback):
    """Every `every_n_steps` optimizer steps, generate `num_samples` images with the EMA weights (sharded over
    processes, the model's sampler options) and log their FID as `val/fid` (`val/fid_standin` with the
    stand-in extractor, which is NOT an FID). The extractor, reference statistics and batch size are the
    model's `fid_*` options.

    Monitor it with `ModelCheckpoint(monitor="val/fid", mode="min", every_n_train_steps=<the same N>)`.
    Few samples (e.g. 5,000) bias FID upwards; compare such numbers only with each other.

    Args:
        every_n_steps: steps between evaluations.
        num_samples: generated samples per evaluation (over all processes).
    """

    def __init__(self, every_n_steps: int = 10_000, num_samples: int = 5_000) -> None:
        if every_n_steps < 1 or num_samples < 2:
            raise ConfigError("FIDCallback needs every_n_steps >= 1 and num_samples >= 2")
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.last: dict[str, float] = {}
        self._last_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps != 0 or step == self._last_step:
            return
        self._last_step = step  # once per optimizer step, also under gradient accumulation
        self.last = pl_module.compute_fid(self.num_samples)
        for name, value in self.last.items():
            # For ModelCheckpoint(monitor=...) and the progress bar (callback metrics)...
            pl_module.log(name, value, on_step=True, on_epoch=False)
        # ...and straight to the loggers: a step's logged values reach them only every `log_every_n_steps` steps,
        # which would drop an FID computed at any other step.
        for logger in trainer.loggers:
            logger.log_metrics(self.last, step=step)
