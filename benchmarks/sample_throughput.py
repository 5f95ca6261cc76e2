"""DDIM sampling throughput (images/s at 50 steps): our `ddim_sample` + UNet against diffusers' DDIMScheduler
stepping loop + UNet2DModel of the same configuration, same batch and precision, in one process.

    python benchmarks/sample_throughput.py --config cifar10 --batch-size 500 --precision bf16   # on a GPU
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from common import as_eps_fn, diffusers_unet, median_seconds, our_unet, unet_settings

from src.diffusion.samplers import ddim_sample
from src.diffusion.schedule import NoiseSchedule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="fashion_mnist")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--sampling-steps", type=int, default=50)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    from diffusers import DDIMScheduler

    s = unet_settings(args.config)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    torch.manual_seed(0)
    schedule = NoiseSchedule.linear(1000).to(device)
    b, c, h = args.batch_size, s["in_channels"], s["image_size"]
    x_T = torch.randn(b, c, h, h, device=device)
    ours = as_eps_fn("ours", our_unet(s).to(device).eval())
    theirs = as_eps_fn("diffusers", diffusers_unet(s).to(device).eval())
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing="leading",
    )

    @torch.no_grad()
    def run_ours() -> None:
        with autocast:
            ddim_sample(ours, x_T, schedule, steps=args.sampling_steps)

    @torch.no_grad()
    def run_diffusers() -> None:
        scheduler.set_timesteps(args.sampling_steps, device=device)
        x = x_T
        with autocast:
            for t in scheduler.timesteps:
                x = scheduler.step(theirs(x, t.expand(b)), t, x, eta=0.0).prev_sample

    runs = {"ours": run_ours, "diffusers": run_diffusers}
    print(f"config={args.config} device={device} batch={b} DDIM steps={args.sampling_steps} precision={args.precision}")
    seconds = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            seconds[name].append(median_seconds(fn, 1, device))
    rate = {name: b / min(ts) for name, ts in seconds.items()}
    for name in runs:
        print(f"  {name:9s} {rate[name]:8.1f} img/s  ({1000 / rate[name]:.1f} s per 1,000 images)")
    print(f"ratio ours/diffusers: {rate['ours'] / rate['diffusers']:.2f}")


if __name__ == "__main__":
    main()
