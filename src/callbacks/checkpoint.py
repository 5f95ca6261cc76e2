"""Lightning's ModelCheckpoint, plus a `last.ckpt` written right after the final step of a run."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint

from src.lightning_compat import last_saved_step, save_last_checkpoint


class ModelCheckpoint(LightningModelCheckpoint):
    """`lightning.pytorch.callbacks.ModelCheckpoint` (same arguments) that, with `save_last`, also writes
    `last.ckpt` at the end of the step after which the run stops: `max_steps` reached, or `trainer.should_stop`
    set during that step (the `max_time` timer, a callback).

    Lightning writes `last.ckpt` at such an end only when no earlier `last.ckpt` was written in the run, and then
    from its end-of-training hooks, after the fit loop has counted the epoch as complete. So a run stopped by
    `max_steps` or `max_time` mid-epoch either kept a stale `last.ckpt` (the steps since the last periodic save
    were lost) or saved one that a continued run (`--trainer.max_steps` larger, `--ckpt_path last`) resumed as if
    the epoch were over: a new epoch, reshuffled data, a different run. Written at a step's end instead, the
    checkpoint is of the kind periodic saves are, which Lightning resumes exactly.
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        # Lightning runs checkpoint callbacks after all others, so the Timer's should_stop of this step is set here.
        max_steps_reached = trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps
        if not self.save_last or not (max_steps_reached or trainer.should_stop):
            return
        if trainer.sanity_checking or trainer.fast_dev_run or last_saved_step(self) == trainer.global_step:
            return
        save_last_checkpoint(self, trainer)
