"""DDIM inversion and interpolation (Song, Meng & Ermon 2021, sections 5.3 and 5.4).

Encodes real images to latents x_T with `ddim_invert`, decodes them back with `ddim_sample(eta=0)` and reports the
reconstruction error for several step counts (the paper's Table 2 shows it falling with the number of steps); then
decodes spherical interpolations between the latents of two images (section 5.3, Figure 6).

    python scripts/ddim_inversion.py MODEL [--dataset fashion_mnist] [--steps 10 50 100] [--out_dir DIR]

MODEL is an exported folder (`python -m src.export`), a Lightning checkpoint (.ckpt) or a diffusers UNet folder.
Writes to --out_dir: errors.csv and errors.md (MSE per step count, images in [-1, 1]), reconstruction.png (first
row the originals, then one row per step count) and interpolation.png (rows: slerp, then lerp for comparison).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from anywhere: find `src`

from src.diffusion.interpolation import lerp, slerp  # noqa: E402
from src.diffusion.samplers import ddim_invert, ddim_sample  # noqa: E402
from src.diffusion.schedule import NoiseSchedule  # noqa: E402

Denoiser = Callable[[Tensor, Tensor], Tensor]


def reconstruction_errors(
    model: Denoiser, x0: Tensor, schedule: NoiseSchedule, steps: Sequence[int] = (10, 50, 100), skip: str = "uniform"
) -> tuple[list[dict], dict[int, Tensor]]:
    """For each step count: invert x0 to x_T, decode with DDIM eta=0, and measure.

    Returns rows {steps, mse, max_abs, latent_std, seconds} and the reconstructions by step count.
    """
    rows, reconstructions = [], {}
    for n in steps:
        start = time.perf_counter()
        x_T = ddim_invert(model, x0, schedule, steps=n, skip=skip)
        rec = ddim_sample(model, x_T, schedule, steps=n, eta=0.0, skip=skip)
        seconds = time.perf_counter() - start
        err = (rec.double() - x0.double()).flatten(1)
        rows.append(
            dict(
                steps=n,
                mse=err.pow(2).mean().item(),
                max_abs=err.abs().max().item(),
                latent_std=x_T.double().std().item(),  # ~1 when the encoding looks like the prior N(0, I)
                seconds=seconds,
            )
        )
        reconstructions[n] = rec
    return rows, reconstructions


def interpolate(
    model: Denoiser,
    z0: Tensor,
    z1: Tensor,
    schedule: NoiseSchedule,
    num: int = 8,
    steps: int = 50,
    skip: str = "uniform",
    method: Callable[[Tensor, Tensor, Tensor], Tensor] = slerp,
) -> Tensor:
    """Decode `num` interpolants between latents z0 and z1 (C, H, W) with DDIM eta=0: (num, C, H, W)."""
    latents = method(z0, z1, torch.linspace(0.0, 1.0, num))
    return ddim_sample(model, latents, schedule, steps=steps, eta=0.0, skip=skip)


def write_tables(rows: list[dict], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "errors.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "| DDIM steps | MSE | max abs error | std of x_T | seconds |",
        "| ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {r['steps']} | {r['mse']:.3e} | {r['max_abs']:.3f} | {r['latent_std']:.3f} | {r['seconds']:.1f} |"
            for r in rows
        ),
    ]
    (out_dir / "errors.md").write_text(
        "Reconstruction x_0 -> x_T -> x_0, images in [-1, 1]\n\n" + "\n".join(lines) + "\n"
    )


def run(
    model: Denoiser,
    schedule: NoiseSchedule,
    images: Tensor,
    out_dir: str | Path,
    steps: Sequence[int] = (10, 50, 100),
    interp_steps: int = 50,
    num_interp: int = 8,
    skip: str = "uniform",
) -> list[dict]:
    """The whole experiment on `images` in [-1, 1] (B >= 2); writes the files listed in the module docstring."""
    from src.images import save_grid

    out_dir = Path(out_dir)
    rows, recs = reconstruction_errors(model, images, schedule, steps, skip)
    write_tables(rows, out_dir)
    save_grid(torch.cat([images, *(recs[n] for n in steps)]).cpu(), out_dir / "reconstruction.png", nrow=len(images))
    z = ddim_invert(model, images[:2], schedule, steps=interp_steps, skip=skip)
    rows_interp = [interpolate(model, z[0], z[1], schedule, num_interp, interp_steps, skip, m) for m in (slerp, lerp)]
    save_grid(torch.cat(rows_interp).cpu(), out_dir / "interpolation.png", nrow=num_interp)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="exported folder, Lightning .ckpt, or diffusers UNet folder")
    parser.add_argument("--dataset", default="fashion_mnist", help="fashion_mnist | mnist | cifar10")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--split", default="test")
    parser.add_argument("--num_images", type=int, default=8)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--skip", default="uniform")
    parser.add_argument("--interp_steps", type=int, default=50)
    parser.add_argument("--num_interp", type=int, default=8)
    parser.add_argument("--out_dir", default="inversion")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    from src.data import load_dataset, to_model_range
    from src.models.diffusion import DiffusionModel

    model = DiffusionModel.load(args.model, args.device)
    net, schedule = model.eps_model(), model.schedule
    images = to_model_range(load_dataset(args.dataset, args.split, args.data_dir)[0][: args.num_images])
    if images.shape[1:] != model.image_shape:
        parser.error(f"{args.dataset} images are {tuple(images.shape[1:])}, the model takes {model.image_shape}")
    rows = run(
        net, schedule, images.to(args.device), args.out_dir, args.steps, args.interp_steps, args.num_interp, args.skip
    )
    print((Path(args.out_dir) / "errors.md").read_text())
    print(f"wrote {args.out_dir}/errors.csv, errors.md, reconstruction.png, interpolation.png ({len(rows)} rows)")


if __name__ == "__main__":
    main()
