"""A training run sized by time: Lightning's `Timer` stops it after `duration`, and the learning rate decays over
the fraction of that budget already spent, so a run on any machine ends its schedule (lr at its floor) when the
budget ends, instead of being cut mid-schedule by `max_time` after a step count only a fast machine reaches.

    progress p = elapsed training time / duration        (or global_step / max_steps when max_steps is set)
    lr = lr_scheduled * (final_lr_fraction + (1 - final_lr_fraction) * (1 + cos(pi * p)) / 2)   ("cosine")

`lr_scheduled` is what the module's own scheduler (warm-up) sets. Cosine decay to a floor is SGDR's annealing
(Loshchilov & Hutter 2017, eq. 5) with one period spanning the run. The elapsed time is Lightning's Timer's state,
saved in every checkpoint and restored on resume, so a resumed run continues the schedule where it stopped (the
time between the checkpoint and the kill is spent again). Under DDP rank 0's clock decides for every rank.

A faster machine takes more steps in the same time, a slower one fewer; both end with the decayed learning
rate. With `--trainer.max_steps N` the schedule follows steps instead (a reproducible run, the Timer still
stopping it at `duration`).
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Timer

LR_DECAYS = ("cosine", "linear", "none")


def lr_decay_factor(progress: float, decay: str = "cosine", final_lr_fraction: float = 0.0) -> float:
    """The multiplier of the learning rate at `progress` in [0, 1] of the run (clipped): 1 at 0,
    `final_lr_fraction` at 1; "cosine" (SGDR, Loshchilov & Hutter 2017, eq. 5), "linear" or "none" (always 1)."""
    p = min(max(float(progress), 0.0), 1.0)
    if decay == "none":
        return 1.0
    if decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * p))
    elif decay == "linear":
        shape = 1.0 - p
    else:
        raise ValueError(f"unknown lr decay {decay!r}; choose one of {', '.join(LR_DECAYS)}")
    return final_lr_fraction + (1.0 - final_lr_fraction) * shape


class TimeBudget(Timer):
    """`lightning.pytorch.callbacks.Timer` (stops training after `duration`, DD:HH:MM:SS) that also decays every
    optimizer's learning rate over the fraction of `duration` spent (see the module docstring).

    Args:
        duration: the training-time budget, "DD:HH:MM:SS" (validation and sample grids during fit count).
        lr_decay: "cosine", "linear" or "none" (the Timer alone).
        final_lr_fraction: the learning rate at the end of the budget, as a fraction of the scheduled one.
        verbose: log when the budget stops the run.
    """

    def __init__(
        self,
        duration: str | timedelta | dict[str, int] = "00:00:15:00",
        lr_decay: str = "cosine",
        final_lr_fraction: float = 0.0,
        verbose: bool = True,
    ) -> None:
        if lr_decay not in LR_DECAYS:
            raise ValueError(f"TimeBudget lr_decay {lr_decay!r} is unknown; choose one of {', '.join(LR_DECAYS)}")
        if not 0.0 <= final_lr_fraction <= 1.0:
            raise ValueError(f"TimeBudget final_lr_fraction must be in [0, 1], got {final_lr_fraction}")
        super().__init__(duration=duration, interval="step", verbose=verbose)
        if not self._duration:
            raise ValueError("TimeBudget needs a positive duration (DD:HH:MM:SS)")
        self.lr_decay = lr_decay
        self.final_lr_fraction = final_lr_fraction
        self.progress = 0.0

    def current_progress(self, trainer: L.Trainer) -> float:
        """The fraction of the run done: by steps when `max_steps` is set, else by training time (rank 0's)."""
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return trainer.global_step / trainer.max_steps
        return float(trainer.strategy.broadcast(self.time_elapsed("train") / self._duration))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.progress = min(self.current_progress(trainer), 1.0)
        factor = lr_decay_factor(self.progress, self.lr_decay, self.final_lr_fraction)
        schedulers = {id(c.scheduler.optimizer): c.scheduler for c in trainer.lr_scheduler_configs}
        for optimizer in trainer.optimizers:
            scheduler = schedulers.get(id(optimizer))
            for i, group in enumerate(optimizer.param_groups):
                # The scheduler's own value (recomputed from its base each step), else the lr the run started with:
                # scaling the group's current lr would compound the factor.
                base = (
                    scheduler.get_last_lr()[i] if scheduler is not None else group.setdefault("initial_lr", group["lr"])
                )
                group["lr"] = base * factor
        pl_module.log("train/budget_progress", self.progress)
