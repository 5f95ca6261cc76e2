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
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor

from src.errors import ConfigError, NonFiniteLossError
from src.lightning_compat import epoch_finished, request_stop_after_step, reset_epoch_counters


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where `last.ckpt` goes: the ModelCheckpoint's folder, else `<run dir>/checkpoints` (Lightning's default)."""
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.dirpath and "{" not in callback.CHECKPOINT_NAME_LAST:
        return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
    run_dir = trainer.log_dir if trainer.loggers else None
    return Path(run_dir or trainer.default_root_dir) / "checkpoints" / "last.ckpt"


class SignalCheckpoint(Callback):
    """Save `last.ckpt` and exit cleanly (status 0) when the job is told to stop (SIGTERM, or SIGUSR1 outside
    SLURM's auto-requeue, which keeps Lightning's own handling: an hpc checkpoint and a requeue).

    Under DDP the handler only records the request. Whether to stop is decided at the end of a training step, by all
    processes together (a max all-reduce of the request under DDP), so that every rank writes the checkpoint and
    stops after the same step, even when the signal reached only one of them (`timeout`, a scheduler signalling
    rank 0). It then sets Lightning's own flag, and Lightning's loop raises `SIGTERMException` (a `SystemExit`)
    right after that step on every rank. Lightning's SIGTERM handler is replaced for the run because it makes a
    collective call (`dist.broadcast`) from inside the signal handler, on the signalled rank alone, and raises on
    that rank alone: under DDP that leaves the other ranks waiting forever.

    A second SIGTERM or SIGINT ends the process at once (`src.signals`), also while it waits in a collective.
    """

    def __init__(self) -> None:
        self._previous_handlers: dict[int, Any] = {}
        self._trainer: L.Trainer | None = None
        self.stop_requested = False
        self.saved_path: Path | None = None
        self._saved_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning registered its handlers (in Trainer._run): SIGTERM is always ours; SIGUSR1 only if nobody
        # else has it (Lightning's SLURM auto-requeue handler does).
        self._trainer = trainer
        self.stop_requested = False
        signals = [signal.SIGTERM]
        if hasattr(signal, "SIGUSR1") and signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
            signals.append(signal.SIGUSR1)
        for signum in signals:
            try:
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread: signals cannot be handled here
                return

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.stop_requested:
            rank_zero_info(f"Received signal {signum}: saving last.ckpt after this step, then exiting")
        self.stop_requested = True
        if self._trainer is not None and self._trainer.world_size == 1:
            # One process has nobody to agree with: Lightning's own flag at once, so that its loop also stops at
            # the points it checks between steps (an epoch's end, validation), as with its own handler.
            request_stop_after_step(self._trainer)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    def _stop_agreed(self, trainer: L.Trainer) -> bool:
        """Whether any process was asked to stop: a collective under DDP, called by every rank after every step
        (one scalar all-reduce, like the sigterm broadcast Lightning itself makes there under DDP)."""
        stop = self.stop_requested
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([float(stop)], device=trainer.strategy.root_device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item() > 0)
        return stop

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # Save here, at the end of the step: the same point as ModelCheckpoint's periodic saves, which Lightning's
        # restart logic resumes exactly (also at an epoch's last batch). Setting Lightning's flag makes its loop
        # raise SIGTERMException after this step, on every rank at once.
        if self._stop_agreed(trainer) and self._saved_step != trainer.global_step:
            self.stop_requested = True
            request_stop_after_step(trainer)
            self._save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        if not isinstance(exception, SIGTERMException) or trainer.sanity_checking or not trainer.training:
            return
        # The signal came after the last step's end (during validation, say): save what there is; a run
        # resumed from here repeats that validation.
        if self._saved_step != trainer.global_step:
            if epoch_finished(trainer):
                reset_epoch_counters(trainer)
            self._save(trainer)

    def _save(self, trainer: L.Trainer) -> None:
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        self.saved_path, self._saved_step = path, trainer.global_step
        rank_zero_info(
            f"Stopping on a signal after step {trainer.global_step}; saved {path} (resume: --ckpt_path last)"
        )


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


@dataclass
class _StepRecord:
    """What the guard keeps of one optimizer step until it knows whether the step was finite."""

    step: int
    epoch: int
    nonfinite: Tensor  # the step's flag; on CUDA a pinned host copy, filled asynchronously
    ready: Any  # a CUDA event recorded after that copy, or None when the flag can be read at once
    batch: Any
    loss: Tensor | None
    t: Tensor | None
    grad_norm: Tensor


class NonFiniteGuard(Callback):
    """Detects a non-finite loss or gradient, keeps it out of the weights, reports it and stops when asked to.

    Every step, the total gradient norm of the optimizer's parameters is computed on the device just before the
    optimizer step (a non-finite loss always gives non-finite gradients). What happens next depends on the
    optimizer:

    - Optimizers that take torch.amp's `found_inf` flag (fused AdamW/Adam/SGD, our default): the flag goes to
      the fused kernel, which then leaves the weights, the moments and the step count alone, all on the device,
      as under `torch.amp.GradScaler`. The guard copies the flag to the host without waiting and reads it when
      the next step starts (on CUDA: once the copy has landed), so the training step has no host-device sync.
    - Other optimizers: the guard reads the flag at once (a sync per step on an accelerator) and drops the bad
      step's gradients, so the optimizer leaves those parameters alone.

    A bad step is reported with its step number, loss, gradient norm, the images' min/max/mean/std and the t
    values; step counters, learning-rate schedule and EMA move on as for any step. Once more than `max_skips`
    steps were non-finite, `NonFiniteLossError` stops the run. No bad update reaches the weights, so every
    checkpoint holds finite weights (with the deferred flag, the run stops one step after the bad one). Under
    fp16 with a GradScaler, overflowing gradients are the scaler's business: the guard then watches the loss.

    Args:
        max_skips: how many non-finite steps to skip over the whole run (counted across resumes) before
            stopping; 0 stops at the first one.
    """

    def __init__(self, max_skips: int = 0) -> None:
        if max_skips < 0:
            raise ConfigError(f"max_skips must be >= 0, got {max_skips}")
        self.max_skips = max_skips
        self.num_skipped = 0
        self._batch: Any = None
        self._pending: list[_StepRecord] = []
        self._last_report = ""

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._check_pending(wait=False)
        self._stop_if_over_limit()  # also for a step counted while a checkpoint was being written
        self._batch = batch

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        norm = torch.nn.utils.get_total_norm(grads)
        loss = getattr(pl_module, "last_loss", None)
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        if scaled and loss is None:
            return
        # fp16 + GradScaler: the scaler skips overflowing steps itself (and owns found_inf); watch the loss only.
        nonfinite = ~torch.isfinite(loss.detach()).all() if scaled else ~torch.isfinite(norm)
        record = _StepRecord(trainer.global_step, trainer.current_epoch, nonfinite, None, self._batch, loss,
                             getattr(pl_module, "last_t", None), norm)  # fmt: skip
        if scaled or getattr(optimizer, "_step_supports_amp_scaling", False):
            if not scaled:
                # The fused kernel skips the update where found_inf is nonzero (torch.amp.GradScaler's mechanism).
                optimizer.found_inf = nonfinite.float()
            self._defer(record)
        elif bool(nonfinite):  # a host sync; only optimizers without found_inf support get here
            optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without a gradient untouched
            self._handle(record, stop=True)

    def _defer(self, record: _StepRecord) -> None:
        if record.nonfinite.device.type == "cuda":
            flag = torch.empty((), dtype=torch.bool, pin_memory=True)
            flag.copy_(record.nonfinite, non_blocking=True)
            record.nonfinite, record.ready = flag, torch.cuda.Event()
            record.ready.record()
        self._pending.append(record)

    def _check_pending(self, wait: bool) -> None:
        """Count the recorded steps whose flags have reached the host (all of them with `wait`), oldest first."""
        while self._pending:
            record = self._pending[0]
            if record.ready is not None:
                if not wait and not record.ready.query():
                    return
                record.ready.synchronize()
            self._pending.pop(0)
            if bool(record.nonfinite):
                self._handle(record, stop=False)

    def _handle(self, record: _StepRecord, stop: bool) -> None:
        self.num_skipped += 1
        self._last_report = self._report(record)
        if stop:
            self._stop_if_over_limit()
        if self.num_skipped <= self.max_skips:
            rank_zero_warn(f"{self._last_report}; skipped this update ({self.num_skipped} of at most {self.max_skips})")

    def _stop_if_over_limit(self) -> None:
        if self.num_skipped > self.max_skips:
            raise NonFiniteLossError(
                f"{self._last_report}; stopped ({self.num_skipped} non-finite steps, at most {self.max_skips} "
                "allowed: raise --max_nonfinite_skips to skip more); the weights and checkpoints hold the last "
                "finite update"
            )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_pending(wait=True)
        self._stop_if_over_limit()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._pending.clear()

    def _report(self, record: _StepRecord) -> str:
        loss = record.loss
        what = "loss" if loss is not None and not torch.isfinite(loss).all() else "gradient"
        parts = [f"non-finite {what} at step {record.step} (epoch {record.epoch})"]
        if loss is not None:
            parts.append(f"loss {loss.item():.4g}")
        parts.append(f"grad norm {record.grad_norm.item():.4g}")
        images = record.batch[0] if isinstance(record.batch, (tuple, list)) else record.batch
        if isinstance(images, Tensor):
            parts.append(f"images {tuple(images.shape)} {tensor_stats(images)}")
        elif isinstance(getattr(images, "moments", None), Tensor):  # a latent-cache batch (src/data/latent_cache.py)
            parts.append(f"cached latent moments {tuple(images.moments.shape)} {tensor_stats(images.moments)}")
        if isinstance(record.t, Tensor):
            parts.append(f"t {record.t.tolist() if record.t.numel() <= 16 else tensor_stats(record.t)}")
        return ", ".join(parts)

    def state_dict(self) -> dict[str, int]:
        # A checkpoint counts every step before it, so flags still on their way are read now; a limit passed
        # here stops the run when the next step starts, not in the middle of writing the checkpoint.
        self._check_pending(wait=True)
        return {"num_skipped": self.num_skipped}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.num_skipped = int(state_dict.get("num_skipped", 0))
