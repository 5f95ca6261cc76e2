"""Feature extractors for FID/KID/IS: the standard Inception network and a small offline stand-in.

Every extractor takes uint8 images (B, C, H, W) with C = 1 or 3 (grayscale is repeated to RGB) and returns a
dict of float32 features; `"pool"` is the (B, D) feature FID and KID use, `"logits"` (Inception only) what IS
uses. `metric_suffix` keeps numbers apart: only the standard Inception logs as `fid`; the stand-in logs as
`fid_standin`, which is NOT an FID and must never be compared with published values. A classifier file
(`ClassifierFeatures`, a clean-image classifier trained on the same data set) gives `fd_classifier`: a Fréchet
distance in its features, comparable only between numbers scored with the same file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.errors import UserError

# torch-fidelity's InceptionV3 weights (the TF 2015-12-05 graph pytorch-fid and the TTUR code use).
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
WEIGHTS_ENV = "DDIM_FID_WEIGHTS"
EXTRACTORS = ("inception", "standin")  # or the path of a classifier file (`ClassifierFeatures`)


class InceptionWeightsNotFoundError(UserError, FileNotFoundError):
    """The InceptionV3 weights are neither on disk nor downloadable; the message (one line) says what to do, in the
    flags of `python -m src.main` (--fid.*); `reason` alone is kept for commands with other flags (src.evaluate)."""

    def __init__(self, reason: str) -> None:
        super().__init__(missing_weights_message(reason))
        self.reason = reason


def _to_rgb(images: Tensor) -> Tensor:
    if images.dtype != torch.uint8:
        raise TypeError(f"feature extractors take uint8 images in [0, 255], got {images.dtype}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected (B, 1 or 3, H, W) images, got shape {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def hub_weights_path() -> Path:
    """Where torch-fidelity's own download puts the weights (torch.hub's checkpoint folder)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def resolve_inception_weights(weights_path: str | os.PathLike | None = None) -> str | None:
    """The weights file to load: `weights_path`, else $DDIM_FID_WEIGHTS, else torch.hub's cached copy;
    None when none is given or cached (torch-fidelity then downloads). A given path that does not exist
    raises `InceptionWeightsNotFoundError`."""
    given = weights_path or os.environ.get(WEIGHTS_ENV) or None
    if given:
        if not Path(given).is_file():
            raise InceptionWeightsNotFoundError(f"{given} does not exist")
        return str(given)
    cached = hub_weights_path()
    return str(cached) if cached.is_file() else None


def missing_weights_message(
    reason: str, weights_flag: str = "--fid.weights_path", extractor_flag: str = "--fid.extractor"
) -> str:
    """What to do without the Inception weights, naming the command's own flags (defaults: `src.main`'s)."""
    return (
        f"FID needs the InceptionV3 weights {INCEPTION_WEIGHTS_FILE} ({reason}): download {INCEPTION_WEIGHTS_URL} "
        f"and put it in {hub_weights_path().parent}/, or pass {weights_flag} FILE (or set {WEIGHTS_ENV}=FILE); "
        f"for an offline smoke test use {extractor_flag} standin (scored as fid_standin, NOT an FID)"
    )


class InceptionFeatures(nn.Module):
    """The FID InceptionV3 as torch-fidelity implements it ('inception-v3-compat'): its own TF1-compatible
    bilinear resize to 299x299 (no antialias), 2048-d pool features and the 1008-way 'logits_unbiased'."""

    name = "inception"
    metric_suffix = ""
    pool_dim = 2048

    def __init__(self, weights_path: str | os.PathLike | None = None) -> None:
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = resolve_inception_weights(weights_path)
        try:
            self.net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=path
            )
        except InceptionWeightsNotFoundError:
            raise
        except Exception as error:  # no network, bad file, ...: one actionable line instead of a long trace
            raise InceptionWeightsNotFoundError(
                f"loading {path or 'the download'} failed: {type(error).__name__}: {error}"
            ) from error
        self.net.requires_grad_(False).eval()

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        pool, logits = self.net(_to_rgb(images))
        return {"pool": pool.float(), "logits": logits.float()}


