"""fd_classifier, the quickstart's quality measure: a Fréchet distance in the features of a classifier trained on
the same data set, end to end as users run it (train the classifier with its CLI, then evaluate)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import REPO, needs_fashion_mnist

from src.main import cli_main

torch.set_num_threads(1)


def train_tiny_feature_classifier(root: Path) -> Path:
    from src.classifier_module import ClassifierModule

    cli_main(["fit", "--config", str(REPO / "configs" / "fashion_mnist_fd_classifier.yaml"),
              "--model.net.init_args.widths", "[4, 8]",
              "--trainer.max_steps", "20", "--trainer.val_check_interval", "20", "--trainer.limit_val_batches", "1",
              "--data.batch_size", "32", "--data.val_size", "32", "--trainer.default_root_dir", str(root),
              "--logger_backend", "csv", "--trainer.enable_progress_bar", "false",
              "--trainer.enable_model_summary", "false"],
             model_class=ClassifierModule)  # fmt: skip
    (path,) = root.glob("fashion_mnist_fd_classifier/version_0/classifier.pt")
    return path


@pytest.mark.slow
@needs_fashion_mnist
def test_fd_classifier_through_the_cli_and_real_below_noised_real(tmp_path: Path, tiny_unet) -> None:
    from src import evaluate
    from src.callbacks.fid import FIDCallback
    from src.data import load_dataset
    from src.metrics.features import ClassifierFeatures
    from src.module import DiffusionModule

    path = train_tiny_feature_classifier(tmp_path / "runs")
    # "Samples": the first 200 held-out images, so the distance must equal the real-vs-real reference value.
    test_images = load_dataset("fashion_mnist", "test")[0][:200]
    samples = tmp_path / "samples.npz"
    np.savez(samples, samples=test_images.permute(0, 2, 3, 1).numpy())
    results = evaluate.main(["--samples", str(samples), "--ref", "fashion_mnist", "--extractor", str(path),
                             "--prc", "--reference_values", "--cache_dir", str(tmp_path / "cache"),
                             "--device", "cpu"])  # fmt: skip
    assert not any(key.startswith("fid") for key in results)  # never called FID
    assert results["fd_classifier"] == pytest.approx(results["fd_classifier_real_vs_real"], rel=1e-4)
    assert results["fd_classifier_reference_n"] == 200
    # The scale: real held-out images are closer to the data than the same images with noise (std 0.2).
    assert 0 < results["fd_classifier_real_vs_real"] < results["fd_classifier_noised_real"]
    assert 0 <= results["precision_classifier"] <= 1 and 0 <= results["recall_classifier"] <= 1
    assert results["extractor_sha256"] == ClassifierFeatures(path).sha256

    # The same file through the FID callback: --fid.extractor FILE logs val/fd_classifier.
    module = DiffusionModule(tiny_unet(image_size=28), sampling_steps=2)
    callback = FIDCallback(extractor=str(path), ref_stats=results["ref_stats"], batch_size=4)
    logged = callback.compute(module, num_samples=8)
    assert list(logged) == ["val/fd_classifier"] and np.isfinite(logged["val/fd_classifier"])


def test_classifier_features_take_any_channels_and_size(tmp_path: Path) -> None:
    from src.callbacks.fid import FIDCallback
    from src.metrics.features import build_feature_extractor
    from src.models.classifier import NoisyClassifier

    path = tmp_path / "clf.pt"
    NoisyClassifier(num_classes=10, in_channels=1, base_channels=8, image_size=28, norm_groups=4).save(str(path))
    extractor = build_feature_extractor(str(path))
    assert extractor.name == "classifier" and extractor.cache_id.startswith("classifier-")
    for shape in [(3, 1, 28, 28), (3, 3, 32, 32)]:
        out = extractor(torch.randint(0, 256, shape, dtype=torch.uint8))
        assert out["pool"].shape == (3, extractor.pool_dim) and out["class_logits"].shape == (3, 10)
    with pytest.raises(ValueError, match="unknown FID feature extractor"):
        build_feature_extractor("resnet")
    with pytest.raises(FileNotFoundError, match="fashion_mnist_fd_classifier.yaml"):
        build_feature_extractor(str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="fid.extractor 'resnet' is unknown"):
        FIDCallback(extractor="resnet")
