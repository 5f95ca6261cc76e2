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
import time
from pathlib import Path

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger


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


def auto_logger(save_dir: str, name: str, backend: str = "auto", version: str | None = None) -> Logger:
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
    raise ValueError(f"unknown logger backend {backend!r}; choose auto, wandb, wandb_offline, tensorboard or csv")
