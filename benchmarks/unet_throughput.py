"""Training-step and sampling throughput of our UNet against diffusers' UNet2DModel of the same configuration.

Both networks are built from the same settings (widths, blocks, attention resolutions, GroupNorm groups, one
attention head), run the same step (forward, MSE loss, backward, Adam) on the same batch, and are timed
alternately in one process so that machine noise hits both alike. Prints images/s and the ratio ours/theirs.

    python benchmarks/unet_throughput.py                        # quickstart config (Fashion-MNIST, CPU-sized)
    python benchmarks/unet_throughput.py --config cifar10 --batch-size 16
Needs the `bench` extra (diffusers).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src.models.unet import UNet  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def unet_settings(config: str) -> dict:
    with open(CONFIGS / f"{config}.yaml") as f:
        return yaml.safe_load(f)["model"]["net"]["init_args"]


def diffusers_unet(s: dict) -> torch.nn.Module:
    """diffusers' UNet2DModel with the same architecture as `UNet(**s)` (DDPM-style options)."""
    from diffusers import UNet2DModel

    resolutions = [s["image_size"] // 2**i for i in range(len(s["channel_mult"]))]
    attn = [r in s["attn_resolutions"] for r in resolutions]
    return UNet2DModel(
        sample_size=s["image_size"],
        in_channels=s["in_channels"],
        out_channels=s["in_channels"],
        block_out_channels=tuple(s["base_channels"] * m for m in s["channel_mult"]),
        layers_per_block=s["num_res_blocks"],
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        norm_num_groups=s["norm_groups"],
        norm_eps=1e-6,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
        attention_head_dim=None,  # one head of all channels, as DDPM
        dropout=s["dropout"],
        add_attention=s.get("mid_attention", True),
    )


def time_steps(step, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="fashion_mnist", help="a file in configs/ (without .yaml)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per network and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (ours, theirs, ours, ...)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    s = unet_settings(args.config)
    device = torch.device(args.device)
    torch.manual_seed(0)
    nets = {"ours": UNet(**s).to(device), "diffusers": diffusers_unet(s).to(device)}
    b, c, h = args.batch_size, s["in_channels"], s["image_size"]
    x = torch.randn(b, c, h, h, device=device)
    t = torch.randint(0, 1000, (b,), device=device)
    target = torch.randn_like(x)

    def call(name: str, net: torch.nn.Module) -> torch.Tensor:
        return net(x, t) if name == "ours" else net(x, t).sample

    def train_step_fn(name: str):
        net = nets[name].train()
        opt = torch.optim.Adam(net.parameters(), lr=1e-4)

        def step() -> None:
            loss = (call(name, net) - target).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    def sample_step_fn(name: str):
        net = nets[name].eval()

        @torch.no_grad()
        def step() -> None:
            call(name, net)

        return step

    print(f"config={args.config} device={device} batch={b} image={c}x{h}x{h} threads={torch.get_num_threads()}")
    for name, net in nets.items():
        print(f"  {name:9s} parameters: {sum(p.numel() for p in net.parameters()):,}")
    for kind, make in (("train step", train_step_fn), ("forward (sampling)", sample_step_fn)):
        steps = {name: make(name) for name in nets}
        for step in steps.values():  # warm-up: allocator, oneDNN/cuDNN kernel choice
            time_steps(step, 2)
        times: dict[str, list[float]] = {name: [] for name in nets}
        for _ in range(args.rounds):
            for name, step in steps.items():
                times[name] += time_steps(step, args.steps)
        rate = {name: b / statistics.median(ts) for name, ts in times.items()}
        print(
            f"{kind}: ours {rate['ours']:.1f} img/s, diffusers {rate['diffusers']:.1f} img/s, "
            f"ratio ours/diffusers {rate['ours'] / rate['diffusers']:.2f}"
        )


if __name__ == "__main__":
    main()
