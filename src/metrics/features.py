"""Feature extractors for FID/KID/IS: the standard Inception network and a small offline stand-in.

Every extractor takes uint8 images (B, C, H, W) with C = 1 or 3 (grayscale is repeated to RGB) and returns a
dict of float32 features; `"pool"` is the (B, D) feature FID and KID use, `"logits"` (Inception only) what IS
uses. `metric_suffix` keeps numbers apart: only the standard Inception logs as `fid`; the stand-in logs as
`fid_standin`, which is NOT an FID and must never be compared with published values.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# torch-fidelity's InceptionV3 weights (the TF 2015-12-05 graph pytorch-fid and the TTUR code use).
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
WEIGHTS_ENV = "DDIM_FID_WEIGHTS"
EXTRACTORS = ("inception", "standin")


class InceptionWeightsNotFoundError(FileNotFoundError):
    """The InceptionV3 weights are neither on disk nor downloadable; the message (one line) says what to do."""


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
            raise InceptionWeightsNotFoundError(missing_weights_message(f"{given} does not exist"))
        return str(given)
    cached = hub_weights_path()
    return str(cached) if cached.is_file() else None


def missing_weights_message(reason: str) -> str:
    return (
        f"FID needs the InceptionV3 weights {INCEPTION_WEIGHTS_FILE} ({reason}): download {INCEPTION_WEIGHTS_URL} "
        f"and put it in {hub_weights_path().parent}/, or pass --model.fid_weights_path FILE (or set {WEIGHTS_ENV}=FILE); "
        "for an offline smoke test use --model.fid_extractor standin (logged as fid_standin, NOT an FID)"
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
                missing_weights_message(f"loading {path or 'the download'} failed: {type(error).__name__}: {error}")
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


def build_feature_extractor(name: str = "inception", weights_path: str | os.PathLike | None = None) -> nn.Module:
    """ "inception" (the standard FID network) or "standin" (offline stand-in, NOT FID)."""
    if name == "inception":
        return InceptionFeatures(weights_path)
    if name == "standin":
        return StandInFeatures()
    raise ValueError(f"unknown FID feature extractor {name!r}; choose one of {', '.join(EXTRACTORS)}")