class StandInFeatures(nn.Module):
    """A small deterministic stand-in for tests and offline smoke runs (NOT FID): a fixed-seed random conv net
    (resize to 32x32, three stride-2 3x3 conv + ReLU layers, global average pooling) next to 4x4-pooled pixels.
    The weights come from their own generator, so every process and run gets the same features."""

    name = "standin"
    metric_suffix = "_standin"

    def __init__(self, seed: int = 0, width: int = 32) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.convs = nn.ModuleList(
            nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
            for c_in, c_out in [(3, width), (width, width), (width, width)]
        )
        with torch.no_grad():
            for conv in self.convs:
                fan_in = conv.in_channels * 9
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
                conv.bias.zero_()
        self.pool_dim = 3 * width + 3 * 16
        self.requires_grad_(False).eval()

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        x = _to_rgb(images).float() / 127.5 - 1.0
        x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=False)
        pixels = F.adaptive_avg_pool2d(x, 4).flatten(1)
        pooled = []
        for conv in self.convs:
            x = F.relu(conv(x))
            pooled.append(x.mean(dim=(2, 3)))
        return {"pool": torch.cat([*pooled, pixels], dim=1)}


class ClassifierFeatures(nn.Module):
    """The pooled penultimate features of a classifier trained on the same data set (a `FeatureClassifier` file,
    which configs/fashion_mnist_fd_classifier.yaml trains, or a clean-only `NoisyClassifier` one; both
    `src.models.classifier.load_classifier`): the usual proxy for
    FID on MNIST-like data, which Inception's ImageNet features fit poorly. Evaluated at t = 0. Images are
    converted to the classifier's channels (RGB -> luma mean, gray -> repeated) and resized (bilinear) to its size.

    `name` "classifier" makes the metric `fd_classifier`; `cache_id` (with the file's SHA-256) keys the cached
    reference statistics, so two classifiers never share them.
    """

    name = "classifier"
    metric_suffix = "_classifier"

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        from src.models.classifier import load_classifier

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"feature classifier {path} does not exist: train one with "
                                    "python -m src.classifier_main fit --config configs/fashion_mnist_fd_classifier.yaml")  # fmt: skip
        self.path = str(path)
        self.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        self.cache_id = f"classifier-{self.sha256[:12]}"
        self.net = load_classifier(str(path)).requires_grad_(False).eval()
        self.pool_dim = self.net.head.in_features

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected uint8 (B, 1 or 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
        x = images.float() / 127.5 - 1.0
        channels = self.net.in_channels
        if x.shape[1] != channels:
            x = x.mean(dim=1, keepdim=True) if channels == 1 else x.expand(-1, channels, -1, -1)
        size = self.net.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        t = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
        features = self.net.features(x, t)
        return {"pool": features.float(), "class_logits": self.net.head(features).float()}


def is_classifier_file(name: str | os.PathLike) -> bool:
    """Whether an extractor name is a path (an existing file, or one ending in .pt / .pth)."""
    return Path(name).suffix in (".pt", ".pth") or Path(name).is_file()


def extractor_id(extractor: nn.Module) -> str:
    """What identifies the extractor's features in reference-statistics cache keys."""
    return getattr(extractor, "cache_id", extractor.name)


def build_feature_extractor(name: str = "inception", weights_path: str | os.PathLike | None = None) -> nn.Module:
    """ "inception" (the standard FID network), "standin" (offline stand-in, NOT FID) or the path of a
    classifier file (`ClassifierFeatures`: fd_classifier, NOT FID)."""
    if name == "inception":
        return InceptionFeatures(weights_path)
    if name == "standin":
        return StandInFeatures()
    if is_classifier_file(name):
        return ClassifierFeatures(name)
    raise ValueError(
        f"unknown FID feature extractor {name!r}; choose one of {', '.join(EXTRACTORS)} or a classifier file (.pt)"
    )
