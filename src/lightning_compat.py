"""The one place that uses Lightning's private API.

Everything here works around a Lightning behaviour that has no public hook; each function names the internals it
touches. `tests/test_lightning_compat.py` checks them against the installed Lightning, so an upgrade that moves
them fails there, loudly, rather than as a silent change of behaviour in a long run. Besides these functions, two
overrides live where they act: `DiffusionCLI._parse_ckpt_path` (src/main.py: take only the architecture from a
checkpoint, not every model option) and the protected methods of ModelCheckpoint used through
`save_last_checkpoint` below.
"""

from __future__ import annotations

import logging
import warnings

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

# What Lightning prints when a Trainer is made that tells the user nothing: no GPU and no TPU on a CPU machine (a
# GPU that is there stays announced, with its own warning when unused), and advertisements for cloud products.
BANNER_PREFIXES = ("GPU available: False", "TPU available: False", "💡 Tip:")


class _DropBanner(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(BANNER_PREFIXES)


def quiet_lightning_banner() -> None:
    """Silence Lightning's start-up lines that say nothing (they stood before every one-line error and before every
    predict's output), keeping its other messages and warnings. Lightning logs them through `rank_zero_info`, i.e.
    the logger `lightning.pytorch.utilities.rank_zero`, which also carries messages worth keeping (and ours): a
    filter on the exact prefixes rather than a log level. Idempotent."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropBanner) for f in logger.filters):
        logger.addFilter(_DropBanner())
    # "LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES: [0]" on every GPU run, the only INFO message of this logger.
    logging.getLogger("lightning.pytorch.accelerators.cuda").setLevel(logging.WARNING)
    # Lightning 2.6's own pytree helper against torch >= 2.10, once per run: nothing a user can change.
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )


def request_stop_after_step(trainer: L.Trainer) -> None:
    """Make Lightning's fit loop stop after the current step, as its own SIGTERM handler does (it sets this flag;
    `trainer.received_sigterm` is a read-only view of it, and the loop raises `SIGTERMException` on seeing it)."""
    trainer._signal_connector.received_sigterm = True


def epoch_finished(trainer: L.Trainer) -> bool:
    """Whether the fit loop has completed its current epoch and not yet started the next one (Lightning raises
    the SIGTERMException for a signal that arrived during the epoch's end hooks right there)."""
    epochs = trainer.fit_loop.epoch_progress.total
    return epochs.ready == epochs.started == epochs.processed == epochs.completed > 0


def reset_epoch_counters(trainer: L.Trainer) -> None:
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


def last_saved_step(checkpoint: ModelCheckpoint) -> int:
    """The global step of the callback's newest save (any kind)."""
    return checkpoint._last_global_step_saved


def save_last_checkpoint(checkpoint: ModelCheckpoint, trainer: L.Trainer) -> None:
    """Write the callback's `last.ckpt` now, through its own naming, versioning and bookkeeping (so that its
    end-of-epoch and end-of-training hooks know a checkpoint of this step exists and do not write another)."""
    checkpoint._save_last_checkpoint(trainer, checkpoint._monitor_candidates(trainer))
    checkpoint._last_global_step_saved = trainer.global_step
