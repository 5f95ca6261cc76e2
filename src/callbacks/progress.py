"""A progress bar for runs sized by time: its training bar measures the time budget, not the epoch.

Lightning's TQDM bar counts the batches of the current epoch, and its ETA is the time to that epoch's end: on the
15-minute quickstart it showed 32 minutes, an epoch the budget never finishes. A run that a Timer stops (a
TimeBudget, or `--trainer.max_time`) ends when its budget does, so this bar shows the budget:

    Epoch 1:  45%|████▌     | 06:45/15:00 budget, 08:15 left [step 1234, 3.05 steps/s, train/loss=0.0312]

The percentage and the time left are exact for a run sized by time (the Timer stops at the end of the first step
that ends past the budget). With `--trainer.max_steps N` as well, whichever ends first stops the run: the bar shows
the larger of the two fractions, and the smaller of the time left in the budget and the steps left at the rate so
far. Validation and sample grids during fit count in the budget (src/callbacks/time_budget.py), so the time left is
the wall-clock time to the end of training. Runs without a Timer get Lightning's bar unchanged.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Timer, TQDMProgressBar
from tqdm import tqdm


def budget_timer(trainer: L.Trainer) -> Timer | None:
    """The trainer's Timer with a duration (a TimeBudget, or the one `max_time` adds), if any."""
    return next((c for c in trainer.callbacks if isinstance(c, Timer) and c._duration), None)


class BudgetProgressBar(TQDMProgressBar):
    """`lightning.pytorch.callbacks.TQDMProgressBar` (same arguments) whose training bar, on a run with a time budget,
    shows the budget's progress and the time left (see the module docstring). src/main.py adds it to `fit` when the
    config lists a TimeBudget and no progress bar."""

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        self._timer: Timer | None = None
        self._rate_start: tuple[float, int] = (0.0, 0)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._timer = budget_timer(trainer)
        # The rate of this process (a resumed run's earlier steps ran elsewhere, at another rate).
        self._rate_start = (time.monotonic(), trainer.global_step)

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self._timer is None:
            return super().on_train_epoch_start(trainer, *args)
        # One bar for the run (Lightning resets it to 0 of the epoch's batches at each epoch's start).
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.total = 1.0  # the fraction of the run done
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch}", refresh=False)
        self._show_budget(trainer, trainer.lightning_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        if self._timer is None:
            return super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        if self.is_enabled and trainer.global_step % self.refresh_rate == 0:
            self._show_budget(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._timer is not None and not self.train_progress_bar.disable:
            self._show_budget(trainer, pl_module)

    def budget_status(self, trainer: L.Trainer) -> tuple[float, str]:
        """The fraction of the run done and the text after the bar ("06:45/15:00 budget, 08:15 left [step 1234,
        3.05 steps/s"; the metrics follow)."""
        assert self._timer is not None
        elapsed, duration = self._timer.time_elapsed("train"), self._timer._duration
        step = trainer.global_step
        since, first_step = self._rate_start
        seconds = time.monotonic() - since
        rate = (step - first_step) / seconds if seconds > 0 and step > first_step else None
        fraction, left = elapsed / duration, duration - elapsed
        steps = f"step {step}"
        if trainer.max_steps is not None and trainer.max_steps > 0:
            fraction = max(fraction, step / trainer.max_steps)
            if rate:
                left = min(left, (trainer.max_steps - step) / rate)
            steps += f"/{trainer.max_steps}"
        rate_text = f", {rate:.2f} steps/s" if rate else ""
        clock = tqdm.format_interval
        text = f"{clock(elapsed)}/{clock(duration)} budget, {clock(max(left, 0.0))} left [{steps}{rate_text}"
        return min(max(fraction, 0.0), 1.0), text

    def _show_budget(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        bar = self.train_progress_bar
        if bar.disable:
            return
        fraction, text = self.budget_status(trainer)
        # tqdm's `{postfix}` adds ", metric=value, ..." (and `set_postfix` elsewhere keeps working).
        bar.bar_format = "{l_bar}{bar}| " + text.replace("{", "{{").replace("}", "}}") + "{postfix}]"
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.n = fraction
        bar.refresh()
