"""Choose an experiment logger that never blocks: wandb when logged in, TensorBoard otherwise.

wandb asks for an API key interactively when it is not logged in; a training job must never wait for that.
So wandb is used online only when a key is already available (WANDB_API_KEY or a netrc entry written by
`wandb login`), offline when the user asked for it (WANDB_MODE=offline), and TensorBoard otherwise (CSV
where TensorBoard is not installed).
"""

from __future__ import annotations

import importlib.util
import netrc
import os
import shutil
import time
from pathlib import Path
from typing import Literal, get_args

import lightning as L
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

# The values of --logger_backend (a Literal, so the command line rejects a misspelling in one line at parse time).
Backend = Literal["auto", "wandb", "wandb_offline", "tensorboard", "csv"]
BACKENDS: tuple[str, ...] = get_args(Backend)


def wandb_logged_in() -> bool:
    """True when wandb has credentials without asking: WANDB_API_KEY or a netrc entry for its API host."""
    if importlib.util.find_spec("wandb") is None:
        return False
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def auto_logger(save_dir: str, name: str, backend: Backend = "auto", version: str | None = None) -> Logger:
    """A logger writing under `save_dir/name` (in folder `version` when given, e.g. to continue a resumed run).

    backend: "auto" (wandb if logged in or WANDB_MODE=offline, else TensorBoard, else CSV), "wandb",
    "wandb_offline", "tensorboard" or "csv".
    """
    mode = os.environ.get("WANDB_MODE", "")
    if backend == "auto":
        if wandb_logged_in() and mode not in ("disabled", "offline"):
            backend = "wandb"
        elif mode == "offline" and importlib.util.find_spec("wandb") is not None:
            backend = "wandb_offline"
        elif importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
            backend = "tensorboard"
        else:
            backend = "csv"
    if backend in ("wandb", "wandb_offline"):
        from lightning.pytorch.loggers import WandbLogger

        offline = backend == "wandb_offline" or not wandb_logged_in()
        os.makedirs(save_dir, exist_ok=True)
        return WandbLogger(project=name, save_dir=save_dir, offline=offline)
    if backend == "tensorboard":
        return TensorBoardLogger(save_dir=save_dir, name=name, version=version)
    if backend == "csv":
        metrics = Path(save_dir, name, str(version), "metrics.csv")
        if version is not None and metrics.is_file() and rank_zero_only.rank == 0:
            # Lightning's CSV writer deletes an existing metrics.csv when it starts: keep the log of the steps before
            # the interruption beside the new one.
            metrics.rename(metrics.with_name(f"metrics.until-{time.strftime('%Y%m%d-%H%M%S')}.csv"))
        return CSVLogger(save_dir=save_dir, name=name, version=version)
    raise ValueError(f"unknown logger backend {backend!r}; choose {', '.join(BACKENDS)}")


def _only_logger_files(folder: Path) -> bool:
    """Whether `folder` holds nothing but what the loggers and the config callback write before the first step
    (TensorBoard event files, hparams.yaml, config.yaml, metrics.csv) and empty folders."""
    for path in folder.rglob("*"):
        if path.is_symlink() or not (path.is_dir() or path.name in LOGGER_FILES or path.name.startswith(EVENTS)):
            return False
    return True


LOGGER_FILES = ("hparams.yaml", "config.yaml", "metrics.csv")
EVENTS = "events.out.tfevents."


class DiscardUnusedLogFolder(Callback):
    """Remove the log folder (`<save_dir>/<name>/version_N`) that a run made when it fails before its first step.

    Lightning creates the logger's folder while it sets up, before the data is loaded; a run that then fails (a
    missing data set, a bad option) would leave an empty `version_N` behind, and the next run would write to
    `version_N+1`. Removed only when this run created the folder (never a resumed run's), took no training step
    and logged no metric, and the folder holds nothing but the logger's own files. The run's folder and the root
    go too when this run created them and they are empty now. Only TensorBoard and CSV folders (wandb keeps its
    own).
    """

    def __init__(self, save_dir: str | os.PathLike, name: str) -> None:
        self.run_dir = Path(save_dir, name).absolute()
        # What existed before the run: never removed.
        self.existing = {self.run_dir.parent, self.run_dir} if self.run_dir.is_dir() else set()
        if self.existing:
            self.existing |= set(self.run_dir.iterdir())
        elif self.run_dir.parent.is_dir():
            self.existing.add(self.run_dir.parent)
        self.stepped = False

    def on_train_batch_end(self, *args, **kwargs) -> None:
        self.stepped = True

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Validate and test log their metrics at the end of the epoch: a run that failed before has logged nothing.
        if self.stepped or trainer.logged_metrics or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if not isinstance(logger, (TensorBoardLogger, CSVLogger)):
                continue
            log_dir = Path(logger.log_dir).absolute()
            if log_dir.parent != self.run_dir or log_dir in self.existing or not log_dir.is_dir():
                continue
            if _only_logger_files(log_dir):
                # Close the event file before its folder goes (Lightning's own call after this one does nothing).
                logger.finalize("failed")
                shutil.rmtree(log_dir, ignore_errors=True)
        for folder in (self.run_dir, self.run_dir.parent):
            if folder not in self.existing and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
