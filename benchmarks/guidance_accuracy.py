"""Classifier-free guidance strength vs class fidelity: the accuracy of an independent classifier on guided samples of
a class-conditional checkpoint, for several guidance weights w (Ho & Salimans 2022 measure the same trade-off with
Inception Score; accuracy is its label-aware analogue for Fashion-MNIST / MNIST / CIFAR-10).

    python benchmarks/guidance_accuracy.py --ckpt runs/fashion_mnist_cond/version_0/checkpoints/last.ckpt \
        --w 0 0.5 1 2 4 --num-samples 1000

1. The classifier: a `NoisyClassifier` trained on the clean training set (t = 0 only; independent of the diffusion
   model), cached at --classifier (trained and saved there when the file does not exist); its test accuracy is
   printed, the ceiling for the samples' accuracy.
2. For each w, sample i gets label i % num_classes and guidance scale s = 1 + w (--model.guidance.scale); the table
   lists the classifier's accuracy on the samples against their labels and its mean confidence. w = -1 is the
   unconditional model (accuracy ~ 1 / num_classes expected), w = 0 the plain conditional one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from src.data import load_dataset, to_model_range  # noqa: E402
from src.models.classifier import NoisyClassifier  # noqa: E402


def train_classifier(args: argparse.Namespace, device: torch.device) -> NoisyClassifier:
    images, labels = load_dataset(args.dataset, "train", args.data_dir)
    images = to_model_range(images)
    c, h = images.shape[1], images.shape[-1]
    model = NoisyClassifier(num_classes=int(labels.max()) + 1, in_channels=c, base_channels=32, channel_mult=(1, 2, 2),
                            num_res_blocks=1, image_size=h, norm_groups=8).to(device)  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    model.train()
    start = time.perf_counter()
    for step in range(args.classifier_steps):
        idx = torch.randint(0, len(images), (args.batch_size,), generator=generator)
        x, y = images[idx].to(device), labels[idx].to(device)
        if c == 3:  # random horizontal flips for CIFAR-10
            flip = torch.rand(len(idx), generator=generator).to(device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = F.cross_entropy(model(x, torch.zeros(len(idx), dtype=torch.int64, device=device)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 200 == 0:
            print(f"classifier step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return model.eval()


@torch.no_grad()
def accuracy(model: NoisyClassifier, images: torch.Tensor, labels: torch.Tensor, device: torch.device):
    """(accuracy, mean probability of the true label) of `model` at t = 0 on images in [-1, 1]."""
    correct, confidence = 0, 0.0
    for chunk in torch.arange(len(images)).split(500):
        x = images[chunk].to(device)
        probs = model(x, torch.zeros(len(chunk), dtype=torch.int64, device=device)).softmax(-1)
        y = labels[chunk].to(device)
        correct += int((probs.argmax(-1) == y).sum())
        confidence += float(probs[torch.arange(len(chunk)), y].sum())
    return correct / len(images), confidence / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a class-conditional DiffusionModule checkpoint")
    parser.add_argument("--w", type=float, nargs="+", default=[-1.0, 0.0, 0.5, 1.0, 2.0, 4.0],
                        help="guidance weights w (guidance scale s = 1 + w)")  # fmt: skip
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--sampler", default=None, help="override the checkpoint's sampler (ddim, dpmpp_2m, ...)")
    parser.add_argument("--steps", type=int, default=None, help="override the sampling steps")
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--classifier", default="runs/guidance_accuracy_classifier.pt")
    parser.add_argument("--classifier-steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--sample-batch-size", type=int, default=250)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    from src.models.diffusion import DiffusionModel

    path = Path(args.classifier)
    if path.is_file():
        classifier = NoisyClassifier.load(str(path), device).to(device)
    else:
        classifier = train_classifier(args, device)
        path.parent.mkdir(parents=True, exist_ok=True)
        classifier.save(str(path))
    test_images, test_labels = load_dataset(args.dataset, "test", args.data_dir)
    test_acc, _ = accuracy(classifier, to_model_range(test_images), test_labels, device)
    print(f"classifier test accuracy on real {args.dataset} images: {test_acc:.4f}")

    model = DiffusionModel.load(args.ckpt, device)
    if not model.conditional:
        raise SystemExit(f"{args.ckpt}: the network is not class-conditional (num_classes unset)")
    overrides = {k: v for k, v in (("sampler", args.sampler), ("steps", args.steps)) if v is not None}
    indices = torch.arange(args.num_samples)
    labels = model.labels_for(indices).cpu()
    print(f"{'w':>6} {'s=1+w':>6} {'accuracy':>9} {'p(y|x)':>7} {'s/1k img':>9}")
    for w in args.w:
        start = time.perf_counter()
        samples = []
        for chunk in indices.split(args.sample_batch_size):
            # Sample i's noise from its own generator (src/seeding.py), as predict draws it.
            samples.append(model.sample_indices(chunk, guidance_scale=1.0 + w, **overrides).cpu())
        seconds = time.perf_counter() - start
        acc, conf = accuracy(classifier, torch.cat(samples).clamp(-1, 1), labels, device)
        print(f"{w:6.2f} {1 + w:6.2f} {acc:9.4f} {conf:7.4f} {1000 * seconds / args.num_samples:9.1f}", flush=True)


if __name__ == "__main__":
    main()
