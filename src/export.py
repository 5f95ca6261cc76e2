"""Inference-only export of a trained model: the EMA weights of a Lightning checkpoint as a small folder

    OUT_DIR/model.safetensors   the EMA UNet's state dict (float32, no optimizer state, no training copy)
    OUT_DIR/config.json         {"unet": UNet arguments, "schedule": NoiseSchedule recipe, "sampler": defaults, ...}

that `load_exported` turns back into (UNet, NoiseSchedule, sampler options) without Lightning, so that a notebook,
a script or another code base needs only torch, safetensors and `src.models` / `src.diffusion`.

    python -m src.export runs/fashion_mnist/version_0/checkpoints/last.ckpt exported/fashion_mnist [--overwrite]

The network's constructor arguments are not in the checkpoint itself (DiffusionModule leaves `net` out of its saved
hyperparameters); they are read, in this order, from `hyper_parameters["net"]` when present, from `--config FILE`,
or from the `config.yaml` that the CLI writes in the run folder (`<run>/version_N/config.yaml`, beside
`checkpoints/`).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from src.diffusion.schedule import NoiseSchedule
from src.models.convert import load_diffusers_unet
from src.models.unet import UNet

FORMAT = "ddim-lightning-export"
VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
UNET_CLASS_PATH = "src.models.unet.UNet"
EMA_PREFIX = "ema.model."
# DiffusionModule hyperparameter -> the sampler option name of `src.diffusion.samplers.sample`.
SAMPLER_HPARAMS = {
    "sampler": "sampler",
    "sampling_steps": "steps",
    "eta": "eta",
    "skip": "skip",
    "ddpm_variance": "variance",
    "clip_denoised": "clip_x0",
    "prediction": "prediction",  # what the net outputs: eps, x0 or v (sample() converts)
}


def _net_from_config_file(path: Path) -> dict | None:
    """`model.net` of a LightningCLI config YAML ({"class_path": ..., "init_args": {...}}), or None."""
    import yaml  # a jsonargparse dependency; only export needs it, never load_exported

    config = yaml.safe_load(path.read_text()) or {}
    for section in (config, config.get("fit", {}), config.get("predict", {})):
        net = (section.get("model") or {}).get("net") if isinstance(section, dict) else None
        if net:
            return net
    return None


def network_arguments(checkpoint: dict, ckpt_path: Path, config: str | os.PathLike | None = None) -> dict:
    """The UNet constructor arguments of a checkpoint (see the module docstring for where they come from)."""
    hparams = checkpoint.get("hyper_parameters", {})
    candidates: list[tuple[str, object]] = [("hyper_parameters['net']", lambda: hparams.get("net"))]
    if config is not None:
        candidates.append((str(config), lambda: _net_from_config_file(Path(config))))
    run_config = ckpt_path.resolve().parent.parent / "config.yaml"
    candidates.append((str(run_config), lambda: _net_from_config_file(run_config) if run_config.is_file() else None))
    for source, read in candidates:
        net = read()
        if not net:
            continue
        if isinstance(net, dict) and "class_path" in net:
            if net["class_path"] != UNET_CLASS_PATH:
                raise ValueError(f"{source}: the network is {net['class_path']}; export supports {UNET_CLASS_PATH}")
            return dict(net.get("init_args") or {})
        if isinstance(net, dict):
            return dict(net)
        raise ValueError(f"{source}: cannot read network arguments from {type(net).__name__}")
    raise ValueError(
        f"{ckpt_path}: no network arguments found (not in hyper_parameters, no {run_config}); pass --config with "
        "the YAML the model was trained with"
    )


def export_checkpoint(
    ckpt_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    config: str | os.PathLike | None = None,
) -> Path:
    """Write the EMA weights of a DiffusionModule checkpoint and their config to `out_dir` (see module docstring).

    Refuses to write into a folder that already holds files unless `overwrite`.
    """
    from safetensors.torch import save_file

    ckpt_path, out = Path(ckpt_path), Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace its files")
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    hparams = checkpoint.get("hyper_parameters", {})
    state = {k[len(EMA_PREFIX) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(EMA_PREFIX)}
    if not state:
        raise ValueError(f"{ckpt_path}: no '{EMA_PREFIX}*' weights in state_dict (not a DiffusionModule checkpoint?)")

    net_args = network_arguments(checkpoint, ckpt_path, config)
    net = UNet(**net_args)
    # Build and load once: a wrong config fails here, with torch's list of differing keys, not at load time.
    try:
        net.load_state_dict(state)
    except RuntimeError as e:  # torch lists the missing, unexpected and wrongly shaped keys
        raise ValueError(f"{ckpt_path}: the EMA weights do not fit UNet({net_args}):\n{e}") from e
    schedule = {"name": hparams.get("schedule", "linear"), "timesteps": int(hparams.get("timesteps", 1000))}
    if schedule["name"] == "linear":
        schedule.update(
            beta_start=float(hparams.get("beta_start", 1e-4)), beta_end=float(hparams.get("beta_end", 0.02))
        )
    NoiseSchedule.from_name(**schedule)  # fail now on a schedule load_exported could not rebuild
    sampler = {ours: hparams[hp] for hp, ours in SAMPLER_HPARAMS.items() if hp in hparams}

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous() for k, v in net.state_dict().items()}, out / WEIGHTS_NAME)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "unet": net.config,
        "schedule": schedule,
        "sampler": sampler,
        "source": {
            "checkpoint": str(ckpt_path),
            "global_step": checkpoint.get("global_step"),
            "epoch": checkpoint.get("epoch"),
            "weights": "ema",
        },
    }
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_exported(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[UNet, NoiseSchedule, dict]:
    """(UNet in eval mode, NoiseSchedule, sampler options) from an `export_checkpoint` folder.

    The options are keyword arguments of `src.diffusion.samplers.sample` (sampler, steps, eta, skip, variance,
    clip_x0, prediction), the values the model was trained to sample with: `sample(net, x_T, schedule, **options)`
    (an x0- or v-predicting net is then converted to eps; call the net directly and it returns its own target).
    """
    from safetensors.torch import load_file

    folder = Path(path)
    meta = json.loads((folder / CONFIG_NAME).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder / CONFIG_NAME}: not a {FORMAT} folder (format={meta.get('format')!r})")
    if meta.get("version", 0) > VERSION:
        raise ValueError(f"{folder}: export version {meta['version']} is newer than this code ({VERSION})")
    net = UNet(**meta["unet"])
    net.load_state_dict(load_file(folder / WEIGHTS_NAME))
    schedule = NoiseSchedule.from_name(**meta["schedule"])
    if torch.device(device).type != "cpu":
        net, schedule = net.to(device), schedule.to(device)
    return net.eval(), schedule, dict(meta.get("sampler", {}))


def load_checkpoint(
    ckpt_path: str | os.PathLike, config: str | os.PathLike | None = None
) -> tuple[UNet, NoiseSchedule, dict]:
    """Like `load_exported`, straight from a Lightning checkpoint (EMA weights), without writing files."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return load_exported(export_checkpoint(ckpt_path, Path(tmp) / "export", config=config))


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[UNet, NoiseSchedule, dict]:
    """(UNet, NoiseSchedule, sampler options) from any of: an exported folder, a Lightning .ckpt file, or a
    diffusers folder (UNet2DModel config.json + weights, and scheduler_config.json beside it or in `scheduler/`,
    as google/ddpm-cifar10-32 is published; without one, DDPM's linear 1e-4..0.02 schedule over 1000 steps)."""
    path = Path(path)
    if path.is_file():
        net, schedule, options = load_checkpoint(path)
    elif (path / CONFIG_NAME).is_file() and json.loads((path / CONFIG_NAME).read_text()).get("format") == FORMAT:
        net, schedule, options = load_exported(path)
    else:
        net = load_diffusers_unet(path)
        try:
            schedule = NoiseSchedule.from_diffusers(path)
        except FileNotFoundError:
            schedule = NoiseSchedule.linear(1000, 1e-4, 0.02)
        options = {}
    return net.to(device).eval(), schedule.to(device), options


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
