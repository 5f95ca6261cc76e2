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

The budget is the run's TOTAL training time. `--trainer.max_time DD:HH:MM:SS` (or any form Lightning's flag takes:
a dict such as `{"minutes": 90}`) sets it on the command line (src/main.py; `make train MINUTES=30`).

Continuing a finished run (`--ckpt_path last`):
- with a larger `--trainer.max_time`, training goes on until the new total, the decay recomputed over it: a run
  that spent 15 of a new 30 minutes resumes at p = 0.5, so its learning rate rises from the floor it ended at to
  where a 30-minute run would be at minute 15 (half the peak for "cosine"), then decays to the floor again at
  minute 30. That is an SGDR warm restart (Loshchilov & Hutter 2017), not the schedule of one uninterrupted
  30-minute run, whose first 15 minutes would have decayed more slowly.
- with the budget already spent (the same or a smaller `--trainer.max_time`), it fails before any step with a
  one-line ConfigError naming the flag: not Lightning's Timer's silent stop, which exits 0 having trained nothing.
- `--trainer.max_steps N` alone does not extend a spent budget (the same error, saying so): the budget caps every
  run, a step-sized one too, so the steps need time to run in. Give both, `--trainer.max_steps N
  --trainer.max_time <total>`; the schedule then follows steps (global_step / N), again a warm restart.
A run stopped before its budget ended (killed, preempted) resumes exactly, as before.
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from src.errors import ConfigError

LR_DECAYS = ("cosine", "linear", "none")


def duration_seconds(duration: str | timedelta | dict[str, int], option: str = "--trainer.max_time") -> float:
    """The seconds of a duration in any form Lightning's Timer (and its `--trainer.max_time`) takes: "DD:HH:MM:SS",
    a `timedelta`, or a dict of `timedelta` arguments such as {"minutes": 90}; a one-line ConfigError naming `option`
    for anything else, or for a duration that is not positive."""
    example = "write DD:HH:MM:SS, e.g. 00:00:30:00 for 30 minutes or 00:01:30:00 for 90"
    try:
        seconds = Timer(duration=duration)._duration  # Lightning's own parsing of the forms it documents
    except (MisconfigurationException, TypeError, ValueError):
        raise ConfigError(f"{option} {duration!r} is not a duration: {example}") from None
    if not seconds or seconds <= 0:
        raise ConfigError(f"{option} {duration!r}: the time budget must be positive; {example}")
    return seconds


def format_duration(seconds: float) -> str:
    """`seconds` as "DD:HH:MM:SS" (rounded to the second), the form `--trainer.max_time` takes."""
    s = int(round(seconds))
    return f"{s // 86400:02d}:{s % 86400 // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def spent_budget_error(
    elapsed: float, duration: float, max_steps: int | None = None, source: str = "the resumed run", make: bool = True
) -> ConfigError | None:
    """The one-line error for continuing a run whose time budget is spent (None while time is left): it names
    `--trainer.max_time` (the run's total) with a larger value to give, and `make train MINUTES=...` with `make`."""
    if elapsed < duration:
        return None
    # Twice the budget (whole minutes past one), or the budget again after what was trained if that was more.
    total = 2 * duration if 2 * duration > elapsed else elapsed + duration
    total = 60 * math.ceil(total / 60) if total >= 60 else math.ceil(total)
    steps = (
        f"--trainer.max_steps {max_steps} does not extend it (the budget caps step-sized runs too); "
        if max_steps is not None and max_steps > 0
        else ""
    )
    hint = f' (make train MINUTES={math.ceil(total / 60)} ARGS="--ckpt_path last")' if make else ""
    return ConfigError(
        f"{source} has spent its time budget ({format_duration(elapsed)} trained of --trainer.max_time "
        f"{format_duration(duration)}, the run's total): {steps}to train on, give a larger total, e.g. "
        f"--trainer.max_time {format_duration(total)}{hint}"
    )


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

    `duration` is the run's total; `--trainer.max_time` replaces it (src/main.py). Continuing a finished run with a
    larger total recomputes the decay over the new total: an SGDR-style warm restart (Loshchilov & Hutter 2017),
    the learning rate rising from its floor to where a run of the new length would be at the time already spent,
    then decaying to the floor at the new end. Continuing with the budget spent (whatever `--trainer.max_steps`)
    raises a one-line ConfigError before any step; a run stopped early resumes exactly.

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
        if not self._duration or self._duration <= 0:
            raise ValueError("TimeBudget needs a positive duration (DD:HH:MM:SS)")
        self.lr_decay = lr_decay
        self.final_lr_fraction = final_lr_fraction
        self.progress = 0.0

    @property
    def duration(self) -> float:
        """The budget in seconds: the run's total training time."""
        return self._duration

    def set_duration(self, duration: str | timedelta | dict[str, int], option: str = "--trainer.max_time") -> None:
        """Set the budget (any form `duration_seconds` takes); a bad value is a ConfigError naming `option`."""
        self._duration = duration_seconds(duration, option)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The state of a checkpoint is loaded by now: a spent budget is an error, not Lightning's silent stop.
        error = spent_budget_error(self.time_elapsed("train"), self._duration, trainer.max_steps)
        if error is not None:
            raise error
        super().on_fit_start(trainer, pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self._offset > 0:  # resumed (a checkpoint restored the elapsed time): say where the schedule goes on
            progress = min(self.current_progress(trainer), 1.0)
            factor = lr_decay_factor(progress, self.lr_decay, self.final_lr_fraction)
            if self._verbose:
                rank_zero_info(
                    f"TimeBudget: resuming at progress {progress:.3f} ({format_duration(self.time_elapsed('train'))}"
                    f" trained of {format_duration(self._duration)}): the learning rate is x{factor:.3f} of the "
                    "scheduled one from here"
                )

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
