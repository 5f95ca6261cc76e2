"""Training throughput, TFLOP/s and MFU of a config's full training step, against diffusers' UNet2DModel.

The step is what `DiffusionModule` does: uniform t, q_sample, L_simple, backward, gradient clipping at 1,
AdamW (fused, as in training) and the EMA update. Both networks run the same step with the same precision and batch,
timed alternately in one process. FLOPs are counted once with torch's FlopCounterMode (matmuls and
convolutions, forward and backward); MFU = achieved FLOP/s / the device's dense peak (pass --peak-tflops on
devices not in benchmarks/common.py).

    python benchmarks/train_throughput.py --config cifar10 --batch-size 128 --precision bf16   # on a GPU
    python benchmarks/train_throughput.py --config fashion_mnist --batch-size 64             # on a CPU
"""

from __future__ import annotations

import argparse
import contextlib
import copy

import torch
from common import as_eps_fn, diffusers_unet, flops, median_seconds, our_unet, peak_tflops, unet_settings

from src.diffusion.losses import l_simple
from src.diffusion.schedule import NoiseSchedule
from src.models.ema import update_ema


def make_step(net, name, schedule, x, device, dtype, channels_last):
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    eps = as_eps_fn(name, net)
    ema = copy.deepcopy(net).eval().requires_grad_(False)  # as DiffusionModule's sampling copy
    opt = torch.optim.AdamW(
        net.parameters(), lr=2e-4, weight_decay=0.0, fused=device.type in ("cuda", "cpu")
    )  # as DiffusionModule
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def step() -> None:
        with autocast:
            loss = l_simple(eps, x, schedule).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        update_ema(ema, net, 0.9999)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="fashion_mnist")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile both networks")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (dense)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    s = unet_settings(args.config)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    schedule = NoiseSchedule.linear(1000).to(device)
    b, c, h = args.batch_size, s["in_channels"], s["image_size"]
    x = torch.rand(b, c, h, h, device=device) * 2 - 1
    steps = {}
    step_flops = {}
    for name, build in (("ours", our_unet), ("diffusers", diffusers_unet)):
        net = build(s).to(device).train()
        step_flops[name] = flops(make_step(net, name, schedule, x, device, dtype, False))
        if args.compile:
            net = torch.compile(net)
        steps[name] = make_step(net, name, schedule, x, device, dtype, args.channels_last)

    peak = peak_tflops(device, dtype, args.peak_tflops)
    print(
        f"config={args.config} device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'})"
        f" batch={b} precision={args.precision} channels_last={args.channels_last} compile={args.compile}"
    )
    for step in steps.values():
        median_seconds(step, 3, device)
    seconds = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            seconds[name].append(median_seconds(step, args.steps, device))
    rate = {}
    for name in steps:
        best = min(seconds[name])
        rate[name] = b / best
        tflops = step_flops[name] / best / 1e12
        mfu = f"{100 * tflops / peak:.1f}%" if peak else "n/a (pass --peak-tflops)"
        print(
            f"  {name:9s} {rate[name]:9.1f} img/s  {step_flops[name] / b / 1e9:6.2f} GFLOP/img  "
            f"{tflops:7.3f} TFLOP/s  MFU {mfu}"
        )
    print(f"ratio ours/diffusers: {rate['ours'] / rate['diffusers']:.2f}")


if __name__ == "__main__":
    main()
