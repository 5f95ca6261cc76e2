"""First-stage recipes compared by test PSNR against training steps, and each recipe's seconds per step here.

Trains each named recipe of `RECIPES` (an `AutoencoderModule` loss: LDM's Laplace NLL with the learned log-variance
plus the KL term, no discriminator) on Fashion-MNIST with Adam for `--steps` steps, and prints the test-set PSNR
(posterior mean, clamped, over the whole test split) at each of `--eval-at`, and the seconds per training step on
this device. PSNR against steps comes from a fast device; seconds per step from the CPU that will train the recipe,
so that the two together say which recipe reaches a PSNR first on that CPU:

    python benchmarks/autoencoder_recipes.py --steps 6000 --device cuda            # the curves, on a GPU
    python benchmarks/autoencoder_recipes.py --steps 20 --eval-at ""              # seconds per step, on this CPU

Every recipe has 4 x 7 x 7 = 196 latent numbers per image (PCA with 196 components: 23.8 dB), except where its
name says otherwise.

Measured 2026-12-04 (constant lr, no decay; PSNR on one NVIDIA H200, s/step on a 2-core Intel Xeon, each recipe
alone, 15 steps after 3 of warm-up, the machine otherwise idle):

| recipe | parameters | s/step, 2-core Xeon | 500 steps | 1000 | 2000 | 3000 |
|---|---|---|---|---|---|---|
| lr1e-3 | 0.95M | 0.57 | 20.51 | 22.39 | 23.77 | 24.59 |
| 2layers_lr1e-3 | 1.29M | 0.85 | 20.87 | 22.90 | 24.75 | 25.45 |
| 2layers_lr1e-3_batch64 | 1.29M | 0.38 | 21.25 | 22.89 | 24.92 | 24.99 |

At equal CPU time the batch-64 recipe is ahead (2,000 of its steps cost what 900 of batch 128 do), so
configs/fashion_mnist_autoencoder.yaml trains it; LDM's lr 4.5e-4 with 1 block per level (0.62 s/step) was
the earlier recipe.
"""

from __future__ import annotations

import argparse
import time

import torch
from autoencoder_quality import psnr
from common import cpu_name

from src.autoencoder_module import AutoencoderModule
from src.data.builtin import load_dataset
from src.models.autoencoder import AutoencoderKL

BASE_NET = dict(in_channels=1, out_channels=1, block_out_channels=[32, 64, 64], layers_per_block=1,
                latent_channels=4, norm_num_groups=16, mid_attention=True)  # fmt: skip
BASE_TRAINING = dict(lr=4.5e-4, betas=(0.5, 0.9), batch_size=128, sample_posterior=True)

# name: (net overrides, training overrides)
RECIPES: dict[str, tuple[dict, dict]] = {
    "ldm_lr4.5e-4": ({}, {}),  # configs/fashion_mnist_autoencoder.yaml as of this benchmark
    "lr1e-3": ({}, {"lr": 1e-3}),
    "2layers_lr1e-3": ({"layers_per_block": 2}, {"lr": 1e-3}),
    "2layers_lr2e-3": ({"layers_per_block": 2}, {"lr": 2e-3}),
    "2layers_lr1e-3_adam.9": ({"layers_per_block": 2}, {"lr": 1e-3, "betas": (0.9, 0.999)}),
    "2layers_lr1e-3_batch64": ({"layers_per_block": 2}, {"lr": 1e-3, "batch_size": 64}),
    "2layers_lr1e-3_mean": ({"layers_per_block": 2}, {"lr": 1e-3, "sample_posterior": False}),
    "wide_lr1e-3": ({"block_out_channels": [64, 128, 128]}, {"lr": 1e-3}),
    "f2_1ch_lr1e-3": ({"block_out_channels": [32, 64], "latent_channels": 1, "layers_per_block": 2}, {"lr": 1e-3}),
}


def build(name: str) -> tuple[AutoencoderModule, dict]:
    net_overrides, training_overrides = RECIPES[name]
    training = BASE_TRAINING | training_overrides
    net = AutoencoderKL(**(BASE_NET | net_overrides))
    module = AutoencoderModule(net, lr=training["lr"], betas=training["betas"],
                               sample_posterior=training["sample_posterior"])  # fmt: skip
    return module, training


@torch.no_grad()
def test_psnr(net: AutoencoderKL, test: torch.Tensor) -> float:
    reconstructions = torch.cat([net.decode(net.encode(x).mode()).clamp(-1, 1) for x in test.split(1000)])
    return psnr(test, reconstructions)


def run(name: str, train: torch.Tensor, test: torch.Tensor, steps: int, eval_at: list[int]) -> dict:
    torch.manual_seed(0)
    module, training = build(name)
    module = module.to(train.device).train()
    parameters = list(module.net.parameters()) + [module.logvar]
    optimizer = torch.optim.Adam(parameters, lr=training["lr"], betas=training["betas"])
    generator = torch.Generator(device=train.device).manual_seed(0)
    results, seconds = {}, 0.0
    for step in range(1, steps + 1):
        start = time.perf_counter()
        index = torch.randint(len(train), (training["batch_size"],), device=train.device, generator=generator)
        images = train[index]
        flip = torch.rand(len(images), 1, 1, 1, device=train.device, generator=generator) < 0.5
        images = torch.where(flip, images.flip(-1), images)  # the data module's random horizontal flip
        reconstruction, kl, _ = module.reconstruct(images)
        _, loss = module.generator_nll(images, reconstruction, kl)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if train.is_cuda:
            torch.cuda.synchronize()
        if step > 3:  # after warm-up
            seconds += time.perf_counter() - start
        if step in eval_at:
            module.eval()
            results[step] = test_psnr(module.net, test)
            module.train()
    return {
        "psnr": results,
        "seconds_per_step": seconds / max(steps - 3, 1),
        "params": sum(p.numel() for p in parameters),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--eval-at", default="250,500,1000,1500,2000,3000,4000,6000")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    eval_at = [int(s) for s in args.eval_at.split(",") if s and int(s) <= args.steps]
    train = (load_dataset("fashion_mnist", "train", args.data_dir)[0].float() / 127.5 - 1).to(args.device)
    test = (load_dataset("fashion_mnist", "test", args.data_dir)[0].float() / 127.5 - 1).to(args.device)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name()
    print(f"Fashion-MNIST, {args.steps} steps per recipe, test PSNR (dB) over {len(test)} images; {device}")
    print("| recipe | parameters | s/step | " + " | ".join(f"{s} steps" for s in eval_at) + " |")
    print("|---" * (3 + len(eval_at)) + "|")
    for name in args.recipes:
        result = run(name, train, test, args.steps, eval_at)
        values = " | ".join(f"{result['psnr'][s]:.2f}" for s in eval_at)
        print(f"| {name} | {result['params'] / 1e6:.2f}M | {result['seconds_per_step']:.3f} | {values} |", flush=True)


if __name__ == "__main__":
    main()
