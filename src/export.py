"""Inference-only export of a trained model: the EMA weights of a Lightning checkpoint as a small folder

    OUT_DIR/model.safetensors   the EMA network's state dict (float32, no optimizer state, no training copy)
    OUT_DIR/config.json         {"net": class and arguments, "schedule": recipe, "prediction", "sampler": settings}

that `DiffusionModel.load(OUT_DIR)` (src/models/diffusion.py) turns back into a model that samples without
Lightning, so that a notebook, a script or another code base needs only torch, safetensors and `src.models` /
`src.diffusion`.

    python -m src.export runs/fashion_mnist/version_0/checkpoints/last.ckpt exported/fashion_mnist [--overwrite]

The network's class and arguments come from the checkpoint (DiffusionModule records them); for checkpoints of old
versions that did not, from `--config FILE` or the `config.yaml` that the CLI writes in the run folder.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from src.models.diffusion import CONFIG_NAME, WEIGHTS_NAME, DiffusionModel


def export_checkpoint(
    ckpt_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    config: str | os.PathLike | None = None,
) -> Path:
    """Write the EMA weights of a DiffusionModule checkpoint and their config to `out_dir` (see module docstring).

    Refuses to write into a folder that already holds files unless `overwrite`.
    """
    ckpt_path, out = Path(ckpt_path), Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace its files")
    model = DiffusionModel.load(ckpt_path, config=config)
    # Memory-mapped: only the step counters are read here (DiffusionModel.load read the weights).
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    source = {
        "checkpoint": str(ckpt_path),
        "global_step": checkpoint.get("global_step"),
        "epoch": checkpoint.get("epoch"),
        "weights": "ema",
    }
    return model.save(out, overwrite=True, source=source)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m src.export", description="Export the EMA weights of a checkpoint for inference."
    )
    parser.add_argument("checkpoint", help="a DiffusionModule .ckpt file")
    parser.add_argument("out_dir", help="folder for model.safetensors and config.json")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty out_dir")
    parser.add_argument(
        "--config", default=None, help="the training YAML, when the run folder's config.yaml is not beside the ckpt"
    )
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out_dir, overwrite=args.overwrite, config=args.config)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")
    size = (out / WEIGHTS_NAME).stat().st_size / 2**20
    print(f"wrote {out / WEIGHTS_NAME} ({size:.1f} MiB) and {out / CONFIG_NAME}")


if __name__ == "__main__":
    main()
