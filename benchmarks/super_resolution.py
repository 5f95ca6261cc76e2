"""A super-resolution model (concatenation conditioning, `configs/fashion_mnist_super_resolution.yaml`) against the
bicubic enlargement it is conditioned on, on the first `--num` test images: PSNR to the originals, consistency
(PSNR of the output reduced again against the low-resolution input: a faithful model keeps it, SR3's criterion,
Saharia et al. 2021, section 4), and with `--extractor` (the fd_classifier's file) the Fréchet distance to
`--num` other real test images and the classifier's agreement with the originals' labels, beside real against
real as the floor.

    python benchmarks/super_resolution.py runs/fashion_mnist_super_resolution/version_0/checkpoints/last.ckpt \
        --extractor runs/fashion_mnist_fd_classifier/version_0/classifier.pt

A sharp, plausible sample is not the mean of the images that reduce to the input, so its PSNR is lower than a
blurred estimate's can be (the regression-to-the-mean effect SR3 reports): read PSNR with the Fréchet distance.
"""

from __future__ import annotations

import argparse
import time

import torch
from autoencoder_quality import fd, psnr
from common import cpu_name

from src.data.builtin import load_dataset
from src.images import to_uint8
from src.metrics.features import build_feature_extractor
from src.models.diffusion import DiffusionModel


@torch.no_grad()
def agreement(extractor: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of `images` the feature classifier assigns to `labels`."""
    logits = torch.cat([extractor(to_uint8(x))["class_logits"] for x in images.split(500)])
    return (logits.argmax(1) == labels).double().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a super-resolution run's checkpoint or export")
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--num", type=int, default=1000, help="test images to enlarge (and per side of the distances)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the checkpoint's)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--extractor", default=None, help="feature classifier file for distances and agreement")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    model = DiffusionModel.load(args.checkpoint)
    if model.condition is None:
        raise SystemExit(f"{args.checkpoint}: not a model conditioned on images (--model.condition)")
    images, labels = load_dataset(args.dataset, "test", args.data_dir)
    n = args.num
    model.condition_images = images[:n]
    originals = images[:n].float() / 127.5 - 1.0
    overrides = {"steps": args.steps} if args.steps else {}
    start = time.perf_counter()
    samples = torch.cat([model.sample_indices(chunk, **overrides) for chunk in torch.arange(n).split(args.batch_size)])
    seconds = time.perf_counter() - start
    bicubic = model.condition(originals, originals.shape[-2:])
    low = model.condition.reduce(originals)
    steps = args.steps or model.settings.steps
    print(f"{args.dataset} test images 0..{n - 1}, {model.condition.name} {model.condition.config}; "
          f"{model.settings.sampler}, {steps} steps: {seconds:.1f} s; {cpu_name()}")  # fmt: skip
    extractor = build_feature_extractor(args.extractor) if args.extractor else None
    real = images[n : 2 * n].float() / 127.5 - 1.0
    print(f"| output | PSNR (dB) | consistency PSNR (dB) | fd_classifier n = {n} | label agreement |")
    print("|---|---:|---:|---:|---:|")
    rows = (
        ("bicubic enlargement", bicubic),
        ("samples", samples.clamp(-1, 1)),
        ("originals (real vs real)", originals),
    )
    for name, output in rows:
        # Outputs are compared as the PNGs a user gets: rounded to 8 bits.
        output = to_uint8(output).float() / 127.5 - 1.0
        cells = ["-", "-"]
        if output is not originals and not torch.equal(output, originals):
            cells = [f"{psnr(originals, output):.2f}", f"{psnr(low, model.condition.reduce(output)):.2f}"]
        if extractor is not None:
            cells += [f"{fd(extractor, output, real):.3f}", f"{agreement(extractor, output, labels[:n]):.3f}"]
        print(f"| {name} | " + " | ".join(cells + ["-"] * (4 - len(cells))) + " |")


if __name__ == "__main__":
    main()
