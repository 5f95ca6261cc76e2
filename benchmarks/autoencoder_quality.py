"""A first-stage autoencoder against PCA with as many numbers per image as its latent has (latent diffusion's
compression, Rombach et al. 2022, section 3.1): test-set PSNR of both, and with `--extractor` (the fd_classifier's
file) the Fréchet distance of their reconstructions to the real images at n = `--num-fd`, beside real against real
(two disjoint sets of test images) as the floor.

    python benchmarks/autoencoder_quality.py --autoencoder runs/fashion_mnist_autoencoder/version_0/autoencoder.pt \
        --extractor runs/fashion_mnist_fd_classifier/version_0/classifier.pt

PCA is fitted on the whole training split (the principal subspace of the centred images, float64), so it is the
best linear code of that size in mean squared error: the autoencoder must beat it to be worth its decoder.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from common import cpu_name

from src.data.builtin import load_dataset
from src.images import to_uint8
from src.metrics.features import build_feature_extractor
from src.metrics.fid import feature_statistics, frechet_distance
from src.models.autoencoder import AutoencoderKL, load_autoencoder


def psnr(images: torch.Tensor, reconstructions: torch.Tensor) -> float:
    """10 log10(peak^2 / MSE) over the whole set, images in [-1, 1] (peak-to-peak 2), as torchmetrics' PSNR."""
    mse = torch.mean((reconstructions.double() - images.double()) ** 2).item()
    return 10.0 * math.log10(4.0 / mse)


def pca_reconstruct(train: torch.Tensor, test: torch.Tensor, components: int) -> torch.Tensor:
    """Test images projected on the top `components` principal directions of the training images, and back."""
    x = train.flatten(1).double()
    mean = x.mean(0)
    covariance = (x - mean).T @ (x - mean) / (x.shape[0] - 1)
    _, vectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
    basis = vectors[:, -components:]
    y = test.flatten(1).double() - mean
    return ((y @ basis) @ basis.T + mean).float().view_as(test)


@torch.no_grad()
def autoencoder_reconstruct(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Reconstructions through the posterior mean (KL) or the quantised latent (VQ), clamped to [-1, 1]."""
    out = []
    for batch in images.split(batch_size):
        latents = model.encode(batch)
        latents = latents.mode() if isinstance(model, AutoencoderKL) else latents
        out.append(model.decode(latents).clamp(-1, 1))
    return torch.cat(out)


@torch.no_grad()
def fd(extractor: torch.nn.Module, a: torch.Tensor, b: torch.Tensor) -> float:
    features = [torch.cat([extractor(to_uint8(x))["pool"] for x in images.split(500)]) for images in (a, b)]
    return frechet_distance(*feature_statistics(features[0]), *feature_statistics(features[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--autoencoder", required=True, help="an autoencoder.pt written by src.autoencoder_main fit")
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--extractor", default=None, help="feature classifier file for the Fréchet distances")
    parser.add_argument("--num-fd", type=int, default=1000, help="images per side of each Fréchet distance")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    train = load_dataset(args.dataset, "train", args.data_dir)[0].float() / 127.5 - 1
    test = load_dataset(args.dataset, "test", args.data_dir)[0].float() / 127.5 - 1
    model = load_autoencoder(args.autoencoder).eval()
    latent = model.encode(test[:1])
    numbers = (latent.mode() if isinstance(model, AutoencoderKL) else latent)[0].numel()
    start = time.perf_counter()
    reconstructed = autoencoder_reconstruct(model, test)
    seconds = time.perf_counter() - start
    pca = pca_reconstruct(train, test, numbers)
    print(f"{args.dataset} test split ({len(test)} images), {numbers} latent numbers per image "
          f"({test[0].numel()} pixels); {cpu_name()}")  # fmt: skip
    print(f"| code | test PSNR (dB) | fd n = {args.num_fd} |")
    print("|---|---|---|")
    n = args.num_fd
    extractor = build_feature_extractor(args.extractor) if args.extractor else None
    rows = [("autoencoder", reconstructed), (f"PCA, {numbers} components", pca)]
    for name, images in rows:
        distance = f"{fd(extractor, images[:n], test[:n]):.3f}" if extractor else "-"
        print(f"| {name} | {psnr(test, images):.2f} | {distance} |")
    if extractor is not None:
        print(f"| real against real (test {n} vs the next {n}) | - | {fd(extractor, test[n : 2 * n], test[:n]):.3f} |")
    print(f"autoencoder reconstruction of the test split: {seconds:.1f} s")


if __name__ == "__main__":
    main()
