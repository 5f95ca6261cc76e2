"""Gradient checkpointing: time of a training step (forward + backward) and peak memory, without and with it.

The same UNet (improved DDPM's layout: heads, scale-shift, optionally ADM's residual up/down blocks) is built twice
with the same weights, once with `gradient_checkpointing=True`; both run forward, MSE loss and backward on the same
batch, timed alternately in one process so that machine noise hits both alike. Prints the step time of each, the
ratio with/without, and the peak memory of one step: on CUDA torch.cuda.max_memory_allocated, on a CPU the peak of
live tensor bytes in torch.profiler's memory timeline (exact, but the profiled step is slow).

    python benchmarks/unet_checkpointing.py                                    # 64x64, narrow, on a CPU
    python benchmarks/unet_checkpointing.py --image-size 256 --base-channels 128 --batch-size 8   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

import torch
from common import median_seconds

from src.models.unet import UNet

# Levels per image size: DDPM's for 256 (and 32), improved DDPM's for 64.
CHANNEL_MULT = {32: (1, 2, 2, 2), 64: (1, 2, 3, 4), 128: (1, 1, 2, 3, 4), 256: (1, 1, 2, 2, 4, 4)}


def build(args: argparse.Namespace, checkpointing: bool) -> UNet:
    torch.manual_seed(0)
    return UNet(
        in_channels=3,
        base_channels=args.base_channels,
        channel_mult=CHANNEL_MULT[args.image_size],
        num_res_blocks=args.num_res_blocks,
        attn_resolutions=(16, 8),
        dropout=0.0,
        image_size=args.image_size,
        norm_groups=min(32, args.base_channels // 4),
        num_heads=4,
        use_scale_shift_norm=True,
        resblock_updown=args.resblock_updown,
        gradient_checkpointing=checkpointing,
    )


def cpu_peak_bytes(step) -> int:
    """Peak of live CPU tensor bytes during `step()`, from torch.profiler's memory timeline."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "timeline.json"
        with warnings.catch_warnings():  # deprecated in favour of a CUDA-only snapshot; the CPU has no other
            warnings.simplefilter("ignore", FutureWarning)
            prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())  # [times, sizes per category]
    return max(sum(per_category) for per_category in sizes)


def peak_bytes(step, device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return cpu_peak_bytes(step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=64, choices=sorted(CHANNEL_MULT))
    parser.add_argument("--base-channels", type=int, default=32)
    parser.add_argument("--num-res-blocks", type=int, default=2)
    parser.add_argument("--resblock-updown", action="store_true")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per network and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (without, with, without, ...)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    nets = {"without": build(args, False).to(device).train(), "with": build(args, True).to(device).train()}
    nets["with"].load_state_dict(nets["without"].state_dict())
    b, s = args.batch_size, args.image_size
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 3, s, s, generator=g).to(device)
    t = torch.randint(0, 1000, (b,), generator=g).to(device)
    target = torch.randn(b, 3, s, s, generator=g).to(device)

    def step_fn(net: UNet):
        def step() -> None:
            net.zero_grad(set_to_none=True)
            (net(x, t) - target).pow(2).mean().backward()

        return step

    steps = {name: step_fn(net) for name, net in nets.items()}
    n_params = sum(p.numel() for p in nets["without"].parameters())
    print(
        f"device={device} image=3x{s}x{s} batch={b} base_channels={args.base_channels} "
        f"channel_mult={CHANNEL_MULT[s]} res_blocks={args.num_res_blocks} resblock_updown={args.resblock_updown} "
        f"parameters={n_params:,} threads={torch.get_num_threads()}"
    )
    for step in steps.values():  # warm-up: allocator, oneDNN/cuDNN kernel choice
        median_seconds(step, 1, device)
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            seconds[name].append(median_seconds(step, args.steps, device))
    best = {name: min(ts) for name, ts in seconds.items()}  # best round's median: least disturbed
    peak = {name: peak_bytes(step, device) for name, step in steps.items()}
    print(
        f"train step (forward + backward): without {best['without'] * 1e3:.0f} ms, with {best['with'] * 1e3:.0f} ms, "
        f"ratio with/without {best['with'] / best['without']:.2f}"
    )
    print(
        f"peak memory of a step: without {peak['without'] / 2**20:.0f} MiB, with {peak['with'] / 2**20:.0f} MiB, "
        f"ratio with/without {peak['with'] / peak['without']:.2f}"
    )


if __name__ == "__main__":
    main()
