"""Callbacks for runs that fail: preemption signals and non-finite losses.

- `SignalCheckpoint`: on SIGTERM (and SIGUSR1 outside SLURM) finish the current step, write `last.ckpt` and
  exit cleanly, so a requeued job resumes with `--ckpt_path last` exactly where this one stopped.
- `NonFiniteGuard`: a non-finite loss or gradient is reported with the step and the batch's statistics, then
  either skipped (up to `max_skips` times) or it stops the run before the bad update reaches the weights, so
  the last checkpoint stays good.

`src.main` adds both to every `fit` run that does not list them itself.
"""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor

from src.errors import NonFiniteLossError


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where `last.ckpt` goes: the ModelCheckpoint's folder, else `<run dir>/checkpoints` (Lightning's default)."""
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.dirpath and "{" not in callback.CHECKPOINT_NAME_LAST:
        return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
    run_dir = trainer.log_dir if trainer.loggers else None
    return Path(run_dir or trainer.default_root_dir) / "checkpoints" / "last.ckpt"


class SignalCheckpoint(Callback):
    """Save `last.ckpt` and exit cleanly (status 0) when the job is told to stop.

    Lightning's own SIGTERM handler only sets `trainer.received_sigterm`; its training loop then raises
    `SIGTERMException` (a `SystemExit`) after the current step. This callback writes the checkpoint from
    `on_exception` at that point, through the trainer's checkpoint IO (atomic with `src.checkpoint_io`).
    SIGUSR1 is routed to the same path, unless Lightning's SLURM auto-requeue handler already owns it (that
    one saves an hpc checkpoint and requeues the job itself).
    """

    def __init__(self) -> None:
        self._previous_sigusr1: Any = None
        self._installed = False
        self._trainer: L.Trainer | None = None
        self.saved_path: Path | None = None
        self._saved_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning registered its handlers (in Trainer._run): only take SIGUSR1 if nobody else has it.
        if not hasattr(signal, "SIGUSR1") or signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None):
            return
        self._trainer = trainer
        try:
            self._previous_sigusr1 = signal.signal(signal.SIGUSR1, self._on_sigusr1)
            self._installed = True
        except ValueError:  # not the main thread: signals cannot be handled here
            pass

    def _on_sigusr1(self, signum: int, frame: FrameType | None) -> None:
        rank_zero_info(f"Received signal {signum}: saving last.ckpt after this step, then exiting")
        if self._trainer is not None:
            # The same flag Lightning's SIGTERM handler sets; `trainer.received_sigterm` is a read-only view of it.
            self._trainer._signal_connector.received_sigterm = True

    def _restore_handler(self) -> None:
        if self._installed:
            signal.signal(signal.SIGUSR1, self._previous_sigusr1)
            self._installed = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handler()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # Save here, at the end of the step the signal arrived in: the same point as ModelCheckpoint's periodic
        # saves, which Lightning's restart logic resumes exactly (also at an epoch's last batch). The loop then
        # raises SIGTERMException after this step.
        if trainer.received_sigterm and self._saved_step != trainer.global_step:
            self._save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handler()
        if not isinstance(exception, SIGTERMException) or trainer.sanity_checking or not trainer.training:
            return
        # The signal came after the last step's end (during validation, say): save what there is; a run
        # resumed from here repeats that validation.
        if self._saved_step != trainer.global_step:
            if _epoch_finished(trainer):
                _reset_epoch_counters(trainer)
            self._save(trainer)

    def _save(self, trainer: L.Trainer) -> None:
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        self.saved_path, self._saved_step = path, trainer.global_step
        rank_zero_info(
            f"Stopping on a signal after step {trainer.global_step}; saved {path} (resume: --ckpt_path last)"
        )


def _epoch_finished(trainer: L.Trainer) -> bool:
    """Whether the fit loop has completed its current epoch and not yet started the next one (Lightning raises
    the SIGTERMException for a signal that arrived during the epoch's end hooks right there)."""
    epochs = trainer.fit_loop.epoch_progress.total
    return epochs.ready == epochs.started == epochs.processed == epochs.completed > 0


def _reset_epoch_counters(trainer: L.Trainer) -> None:
    """Zero the per-epoch batch counters, as Lightning does itself when the next epoch starts.

    Saved between two epochs, Lightning's checkpoint still holds the finished epoch's batch counters: a run
    resumed from it would take them for the next epoch's, train one batch and call that epoch done (its
    restart logic only handles checkpoints written at a batch's end). The data loader's own state (epoch e,
    all batches consumed) needs nothing: the next epoch e + 1 starts from its beginning.
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    epoch_loop.batch_progress.reset_on_run()
    epoch_loop.scheduler_progress.reset_on_run()
    epoch_loop.automatic_optimization.optim_progress.reset_on_run()
    epoch_loop.val_loop.batch_progress.total.reset()


def tensor_stats(x: Tensor) -> str:
    """min/max/mean/std of a tensor's finite values, and how many values are not finite, as one short string."""
    x = x.detach().float().flatten()
    finite = torch.isfinite(x)
    num_bad = int((~finite).sum())
    x = x[finite]
    if x.numel() == 0:
        return f"all {num_bad} values non-finite"
    std = x.std().item() if x.numel() > 1 else 0.0
    stats = f"min {x.min().item():.4g} max {x.max().item():.4g} mean {x.mean().item():.4g} std {std:.4g}"
    return stats + (f" ({num_bad} non-finite)" if num_bad else "")


class NonFiniteGuard(Callback):
    """Detects a non-finite loss or gradient before the optimizer applies it.

    It checks the total gradient norm of the optimizer's parameters just before the optimizer step (a
    non-finite loss always gives non-finite gradients). On a bad step it reports the step, the loss, the
    images' min/max/mean/std and the t values, then either skips the update (its gradients are dropped, so
    the optimizer leaves the weights and its moments alone; step counters, learning-rate schedule and EMA
    move on as for any step) or, once more than `max_skips` steps were skipped, raises `NonFiniteLossError`,
    which stops the run before the bad update; checkpoints written so far stay as they are.

    Args:
        max_skips: how many non-finite steps to skip over the whole run (counted across resumes) before
            stopping; 0 stops at the first one.
    """

    def __init__(self, max_skips: int = 0) -> None:
        if max_skips < 0:
            raise ValueError(f"max_skips must be >= 0, got {max_skips}")
        self.max_skips = max_skips
        self.num_skipped = 0
        self._batch: Any = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch = batch

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        norm = torch.nn.utils.get_total_norm(grads)
        if torch.isfinite(norm):  # one device sync per step
            return
        report = self._report(trainer, pl_module, norm)
        if self.num_skipped >= self.max_skips:
            raise NonFiniteLossError(
                f"{report}; stopped (skipped {self.num_skipped} of at most {self.max_skips}: raise "
                "--max_nonfinite_skips to skip more); the weights and checkpoints hold the last finite step"
            )
        self.num_skipped += 1
        optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without a gradient untouched
        rank_zero_warn(f"{report}; skipped this update ({self.num_skipped} of at most {self.max_skips})")

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, norm: Tensor) -> str:
        loss = getattr(pl_module, "last_loss", None)
        what = "loss" if loss is not None and not torch.isfinite(loss) else "gradient"
        parts = [f"non-finite {what} at step {trainer.global_step} (epoch {trainer.current_epoch})"]
        if loss is not None:
            parts.append(f"loss {loss.item():.4g}")
        parts.append(f"grad norm {norm.item():.4g}")
        images = self._batch[0] if isinstance(self._batch, (tuple, list)) else self._batch
        if isinstance(images, Tensor):
            parts.append(f"images {tuple(images.shape)} {tensor_stats(images)}")
        t = getattr(pl_module, "last_t", None)
        if isinstance(t, Tensor):
            parts.append(f"t {t.tolist() if t.numel() <= 16 else tensor_stats(t)}")
        return ", ".join(parts)

    def state_dict(self) -> dict[str, int]:
        return {"num_skipped": self.num_skipped}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.num_skipped = int(state_dict.get("num_skipped", 0))
