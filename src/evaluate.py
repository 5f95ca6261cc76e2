"""Offline evaluation of saved samples: FID (and KID, IS) of a folder of PNG files or a .npz of uint8 images.

    python -m src.evaluate --samples runs/samples/DIR --ref cifar10 [--split train] [--data_dir data]
    python -m src.evaluate --samples samples.npz --ref stats.npz          # pytorch-fid / torch-fidelity .npz
    python -m src.evaluate --samples DIR --ref fashion_mnist --extractor standin   # offline smoke test, NOT FID
    python -m src.evaluate --samples DIR --ref IMAGES_DIR --kid --prc     # a folder of images as the reference
    python -m src.evaluate --samples DIR --ref fashion_mnist --extractor CLASSIFIER.pt --prc --reference_values
        # fd_classifier: Fréchet distance in a Fashion-MNIST classifier's features (docs/quality.md)

A folder (either side) is read recursively, every file Pillow opens; a --ref folder is converted to the samples'
channels and size as training converts it (decoded once into the image cache of `src/data/folder.py`).

Prints one JSON object: {"fid": ..., "kid_mean", "kid_std" (with --kid and a data set or folder as --ref),
"precision", "recall" (with --prc and a data set or folder as --ref),
"is_mean", "is_std" (with --isc), "num_samples", ...}; with the stand-in extractor the keys carry "_standin";
with a classifier file the distance is "fd_classifier" and the other keys carry "_classifier". With
--reference_values, also the same distance for as many real held-out images (the test split: "<fd>_real_vs_real")
and for them plus Gaussian noise of std 0.2 in the [-1, 1] range ("<fd>_noised_real"), the scale to read it on.
With a classifier file, also what the classifier says the images are (`src/metrics/labels.py`): its accuracy on
the --ref data set's real test split ("classifier_accuracy", computed once and cached beside the reference
statistics, keyed by the file's hash), the samples' predicted class counts ("predicted_class_counts") and, when
the sample file names carry labels (`predict`'s `<label>_<index>.png`, or a `labels` array in a .npz), the
fraction of samples the classifier gives their label, overall and per class ("label_agreement",
"label_agreement_per_class"); with --reference_values, the same for the real test images ("label_agreement_real").
A data set's reference statistics are cached as in training (`--cache_dir`, default ~/.cache/ddim-lightning/fid_stats).
The scores are the torchmetrics Metrics the FID callback uses (`src/metrics/fid.py`, `src/metrics/scores.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from src.errors import ConfigError, UserError, names_a_given_path, one_line
from src.metrics import evaluation
from src.metrics.features import (
    EXTRACTORS,
    InceptionWeightsNotFoundError,
    build_feature_extractor,
    extractor_id,
    is_classifier_file,
    missing_weights_message,
)
from src.metrics.fid import FeatureStatistics, FrechetDistance
from src.metrics.labels import class_counts, classifier_test_accuracy, label_agreement, labels_from_names
from src.metrics.scores import InceptionScore, KernelInceptionDistance, PrecisionRecall


def sample_labels(path: str | Path) -> torch.Tensor | None:
    """The labels of `load_samples(path)`'s images, in its order, when the file names carry them
    (`<label>_<index>.png`, as `predict` writes conditional samples) or a .npz holds a `labels` array (or
    ADM's `arr_1` beside `arr_0`); else None."""
    path = Path(path)
    if path.is_dir():
        from src.data.folder import scan_folder

        return labels_from_names(scan_folder(path)[0])
    with np.load(path) as data:
        name = "labels" if "labels" in data.files else "arr_1" if data.files[:2] == ["arr_0", "arr_1"] else None
        return None if name is None else torch.from_numpy(data[name].astype(np.int64)).flatten()


def load_samples(path: str | Path) -> torch.Tensor:
    """uint8 (N, C, H, W) from a folder of PNG/JPEG files (sorted by name) or a .npz whose first array (or
    `samples`) is uint8 (N, H, W, C) (the DDPM/ADM convention), (N, H, W) or (N, C, H, W)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--samples {path}: no such folder or file")
    if path.is_dir():
        from src.data.folder import convert_image, scan_folder

        files = [path / rel for rel in scan_folder(path)[0]]  # recursive, sorted; raises when there are none
        arrays = [np.asarray(Image.open(p)) for p in files]
        if len({a.shape for a in arrays}) == 1:
            images = np.stack(arrays)  # (N, H, W) or (N, H, W, C)
        else:  # mixed sizes or modes: convert each as training does, to the first one's channels and size
            first = arrays[0]
            channels, size = (1 if first.ndim == 2 else first.shape[-1]), min(first.shape[:2])
            images = np.stack([convert_image(Image.open(p), size, channels) for p in files])  # (N, C, S, S)
    else:
        with np.load(path) as data:
            images = data["samples"] if "samples" in data.files else data[data.files[0]]
    if images.dtype != np.uint8:
        raise ValueError(f"--samples {path}: expected uint8 images, got {images.dtype}")
    if images.ndim == 3:
        images = images[:, None]
    elif images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(images))


@torch.no_grad()
def features_of(extractor, images: torch.Tensor, batch_size: int, device: str, desc: str) -> dict[str, torch.Tensor]:
    out: dict[str, list[torch.Tensor]] = {}
    from tqdm.auto import tqdm

    for chunk in tqdm(images.split(batch_size), desc=desc, leave=False):
        for key, value in extractor(chunk.to(device)).items():
            out.setdefault(key, []).append(value.cpu())
    return {key: torch.cat(values) for key, values in out.items()}


def noised(images: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    """uint8 images plus Gaussian noise of `std` in the [-1, 1] range, clipped and rounded back to uint8."""
    generator = torch.Generator().manual_seed(seed)
    x = images.float() / 127.5 - 1.0 + std * torch.randn(images.shape, generator=generator)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def reference_values(extractor, args, num: int, distance: FrechetDistance) -> dict[str, float]:
    """The distance of `num` real held-out images (the first of the test split) and of the same images noised:
    what a perfect model and a visibly flawed one score at this sample size (`distance` holds the reference)."""
    from src.data import load_dataset

    real, labels = (x[:num] for x in load_dataset(args.ref, "test", args.data_dir))
    if len(real) < num:
        print(f"note: the test split has {len(real)} images, fewer than the {num} samples", file=sys.stderr)
    values = {}
    for name, images in (("real_vs_real", real), ("noised_real", noised(real, args.noise_std))):
        distance.reset()  # the reference stays
        feats = features_of(extractor, images, args.batch_size, args.device, name)
        distance.update(feats["pool"])
        values[name] = float(distance.compute())
        if name == "real_vs_real" and "class_logits" in feats:
            # The classifier's agreement with real labels at this n: the ceiling for samples' label agreement.
            values["label_agreement_real"] = label_agreement(feats["class_logits"].argmax(1), labels)["label_agreement"]
    values["reference_n"] = len(real)
    return values


def classifier_results(extractor, args, samples: torch.Tensor, predicted: torch.Tensor) -> dict[str, object]:
    """What the classifier says: its accuracy on the --ref data set's test split (cached; absent for a .npz or
    folder --ref), the samples' predicted class counts and, when their names carry labels, the label agreement."""
    results: dict[str, object] = {}
    if not args.ref.endswith(".npz") and not Path(args.ref).is_dir():
        from src.data import load_dataset

        images, labels = load_dataset(args.ref, "test", args.data_dir)
        results["classifier_accuracy"] = classifier_test_accuracy(
            extractor, args.ref, images, labels, args.batch_size, args.device, args.cache_dir
        )
        results["classifier_accuracy_n"] = len(images)
    num_classes = extractor.net.num_classes
    results["predicted_class_counts"] = class_counts(predicted, num_classes)
    labels = sample_labels(args.samples)
    if labels is not None:
        if len(labels) != len(samples):
            raise ConfigError(f"--samples {args.samples}: {len(labels)} labels for {len(samples)} images")
        if int(labels.max()) >= num_classes or int(labels.min()) < 0:
            raise ConfigError(f"--samples {args.samples}: labels {int(labels.min())}..{int(labels.max())} in the file "
                             f"names, but the classifier {extractor.path} knows classes 0..{num_classes - 1}")  # fmt: skip
        results.update(label_agreement(predicted, labels))
    return results


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", required=True, help="folder of PNG files or .npz of uint8 images")
    parser.add_argument(
        "--ref", required=True, help="reference: a .npz with mu and sigma, a folder of images, or a data set name"
    )
    parser.add_argument("--split", default="train", help="data set split for --ref DATASET (train | test)")
    parser.add_argument("--data_dir", default=None, help="data folder for --ref DATASET")
    parser.add_argument(
        "--extractor",
        default="inception",
        help=f"{' | '.join(EXTRACTORS)} | a classifier file (.pt, configs/fashion_mnist_fd_classifier.yaml)",
    )
    parser.add_argument(
        "--reference_values",
        action="store_true",
        help="also the distance of real test images and of noised ones (needs --ref DATASET)",
    )
    parser.add_argument("--noise_std", type=float, default=0.2, help="noise std of --reference_values ([-1, 1] range)")
    parser.add_argument("--weights", default=None, help="InceptionV3 weights file (default: $DDIM_FID_WEIGHTS)")
    parser.add_argument("--cache_dir", default=None, help="reference statistics cache folder")
    parser.add_argument(
        "--data_cache_dir", default=None, help="decoded-image cache of a --ref folder (default: $DDIM_DATA_CACHE)"
    )
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--kid", action="store_true", help="also KID (needs --ref DATASET: features, not stats)")
    parser.add_argument("--isc", action="store_true", help="also the Inception Score of the samples")
    parser.add_argument("--prc", action="store_true", help="also precision and recall (k=3; needs --ref DATASET)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.extractor not in EXTRACTORS and not is_classifier_file(args.extractor):
        parser.error(f"--extractor {args.extractor!r}: choose one of {', '.join(EXTRACTORS)} or a classifier file")

    extractor = build_feature_extractor(args.extractor, args.weights).to(args.device)
    suffix = "" if extractor.name == "inception" else f"_{extractor.name}"
    fd_key = "fd_classifier" if extractor.name == "classifier" else f"fid{suffix}"
    samples = load_samples(args.samples)
    feats = features_of(extractor, samples, args.batch_size, args.device, "sample features")
    results: dict[str, float] = {"num_samples": len(samples)}

    ref_features = None
    if args.ref.endswith(".npz"):
        ref_mu, ref_sigma, _ = evaluation.load_statistics(args.ref)
    else:
        if Path(args.ref).is_dir():  # a folder of images, at the samples' channels and size
            from src.data import folder_images

            folder = folder_images(args.ref, samples.shape[-1], samples.shape[1], args.data_cache_dir)
            ref_images, ref_name, split = torch.from_numpy(folder.images), f"folder-{folder.digest}", "all"
        else:
            from src.data import load_dataset

            ref_images, ref_name, split = load_dataset(args.ref, args.split, args.data_dir)[0], args.ref, args.split
        key = evaluation.reference_key(ref_name, split, extractor_id(extractor), ref_images.shape[-1], len(ref_images))

        def compute() -> tuple[torch.Tensor, torch.Tensor]:
            nonlocal ref_features
            ref_features = features_of(extractor, ref_images, args.batch_size, args.device, "reference")["pool"]
            statistics = FeatureStatistics(extractor.pool_dim)
            statistics.update(ref_features)
            return statistics.compute()

        ref_mu, ref_sigma, path, _ = evaluation.cached_statistics(key, compute, args.cache_dir)
        results["ref_stats"] = str(path)
        if (args.kid or args.prc) and ref_features is None:
            ref_features = features_of(extractor, ref_images, args.batch_size, args.device, "reference")["pool"]
    distance = FrechetDistance(extractor.pool_dim, reference=(ref_mu, ref_sigma))
    distance.update(feats["pool"])
    results[fd_key] = float(distance.compute())
    if extractor.name == "classifier":  # beside the distance: how far the classifier's features can be trusted
        results.update(classifier_results(extractor, args, samples, feats["class_logits"].argmax(1)))
    if args.reference_values:
        if args.ref.endswith(".npz"):
            raise SystemExit("--reference_values needs a data set name as --ref (its test split is the real sample)")
        for name, value in reference_values(extractor, args, len(samples), distance).items():
            results[name if name.startswith("label_") else f"{fd_key}_{name}"] = value
    for flag, metric, keys in (("kid", KernelInceptionDistance(), ("kid_mean", "kid_std")),
                               ("prc", PrecisionRecall(k=3), ("precision", "recall"))):  # fmt: skip
        if getattr(args, flag):
            if ref_features is None:
                raise SystemExit(f"--{flag} needs reference features: pass a data set or a folder as --ref, not a .npz")
            metric.update(feats["pool"])
            metric.update(ref_features, real=True)
            for key, value in zip(keys, metric.compute(), strict=True):
                results[f"{key}{suffix}"] = float(value)
    if args.isc:
        if "logits" not in feats:
            raise SystemExit("--isc needs the Inception extractor's logits")
        inception_score = InceptionScore()
        inception_score.update(feats["logits"])
        results["is_mean"], results["is_std"] = (float(v) for v in inception_score.compute())
    if extractor.name == "classifier":
        results["extractor_sha256"] = extractor.sha256
        results["note"] = (
            "classifier features: NOT FID; comparable only between numbers from the same classifier file "
            "(read them beside classifier_accuracy, its accuracy on real test images)"
        )
    elif suffix:
        results["note"] = "stand-in features: these numbers are NOT FID/KID and not comparable to papers"
    json.dump(results, sys.stdout, indent=1)
    print()
    return results


def run(argv: list[str] | None = None) -> None:
    """The command line: `main`, with a missing file or weights reported as one line in this command's flags."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
    except (UserError, FileNotFoundError) as error:
        # DIFFUSION_TRACEBACK=1 shows the traceback, as for `python -m src.main`.
        if os.environ.get("DIFFUSION_TRACEBACK") or not (
            isinstance(error, UserError) or names_a_given_path(error, argv)
        ):
            raise
        if isinstance(error, InceptionWeightsNotFoundError):
            message = missing_weights_message(error.reason, "--weights", "--extractor")
        else:  # the data set messages name `src.main`'s flag
            message = str(error).replace("--data.data_dir", "--data_dir")
        sys.exit(f"error: {one_line(message)}")


if __name__ == "__main__":
    run()
