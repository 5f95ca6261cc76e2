"""Checkpoint files that are never half-written: write to a temporary file, then rename over the target
(`src.atomic.save_atomically`).

`os.replace` is atomic on POSIX file systems, so a run killed while saving leaves either the previous
checkpoint or the new one, never a truncated file that `--ckpt_path last` would then fail to load.
"""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from src.atomic import save_atomically


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local saves go through a temporary file in the same folder and `os.replace`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options=None) -> None:
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)  # remote storage: no rename
        save_atomically(checkpoint, path)
