"""What the fd_classifier's classifier says the images are: its accuracy on the real test split (how far its
features can be trusted; printed beside every fd_classifier) and the label agreement of conditional samples.

- `labels_from_names`: the labels `predict` puts in file names, `<label>_<index>.png` (PNGWriter); None when the
  names carry none.
- `label_agreement`: the fraction of samples the classifier assigns the label they were drawn with, overall and
  per class (the "classification accuracy" of conditional samples, e.g. Dhariwal & Nichol 2021, section 4;
  Ho & Salimans 2022 read guidance the same way). On real labelled images it is the classifier's accuracy, its
  ceiling: samples cannot agree more often with a classifier than real images do, except by being easier.
- `cached_accuracy`: the accuracy of a classifier file on a data set's test split, computed once and cached as
  JSON beside the reference statistics, keyed by the file's SHA-256 (`extractor_id`).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from src.metrics.evaluation import default_cache_dir

LABELLED_NAME = re.compile(r"^(\d+)_(\d+)\.png$", re.IGNORECASE)
ACCURACY_CACHE_VERSION = 1


def labels_from_names(names: Sequence[str]) -> Tensor | None:
    """int64 labels from file names `<label>_<index>.png` (any folder before them); None unless every name has one."""
    labels = []
    for name in names:
        match = LABELLED_NAME.match(Path(name).name)
        if match is None:
            return None
        labels.append(int(match.group(1)))
    return torch.tensor(labels, dtype=torch.int64) if labels else None


def label_agreement(predicted: Tensor, labels: Tensor) -> dict[str, object]:
    """{"label_agreement": fraction of predicted == labels, "label_agreement_per_class": {label: fraction} over
    the labels present (keys are the labels as strings, for JSON)}."""
    if predicted.shape != labels.shape or predicted.ndim != 1 or len(labels) == 0:
        raise ValueError(f"expected two equal non-empty (N,) label tensors, got {tuple(predicted.shape)} and "
                         f"{tuple(labels.shape)}")  # fmt: skip
    correct = (predicted.cpu() == labels.cpu()).double()
    per_class = {str(int(c)): float(correct[labels.cpu() == c].mean()) for c in labels.unique(sorted=True)}
    return {"label_agreement": float(correct.mean()), "label_agreement_per_class": per_class}


def class_counts(predicted: Tensor, num_classes: int) -> list[int]:
    """How many images the classifier puts in each class (the class balance of unconditional samples)."""
    return torch.bincount(predicted.cpu().long(), minlength=num_classes).tolist()


@torch.no_grad()
def predict_labels(classifier: Callable[[Tensor], dict[str, Tensor]], images: Tensor, batch_size: int,
                   device: str | torch.device) -> Tensor:  # fmt: skip
    """The argmax class of uint8 images under a `ClassifierFeatures` extractor (its "class_logits")."""
    return torch.cat(
        [classifier(chunk.to(device))["class_logits"].argmax(1).cpu() for chunk in images.split(batch_size)]
    )


def accuracy_key(dataset: str, split: str, extractor_id: str, num_images: int) -> dict:
    return {"dataset": dataset, "split": split, "extractor": extractor_id, "num_images": int(num_images),
            "quantity": "accuracy", "version": ACCURACY_CACHE_VERSION}  # fmt: skip


def accuracy_cache_path(cache_dir: str | os.PathLike | None, key: dict) -> Path:
    """`<cache_dir>/<dataset>-<split>-<extractor>-n<N>-accuracy.json` (the extractor id holds the file's hash)."""
    name = f"{key['dataset']}-{key['split']}-{key['extractor']}-n{key['num_images']}-accuracy.json"
    return Path(cache_dir or default_cache_dir()) / name


def cached_accuracy(key: dict, compute: Callable[[], float], cache_dir: str | os.PathLike | None = None) -> float:
    """The accuracy stored for `key` when the file's stored key matches, else `compute()`, saved atomically."""
    path = accuracy_cache_path(cache_dir, key)
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
            if stored.get("key") == key:
                return float(stored["accuracy"])
        except (ValueError, KeyError, TypeError):
            pass  # a damaged file: recompute
    accuracy = float(compute())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".json")
    with os.fdopen(fd, "w") as file:
        json.dump({"key": key, "accuracy": accuracy}, file, sort_keys=True)
    os.replace(tmp, path)
    return accuracy


def classifier_test_accuracy(extractor, dataset: str, images: Tensor, labels: Tensor, batch_size: int,
                  device: str | torch.device, cache_dir: str | os.PathLike | None = None) -> float:  # fmt: skip
    """The accuracy of a `ClassifierFeatures` extractor on `images` (a data set's test split), cached by
    (data set, extractor id = the file's hash, number of images)."""
    key = accuracy_key(dataset, "test", extractor.cache_id, len(images))

    def compute() -> float:
        return float((predict_labels(extractor, images, batch_size, device) == labels.cpu()).double().mean())

    return cached_accuracy(key, compute, cache_dir)
