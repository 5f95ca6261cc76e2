"""Files that are never half-written: write to a temporary file, then rename over the target.

`os.replace` is atomic on POSIX file systems, so a process killed while saving leaves either the previous file or
the new one, never a truncated file. Torch only (no Lightning), so that the model layer can save with it too.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def save_atomically(obj: Any, path: str | os.PathLike) -> None:
    """torch.save `obj` to a temporary file in `path`'s folder, flushed to disk, then renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
