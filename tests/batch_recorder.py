"""A callback for command-line tests: records every training batch each process sees (in a subprocess, e.g. DDP)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L


class RecordBatches(L.Callback):
    """Writes `<out_dir>/rank<r>.json`: per step, the batch size and a hash of each image, on each process."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        images = batch[0].detach().cpu().contiguous()
        hashes = [hashlib.sha1(image.numpy().tobytes()).hexdigest()[:16] for image in images]
        self.steps.append({"step": trainer.global_step, "batch_size": len(images), "images": hashes,
                           "labels": batch[1].tolist()})  # fmt: skip

    def on_train_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(
            json.dumps({"world_size": trainer.world_size, "steps": self.steps})
        )
