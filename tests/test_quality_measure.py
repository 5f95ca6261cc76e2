"""fd_classifier, the quickstart's quality measure: a Fréchet distance in the features of a classifier trained on
the same data set, end to end as users run it (train the classifier with its CLI, then evaluate)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import REPO, needs_fashion_mnist

from src.main import cli_main
from src.models.classifier import FeatureClassifier, NoisyClassifier, load_classifier
from src.options import Sampling

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
    # The classifier's accuracy on the 10,000 real test images, printed beside the distance (cached by its hash).
    assert results["classifier_accuracy_n"] == 10_000 and 0 <= results["classifier_accuracy"] <= 1
    assert list(results).index("classifier_accuracy") == list(results).index("fd_classifier") + 1
    assert sum(results["predicted_class_counts"]) == 200
    assert "label_agreement" not in results  # a .npz without labels
    assert 0 <= results["label_agreement_real"] <= 1

    # The same file through the FID callback: --fid.extractor FILE logs val/fd_classifier.
    module = DiffusionModule(tiny_unet(image_size=28), sampling=Sampling(steps=2))
    callback = FIDCallback(extractor=str(path), ref_stats=results["ref_stats"], batch_size=4)
    logged = callback.compute(module, num_samples=8)
    # Unconditional samples and no trainer (so no data set for the accuracy): the distance alone.
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


# ---------------------------------------------------------------------------------------- the feature classifier
def test_feature_classifier_shapes_save_load_and_old_files(tmp_path: Path) -> None:
    net = FeatureClassifier(num_classes=10, in_channels=1, image_size=28, widths=(4, 8), dropout=0.3)
    x = torch.randn(5, 1, 28, 28)
    assert net.features(x).shape == (5, 8) and net(x, torch.zeros(5, dtype=torch.int64)).shape == (5, 10)
    # The 32-64-128 recipe is the 288k-parameter CNN docs/quality.md describes.
    assert sum(p.numel() for p in FeatureClassifier().parameters()) == 288_170
    net.train()
    net(x).sum().backward()  # BatchNorm statistics move, so the file must carry the buffers too
    net.eval()
    net.save(str(tmp_path / "f.pt"))
    loaded = load_classifier(str(tmp_path / "f.pt"))
    assert isinstance(loaded, FeatureClassifier) and not loaded.training
    torch.testing.assert_close(loaded(x), net(x))
    with pytest.raises(ValueError, match="holds a FeatureClassifier, not a NoisyClassifier"):
        NoisyClassifier.load(str(tmp_path / "f.pt"))  # e.g. --model.guidance.classifier_path for guidance
    # A NoisyClassifier file written before files named their class still loads.
    old = NoisyClassifier(num_classes=10, in_channels=1, base_channels=8, image_size=28, norm_groups=4)
    torch.save({"config": old.config, "state_dict": old.state_dict()}, tmp_path / "old.pt")
    assert isinstance(load_classifier(str(tmp_path / "old.pt")), NoisyClassifier)
    assert isinstance(NoisyClassifier.load(str(tmp_path / "old.pt")), NoisyClassifier)


def test_feature_classifier_trains_on_a_separable_batch() -> None:
    from src.classifier_module import ClassifierModule

    torch.manual_seed(0)
    module = ClassifierModule(FeatureClassifier(num_classes=2, widths=(4, 8), dropout=0.0), clean_only=True,
                              random_crop=2, lr=1e-2)  # fmt: skip
    images = torch.cat([torch.full((8, 1, 28, 28), -0.8), torch.full((8, 1, 28, 28), 0.8)])
    images = images + 0.1 * torch.randn_like(images)
    labels = torch.tensor([0] * 8 + [1] * 8)
    optimizer = torch.optim.AdamW(module.net.parameters(), lr=1e-2)
    losses = []
    for step in range(30):
        loss = module.training_step((images, labels), step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    module.net.eval()
    assert losses[-1] < 0.5 * losses[0]
    assert (module.net(images).argmax(1) == labels).all()


def test_classifier_module_options_are_checked() -> None:
    from src.classifier_module import ClassifierModule
    from src.errors import ConfigError

    with pytest.raises(ConfigError, match="clean_only true"):
        ClassifierModule(FeatureClassifier(widths=(4,)))
    with pytest.raises(ConfigError, match="random_crop"):
        ClassifierModule(NoisyClassifier(in_channels=1, base_channels=8, norm_groups=4), random_crop=2)
    with pytest.raises(ConfigError, match="lr_decay must be one of none, cosine"):
        ClassifierModule(FeatureClassifier(widths=(4,)), clean_only=True, lr_decay="step")


def test_random_crop_shifts_each_image_within_the_padding() -> None:
    from src.classifier_module import random_crop

    torch.manual_seed(0)
    images = torch.rand(64, 1, 6, 6)  # values in [0, 1): the fill -1 is recognisable
    assert random_crop(images, 0) is images
    out = random_crop(images, 2)
    assert out.shape == images.shape
    shifts = set()
    for image, crop in zip(images, out, strict=True):
        # Each crop is the image shifted by (dy, dx) in [-2, 2]^2 with -1 where it left the frame.
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.equal(crop, shifted(image, dy, dx))]  # fmt: skip
        assert len(found) == 1
        shifts.add(found[0])
    assert len(shifts) > 10  # offsets differ between images


def shifted(image: torch.Tensor, dy: int, dx: int, fill: float = -1.0) -> torch.Tensor:
    """image moved so that out[i, j] = image[i + dy, j + dx] (fill outside)."""
    h, w = image.shape[-2:]
    out = torch.full_like(image, fill)
    for i in range(h):
        for j in range(w):
            if 0 <= i + dy < h and 0 <= j + dx < w:
                out[..., i, j] = image[..., i + dy, j + dx]
    return out


def test_cosine_decay_factor() -> None:
    from src.classifier_module import cosine_decay_factor

    assert cosine_decay_factor(0, 10, 110) == pytest.approx(0.1)
    assert cosine_decay_factor(9, 10, 110) == pytest.approx(1.0)
    assert cosine_decay_factor(10, 10, 110) == pytest.approx(1.0)
    assert cosine_decay_factor(60, 10, 110) == pytest.approx(0.5)
    assert cosine_decay_factor(110, 10, 110) == pytest.approx(0.0)
    assert cosine_decay_factor(500, 0, 110) == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------- label agreement
def brightness_classifier(path: Path) -> Path:
    """A 2-class FeatureClassifier that says 1 for bright images and 0 for dark ones: its two channels are
    relu(x) and relu(-x) (BatchNorm at its identity initial statistics), pooled, and the head compares them."""
    net = FeatureClassifier(num_classes=2, in_channels=1, image_size=8, widths=(2,), dropout=0.0)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.zero_()
        first, second = (m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
        first.weight[0, 0, 1, 1], first.weight[1, 0, 1, 1] = 1.0, -1.0
        second.weight[0, 0, 1, 1], second.weight[1, 1, 1, 1] = 1.0, 1.0
        net.head.weight.copy_(torch.tensor([[-1.0, 1.0], [1.0, -1.0]]))
        net.head.bias.zero_()
    net.eval().save(str(path))
    return path


def write_labelled(folder: Path, names_and_values: list[tuple[str, int]]) -> Path:
    from src.images import save_png

    folder.mkdir(parents=True, exist_ok=True)
    for name, value in names_and_values:
        save_png(torch.full((1, 8, 8), value, dtype=torch.uint8), folder / name)
    return folder


def test_label_agreement_math() -> None:
    from src.metrics.labels import class_counts, label_agreement, labels_from_names

    assert labels_from_names(["3_0.png", "sub/1_12.png"]).tolist() == [3, 1]
    assert labels_from_names(["3_0.png", "7.png"]) is None  # unlabelled predict files are <index>.png
    assert labels_from_names([]) is None
    result = label_agreement(torch.tensor([0, 1, 1, 2, 2, 2]), torch.tensor([0, 1, 2, 2, 2, 0]))
    assert result["label_agreement"] == pytest.approx(4 / 6)
    assert result["label_agreement_per_class"] == pytest.approx({"0": 0.5, "1": 1.0, "2": 2 / 3})
    assert class_counts(torch.tensor([1, 3, 3]), 4) == [0, 1, 0, 2]
    with pytest.raises(ValueError, match="equal non-empty"):
        label_agreement(torch.tensor([0]), torch.tensor([0, 1]))


def test_evaluate_reports_label_agreement_of_labelled_files(tmp_path: Path, capsys) -> None:
    from src import evaluate

    clf = brightness_classifier(tmp_path / "bright.pt")
    # Class 1 = bright. 1_0 agrees, 0_1 and 0_3 agree, 1_2 (dark) does not: 3/4; class 0: 2/2, class 1: 1/2.
    samples = write_labelled(tmp_path / "samples", [("1_0.png", 230), ("0_1.png", 20), ("1_2.png", 30),
                                                    ("0_3.png", 10), ("1_4.png", 200)])  # fmt: skip
    args = ["--samples", str(samples), "--ref", str(samples), "--extractor", str(clf),
            "--cache_dir", str(tmp_path / "cache"), "--device", "cpu"]  # fmt: skip
    results = evaluate.main(args)
    assert results["label_agreement"] == pytest.approx(4 / 5)
    assert results["label_agreement_per_class"] == pytest.approx({"0": 1.0, "1": 2 / 3})
    assert results["predicted_class_counts"] == [3, 2]
    assert "classifier_accuracy" not in results  # a folder as --ref has no test split
    # A label the classifier does not know: one line naming both.
    write_labelled(samples, [("5_5.png", 0)])
    with pytest.raises(SystemExit, match="labels 0..5 in the file names, but the classifier .* knows classes 0..1"):
        evaluate.run(args)


@needs_fashion_mnist
def test_evaluate_prints_cached_classifier_accuracy_and_real_agreement(tmp_path: Path) -> None:
    import json

    from src import evaluate
    from src.data import load_dataset
    from src.images import save_png
    from src.metrics.features import ClassifierFeatures
    from src.metrics.labels import accuracy_cache_path, accuracy_key

    torch.manual_seed(0)
    path = tmp_path / "clf.pt"
    FeatureClassifier(widths=(4, 8)).eval().save(str(path))
    images, labels = load_dataset("fashion_mnist", "test")
    samples = tmp_path / "samples"  # the first 40 test images under their true labels, as predict names them
    samples.mkdir()
    for i in range(40):
        save_png(images[i], samples / f"{int(labels[i])}_{i}.png")
    args = ["--samples", str(samples), "--ref", "fashion_mnist", "--split", "test", "--extractor", str(path),
            "--reference_values", "--cache_dir", str(tmp_path / "cache"), "--device", "cpu"]  # fmt: skip
    results = evaluate.main(args)
    extractor = ClassifierFeatures(path)
    with torch.no_grad():
        predicted = torch.cat([extractor(chunk)["class_logits"].argmax(1) for chunk in images.split(1000)])
    assert results["classifier_accuracy"] == pytest.approx(float((predicted == labels).double().mean()))
    assert results["classifier_accuracy_n"] == 10_000
    # Real images under their own labels: agreement = the accuracy on those 40 = the real reference value.
    first = float((predicted[:40] == labels[:40]).double().mean())
    assert results["label_agreement"] == pytest.approx(first) == results["label_agreement_real"]
    # Cached beside the statistics, keyed by the file's hash: a second run reads the file.
    cache = accuracy_cache_path(tmp_path / "cache", accuracy_key("fashion_mnist", "test", extractor.cache_id, 10_000))
    stored = json.loads(cache.read_text())
    stored["accuracy"] = 0.5
    cache.write_text(json.dumps(stored))
    assert evaluate.main(args)["classifier_accuracy"] == 0.5


def test_fid_callback_logs_label_agreement_of_conditional_samples(tmp_path: Path, tiny_unet) -> None:
    from src.callbacks.fid import FIDCallback
    from src.images import to_uint8
    from src.metrics.evaluation import save_statistics
    from src.metrics.features import ClassifierFeatures
    from src.module import DiffusionModule

    torch.manual_seed(0)
    path = tmp_path / "clf.pt"
    FeatureClassifier(num_classes=4, image_size=8, widths=(4,)).eval().save(str(path))
    save_statistics(tmp_path / "ref.npz", np.zeros(4), np.eye(4))
    module = DiffusionModule(tiny_unet(num_classes=4), sampling=Sampling(steps=2))
    callback = FIDCallback(extractor=str(path), ref_stats=str(tmp_path / "ref.npz"), batch_size=3)
    logged = callback.compute(module, num_samples=8)
    assert list(logged) == ["val/fd_classifier", "val/label_agreement"]
    indices = torch.arange(8)
    with torch.no_grad():
        predicted = ClassifierFeatures(path)(to_uint8(module.model.sample_indices(indices)))["class_logits"].argmax(1)
    assert logged["val/label_agreement"] == pytest.approx(float((predicted == indices % 4).double().mean()))


@needs_fashion_mnist
def test_fid_callback_logs_the_classifier_accuracy_with_a_data_set(tmp_path: Path, tiny_unet) -> None:
    from types import SimpleNamespace

    from src.callbacks.fid import FIDCallback
    from src.data import load_dataset
    from src.metrics.evaluation import save_statistics
    from src.metrics.features import ClassifierFeatures
    from src.module import DiffusionModule

    torch.manual_seed(0)
    path = tmp_path / "clf.pt"
    FeatureClassifier(widths=(4,)).eval().save(str(path))
    save_statistics(tmp_path / "ref.npz", np.zeros(4), np.eye(4))
    callback = FIDCallback(extractor=str(path), ref_stats=str(tmp_path / "ref.npz"), batch_size=500,
                           cache_dir=str(tmp_path / "cache"))  # fmt: skip
    datamodule = SimpleNamespace(dataset="fashion_mnist", data_dir=None, is_folder=False)
    trainer = SimpleNamespace(global_rank=0, world_size=1, datamodule=datamodule)
    logged = callback.compute(
        DiffusionModule(tiny_unet(image_size=28), sampling=Sampling(steps=2)), trainer, num_samples=4
    )
    images, labels = load_dataset("fashion_mnist", "test")
    with torch.no_grad():
        predicted = torch.cat(
            [ClassifierFeatures(path)(chunk)["class_logits"].argmax(1) for chunk in images.split(1000)]
        )
    assert logged["val/classifier_accuracy"] == pytest.approx(float((predicted == labels).double().mean()))
    assert list(tmp_path.glob("cache/fashion_mnist-test-classifier-*-n10000-accuracy.json"))
