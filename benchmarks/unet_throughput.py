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

import torch
from common import as_eps_fn, diffusers_unet, median_seconds, our_unet, unet_settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="fashion_mnist", help="a file in configs/ (without .yaml)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per network and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (ours, theirs, ours, ...)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    s = unet_settings(args.config)
    device = torch.device(args.device)
    torch.manual_seed(0)
    nets = {"ours": our_unet(s).to(device), "diffusers": diffusers_unet(s).to(device)}
    b, c, h = args.batch_size, s["in_channels"], s["image_size"]
    x = torch.randn(b, c, h, h, device=device)
    t = torch.randint(0, 1000, (b,), device=device)
    target = torch.randn_like(x)

    def train_step_fn(name: str):
        net = nets[name].train()
        eps = as_eps_fn(name, net)
        opt = torch.optim.Adam(net.parameters(), lr=1e-4)

        def step() -> None:
            loss = (eps(x, t) - target).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    def sample_step_fn(name: str):
        eps = as_eps_fn(name, nets[name].eval())

        @torch.no_grad()
        def step() -> None:
            eps(x, t)

        return step

    print(f"config={args.config} device={device} batch={b} image={c}x{h}x{h} threads={torch.get_num_threads()}")
    for name, net in nets.items():
        print(f"  {name:9s} parameters: {sum(p.numel() for p in net.parameters()):,}")
    for kind, make in (("train step", train_step_fn), ("forward (sampling)", sample_step_fn)):
        steps = {name: make(name) for name in nets}
        for step in steps.values():  # warm-up: allocator, oneDNN/cuDNN kernel choice
            median_seconds(step, 2, device)
        seconds: dict[str, list[float]] = {name: [] for name in nets}
        for _ in range(args.rounds):
            for name, step in steps.items():
                seconds[name].append(median_seconds(step, args.steps, device))
        rate = {name: b / min(ts) for name, ts in seconds.items()}  # best round's median: least disturbed
        print(
            f"{kind}: ours {rate['ours']:.1f} img/s, diffusers {rate['diffusers']:.1f} img/s, "
            f"ratio ours/diffusers {rate['ours'] / rate['diffusers']:.2f}"
        )


if __name__ == "__main__":
    main()
