"""A noise-conditioned classifier p_phi(y | x_t, t) for classifier guidance: the UNet's encoder half plus a head
(Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis", section 4 and appendix: "the downsampling
trunk of the UNet model with an attention pool at the 8x8 layer"; here global average pooling, as their
`pool="adaptive"` option). Trained with cross-entropy on x_t ~ q(x_t | x_0), t uniform (`noisy_classifier_loss` in
src/classifier_module.py, beside its training loop); `t = 0` inputs make it an ordinary (almost clean-image) classifier too, which benchmarks/guidance_accuracy.py uses.

`FeatureClassifier` is the clean-image classifier of the quality measure fd_classifier (docs/quality.md): a plain
conv-BN-ReLU CNN whose pooled penultimate features replace Inception's. Both save `{"class", "config",
"state_dict"}`; `load_classifier` rebuilds either from its file (files without "class" are NoisyClassifiers).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.models.unet import ResBlock, down_path, group_norm, run_down_path, timestep_embedding


class NoisyClassifier(nn.Module):
    """logits = f_phi(x_t, t): (B, C, H, W) images in [-1, 1] and int64 timesteps (B,) -> (B, num_classes).

    The same blocks and arguments as `src.models.unet.UNet`'s down path and middle block, then
    GroupNorm -> SiLU -> global average pool -> linear.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        image_size: int = 32,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        # JSON-ready constructor arguments: saved beside the weights so that a file alone rebuilds the classifier.
        self.config = dict(
            num_classes=num_classes,
            in_channels=in_channels,
            base_channels=base_channels,
            channel_mult=list(channel_mult),
            num_res_blocks=num_res_blocks,
            attn_resolutions=list(attn_resolutions),
            dropout=dropout,
            image_size=image_size,
            norm_groups=norm_groups,
        )
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.image_size = image_size
        self.base_channels = base_channels
        temb_channels = 4 * base_channels
        self.temb = nn.Sequential(
            nn.Linear(base_channels, temb_channels), nn.SiLU(), nn.Linear(temb_channels, temb_channels)
        )
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down, channels, _ = down_path(
            base_channels,
            channel_mult,
            num_res_blocks,
            attn_resolutions,
            image_size,
            temb_channels,
            dropout,
            norm_groups,
        )
        ch = channels[-1]
        self.mid = ResBlock(ch, ch, temb_channels, dropout, norm_groups)
        self.norm_out = group_norm(ch, norm_groups)
        self.head = nn.Linear(ch, num_classes)

    def features(self, x: Tensor, t: Tensor) -> Tensor:
        """The pooled penultimate features (B, C) the linear head reads (what Fréchet-distance features use)."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        temb = self.temb(timestep_embedding(t, self.base_channels))
        h = run_down_path(self.down, self.conv_in(x), temb)[-1]
        h = F.silu(self.norm_out(self.mid(h, temb)))
        return h.mean(dim=(2, 3))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.head(self.features(x, t))

    def save(self, path: str) -> None:
        """{"class", "config", "state_dict"} in one torch file (`load` rebuilds it without knowing the arguments)."""
        save_classifier(self, path)

    @classmethod
    def load(cls, path: str, map_location: str | torch.device = "cpu") -> NoisyClassifier:
        return _load_as(cls, path, map_location)


class FeatureClassifier(nn.Module):
    """A clean-image classifier for Fréchet-distance features: (B, C, H, W) images in [-1, 1] -> (B, num_classes).

    Three stages of two 3x3 conv -> BatchNorm -> ReLU layers (`widths` channels; 2x2 max pooling after the first
    two stages), global average pooling, dropout, a linear head: the plain VGG-style CNN (Simonyan & Zisserman
    2015, with batch norm, Ioffe & Szegedy 2015) that reaches ~93% on Fashion-MNIST with 288k parameters
    (widths 32-64-128). `features` is the pooled (B, widths[-1]) vector the head reads. The timestep argument of
    `forward` / `features` exists only so that the classifier training loop and the feature extractor call it
    as they call `NoisyClassifier`; it is ignored (the network never sees noise).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        widths: Sequence[int] = (32, 64, 128),
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        if not widths:
            raise ValueError("FeatureClassifier needs at least one stage width")
        self.config = dict(
            num_classes=num_classes,
            in_channels=in_channels,
            image_size=image_size,
            widths=list(widths),
            dropout=dropout,
        )
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.image_size = image_size
        layers: list[nn.Module] = []
        channels = in_channels
        for i, width in enumerate(widths):
            for _ in range(2):
                # No conv bias: the BatchNorm right after it has its own shift.
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
                channels = width
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
        self.trunk = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels, num_classes)

    def features(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        """The pooled penultimate features (B, widths[-1]) the linear head reads (after dropout in training)."""
        return self.trunk(x).mean(dim=(2, 3))

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        return self.head(self.dropout(self.features(x)))

    def save(self, path: str) -> None:
        """{"class", "config", "state_dict"} in one torch file (`load_classifier` rebuilds it)."""
        save_classifier(self, path)

    @classmethod
    def load(cls, path: str, map_location: str | torch.device = "cpu") -> FeatureClassifier:
        return _load_as(cls, path, map_location)


CLASSIFIERS: dict[str, type[nn.Module]] = {"NoisyClassifier": NoisyClassifier, "FeatureClassifier": FeatureClassifier}


def save_classifier(model: nn.Module, path: str) -> None:
    torch.save({"class": type(model).__name__, "config": model.config, "state_dict": model.state_dict()}, path)


def load_classifier(path: str, map_location: str | torch.device = "cpu") -> nn.Module:
    """The classifier saved in `path` (a `NoisyClassifier` or `FeatureClassifier`), in eval mode. Files written
    before the class name was stored hold a NoisyClassifier."""
    blob = torch.load(path, map_location=map_location, weights_only=True)
    name = blob.get("class", "NoisyClassifier")
    if name not in CLASSIFIERS:
        raise ValueError(f"{path} holds a {name}, which is not a known classifier ({', '.join(CLASSIFIERS)})")
    model = CLASSIFIERS[name](**blob["config"])
    model.load_state_dict(blob["state_dict"])
    return model.eval()


def _load_as(cls: type[nn.Module], path: str, map_location: str | torch.device) -> nn.Module:
    model = load_classifier(path, map_location)
    if not isinstance(model, cls):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a {cls.__name__}")
    return model
