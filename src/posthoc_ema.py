"""Reconstruct the EMA of any length after training from the snapshots of `PostHocEMA` (Karras et al. 2024, EDM2,
Appendix C.3; the math: src/models/posthoc_ema.py, the callback: src/callbacks/posthoc_ema.py).

    python -m src.posthoc_ema runs/fashion_mnist_cond/version_0 --sigma_rel 0.05 0.09 0.15 --out_dir runs/phema
    python -m src.posthoc_ema RUN_DIR --sigma_rel 0.07 --out_dir runs/phema --format ckpt   # for predict / make sample
    python -m src.posthoc_ema RUN_DIR --list                                                # what the snapshots hold

For each sigma_rel, the snapshots up to `--step` (default: the last one) are combined with the least-squares
coefficients of EDM2 and the result written to `OUT_DIR/sigma_rel_<value>`: an export folder that
`DiffusionModel.load` reads (`--format export`, the default), or with `--format ckpt` a `.ckpt` copy of the run's
checkpoint whose EMA weights are the reconstruction (no optimizer state: for validate / test / predict, e.g.
`make sample CKPT=runs/phema/sigma_rel_0.070.ckpt`). The network, schedule and sampler options come from the run's
checkpoint (`--ckpt`, default RUN_DIR/checkpoints/last.ckpt). Each line printed gives the coefficients and how
closely the snapshots express the asked-for profile (its relative L2 error; a few percent or less is a faithful
reconstruction, more means the length lies outside what the tracked ones and the snapshot count cover).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from src.atomic import save_atomically
from src.callbacks.posthoc_ema import SNAPSHOT_DIR, SNAPSHOT_FORMAT, split_state
from src.errors import ConfigError
from src.models.diffusion import CHECKPOINT_EMA_PREFIX, CHECKPOINT_PROCESS_PREFIX, DiffusionModel
from src.models.posthoc_ema import (  # noqa: F401  (parse_early_ema: re-exported)
    combine_state_dicts,
    gamma_to_sigma_rel,
    parse_early_ema,
    posthoc_coefficients,
    profile_error,
    sigma_rel_to_gamma,
)


def snapshot_files(path: str | os.PathLike) -> list[Path]:
    """The snapshot files of a run folder (or of its posthoc_ema/ folder), in step order."""
    folder = Path(path)
    if (folder / SNAPSHOT_DIR).is_dir():
        folder = folder / SNAPSHOT_DIR
    files = sorted(folder.glob("step_*.pt"))
    if not files:
        raise ConfigError(
            f"{path}: no post-hoc EMA snapshots (posthoc_ema/step_*.pt); train with the PostHocEMA callback "
            "(src/callbacks/posthoc_ema.py) in trainer.callbacks"
        )
    return files


def read_headers(files: list[Path]) -> list[dict]:
    """(path, step, gammas) of each snapshot, reading the files memory-mapped (the weights are not loaded)."""
    headers = []
    for path in files:
        snapshot = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if snapshot.get("format") != SNAPSHOT_FORMAT:
            raise ConfigError(f"{path} is not a PostHocEMA snapshot (format {snapshot.get('format')!r})")
        headers.append({"path": path, "step": int(snapshot["step"]), "gammas": [float(g) for g in snapshot["gammas"]]})
    return headers


def reconstruct(headers: list[dict], sigma_rel: float, step: int | None = None) -> tuple[dict, dict]:
    """The state dict of the power-function EMA of length `sigma_rel` at `step` (default: the last snapshot's)
    from the snapshots up to that step, and a summary (coefficients, profile error). Reads one file at a time."""
    gamma = sigma_rel_to_gamma(sigma_rel)
    step = step or max(h["step"] for h in headers)
    used = [h for h in headers if h["step"] <= step]
    if not used:
        raise ConfigError(f"no snapshot at or before step {step} (the first is at step {headers[0]['step']})")
    steps = [h["step"] for h in used for _ in h["gammas"]]
    gammas = [g for h in used for g in h["gammas"]]
    x = posthoc_coefficients(steps, gammas, step, gamma)
    error = profile_error(steps, gammas, x, step, gamma)

    def weighted() -> Iterator[tuple[float, dict]]:
        i = 0
        for header in used:
            averages = torch.load(header["path"], map_location="cpu", weights_only=True)["averages"]
            for average in averages:
                yield float(x[i]), average
                i += 1

    summary = {"sigma_rel": sigma_rel, "gamma": gamma, "step": step, "snapshots": len(used),
               "coefficients": x.tolist(), "profile_error": error}  # fmt: skip
    return combine_state_dicts(weighted()), summary


def load_reconstruction(model: DiffusionModel, state: dict) -> DiffusionModel:
    """`model` with a reconstructed state: its network, and its learned process when the snapshots hold one."""
    net_state, process_state = split_state(state)
    model.net.load_state_dict(net_state)
    if process_state:
        model.process.load_state_dict(process_state)
    return model


def write_checkpoint(ckpt_path: Path, state: dict, summary: dict, out: Path) -> Path:
    """A copy of the checkpoint with `state` as its EMA (sampling) weights (the network's and a learned process's),
    without optimizer and callback state."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    weights = checkpoint["state_dict"]
    net_state, process_state = split_state(state)
    ema_keys = [k for k in weights if k.startswith(CHECKPOINT_EMA_PREFIX)]
    if sorted(k[len(CHECKPOINT_EMA_PREFIX) :] for k in ema_keys) != sorted(net_state):
        raise ConfigError(f"{ckpt_path}: its network's weights are not the ones in the snapshots (another run?)")
    for key in ema_keys:
        weights[key] = net_state[key[len(CHECKPOINT_EMA_PREFIX) :]].to(weights[key].dtype)
    for key, value in process_state.items():  # the sampling copy of the learned process (DiffusionModule's model)
        weights[CHECKPOINT_PROCESS_PREFIX + key] = value.to(weights[CHECKPOINT_PROCESS_PREFIX + key].dtype)
    for key in ("optimizer_states", "lr_schedulers", "callbacks"):
        checkpoint.pop(key, None)
    checkpoint["posthoc_ema"] = summary | {"checkpoint": str(ckpt_path)}
    save_atomically(checkpoint, out)
    return out


def early_ema_guide(
    ckpt_path: str | os.PathLike, fraction: float, sigma_rel: float = 0.05
) -> tuple[DiffusionModel, dict]:
    """Autoguidance's weaker model (Karras et al. 2024, section 3: the same network trained shorter) made from the
    run's own post-hoc EMA snapshots: the EMA of length `sigma_rel` at the snapshot step nearest to `fraction` of the
    checkpoint's steps, reconstructed as `python -m src.posthoc_ema RUN --step N` would. The run folder is the
    checkpoint's (`<run>/checkpoints/<file>.ckpt`). Returns the model (eval, frozen) and the reconstruction summary."""
    ckpt = Path(ckpt_path)
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    try:
        files = snapshot_files(run)
    except ConfigError:
        raise ConfigError(
            f"--model.guidance.model posthoc_ema@{fraction}: no post-hoc EMA snapshots in {run / SNAPSHOT_DIR} (the "
            "PostHocEMA callback writes them during fit); name a guide file instead, or sample without autoguidance "
            "(--model.guidance.model null --model.guidance.autoguidance_scale 1)"
        ) from None
    headers = read_headers(files)
    total = int(torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True).get("global_step", 0))
    step = min((h["step"] for h in headers if h["step"] <= max(total, headers[0]["step"])),
               key=lambda s: abs(s - fraction * total))  # fmt: skip
    state, summary = reconstruct(headers, sigma_rel, step)
    model = load_reconstruction(DiffusionModel.load(ckpt), state)
    return model.requires_grad_(False), summary | {"of_steps": total}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.posthoc_ema", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="the run folder (with posthoc_ema/ and checkpoints/) or its posthoc_ema/")
    parser.add_argument("--sigma_rel", type=float, nargs="+", help="EMA lengths to reconstruct, e.g. 0.05 0.09")
    parser.add_argument("--out_dir", help="folder for sigma_rel_<value> exports (or .ckpt files)")
    parser.add_argument("--format", choices=("export", "ckpt"), default="export")
    parser.add_argument("--step", type=int, default=None, help="reconstruct at this step (default: the last)")
    parser.add_argument("--ckpt", default=None, help="the run's checkpoint (default RUN_DIR/checkpoints/last.ckpt)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--list", action="store_true", help="list the snapshots and exit")
    args = parser.parse_args(argv)
    try:
        headers = read_headers(snapshot_files(args.run_dir))
        if args.list:
            for h in headers:
                lengths = ", ".join(f"{gamma_to_sigma_rel(g):.3f}" for g in h["gammas"])
                print(f"step {h['step']:>8}  sigma_rel {lengths}  {h['path'].name}")
            return
        if not args.sigma_rel or not args.out_dir:
            raise ConfigError("give --sigma_rel (one or more) and --out_dir, or --list")
        run = Path(args.run_dir)
        run = run.parent if run.name == SNAPSHOT_DIR else run
        ckpt = Path(args.ckpt) if args.ckpt else run / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise ConfigError(f"{ckpt}: no checkpoint; pass the run's checkpoint with --ckpt")
        out_dir = Path(args.out_dir)
        model = DiffusionModel.load(ckpt) if args.format == "export" else None  # network, schedule, sampler
        for sigma_rel in args.sigma_rel:
            name = f"sigma_rel_{sigma_rel:.3f}"
            out = out_dir / (name + ".ckpt" if args.format == "ckpt" else name)
            if out.exists() and not args.overwrite:
                raise ConfigError(f"{out} exists; pass --overwrite to replace it")
            state, summary = reconstruct(headers, sigma_rel, args.step)
            if args.format == "ckpt":
                write_checkpoint(ckpt, state, summary, out)
            else:
                load_reconstruction(model, state)
                model.save(out, overwrite=True, source={"checkpoint": str(ckpt), "weights": "posthoc_ema"} | summary)
            x = np.asarray(summary["coefficients"])
            print(f"sigma_rel {sigma_rel:.3f} (gamma {summary['gamma']:.2f}) at step {summary['step']}: "
                  f"{summary['snapshots']} snapshots, coefficients {x.min():+.3f}..{x.max():+.3f} (sum {x.sum():.4f}), "
                  f"profile error {summary['profile_error']:.2%} -> {out}")  # fmt: skip
    except (ConfigError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
