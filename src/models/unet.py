"""The DDPM noise-prediction UNet (Ho et al. 2020, appendix B), one plain nn.Module.

A PixelCNN++-style UNet (Salimans et al. 2017) built from Wide-ResNet blocks with GroupNorm, the timestep
fed through a sinusoidal embedding (Transformer positional encoding) and an MLP into every residual block,
and single-head self-attention at the configured resolutions. With the CIFAR-10 settings
(base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,)) it has the
paper's 35.7M parameters, layer for layer as the official TensorFlow code (`diffusion_tf/models/unet.py`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (integer) timesteps, as DDPM's `get_timestep_embedding`:
    [sin(t w_0), ..., sin(t w_{d/2-1}), cos(t w_0), ...] with w_i = max_period^(-i / (d/2 - 1))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def group_norm(channels: int, num_groups: int) -> nn.GroupNorm:
    if channels % num_groups:
        raise ValueError(f"channels ({channels}) must be divisible by norm_groups ({num_groups})")
    return nn.GroupNorm(num_groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, + projected time embedding, GroupNorm -> SiLU -> dropout -> conv, + skip."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float, norm_groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # The official code zero-initialises the last conv of each block so every block starts as identity.
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, channels: int, norm_groups: int):
        super().__init__()
        self.norm = group_norm(channels, norm_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)  # (B, HW, C) each
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # one head
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv with TensorFlow's "SAME" padding (pad right/bottom only), as in the DDPM code."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        # Upsampling to the skip's size (not a fixed x2) lets odd sizes (7 -> 14 -> 28) round-trip.
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


def down_path(
    base_channels: int,
    channel_mult: Sequence[int],
    num_res_blocks: int,
    attn_resolutions: Sequence[int],
    image_size: int,
    temb_channels: int,
    dropout: float,
    norm_groups: int,
) -> tuple[nn.ModuleList, list[int], int]:
    """The encoder shared by the UNet and the noise-conditioned classifier: per level `num_res_blocks` residual
    blocks (each followed by attention at `attn_resolutions`), then a stride-2 Downsample on every level but the
    last. Returns the layers, the channels of every feature map the UNet keeps as a skip connection (the stem's
    first; the last is the encoder's output) and the final resolution."""
    down = nn.ModuleList()
    skip_channels = [base_channels]
    ch, resolution = base_channels, image_size
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            layers = nn.ModuleList([ResBlock(ch, base_channels * mult, temb_channels, dropout, norm_groups)])
            ch = base_channels * mult
            if resolution in attn_resolutions:
                layers.append(AttnBlock(ch, norm_groups))
            down.append(layers)
            skip_channels.append(ch)
        if level != len(channel_mult) - 1:
            down.append(nn.ModuleList([Downsample(ch)]))
            skip_channels.append(ch)
            resolution = (resolution + 1) // 2
    return down, skip_channels, resolution


def run_down_path(down: nn.ModuleList, h: Tensor, temb: Tensor) -> list[Tensor]:
    """Every feature map of the encoder `down` (from `down_path`) for input h, in order; the last is its output."""
    features = []
    for layers in down:
        h = layers[0](h) if isinstance(layers[0], Downsample) else layers[0](h, temb)
        for layer in layers[1:]:
            h = layer(h)
        features.append(h)
    return features


class UNet(nn.Module):
    """eps_theta(x_t, t[, y]): (B, C, H, W) images in [-1, 1] and int64 timesteps (B,) -> eps (B, C, H, W).

    Args:
        in_channels: image channels (1 for MNIST-like data, 3 for CIFAR-10).
        base_channels: width of the first level; level i has base_channels * channel_mult[i] channels.
        channel_mult: one multiplier per resolution level; each level but the last halves the resolution.
        num_res_blocks: residual blocks per level on the way down (one more on the way up, as in DDPM).
        attn_resolutions: feature-map sizes (e.g. 16 for 16x16) at which self-attention follows each block.
        dropout: dropout in every residual block (0.1 for CIFAR-10 in the paper).
        image_size: input height and width (used to place attention by resolution).
        num_classes: when set, a learned class embedding is added to the time embedding and the model takes
            labels `y` (B,); label `num_classes` is the "null" label for classifier-free guidance.
        out_channels: output channels (defaults to in_channels; 2 * in_channels for a learned variance).
        norm_groups: GroupNorm groups (32 in the paper; smaller for narrow models).
        mid_attention: self-attention in the middle block (DDPM has it).
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        image_size: int = 32,
        num_classes: int | None = None,
        out_channels: int | None = None,
        norm_groups: int = 32,
        mid_attention: bool = True,
    ) -> None:
        super().__init__()
        # The constructor arguments, JSON-ready: what `to_diffusers` and `src.export` write beside the weights.
        self.config = dict(
            in_channels=in_channels,
            base_channels=base_channels,
            channel_mult=list(channel_mult),
            num_res_blocks=num_res_blocks,
            attn_resolutions=list(attn_resolutions),
            dropout=dropout,
            image_size=image_size,
            num_classes=num_classes,
            out_channels=out_channels,
            norm_groups=norm_groups,
            mid_attention=mid_attention,
        )
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.image_size = image_size
        self.num_classes = num_classes
        self.base_channels = base_channels
        temb_channels = 4 * base_channels

        self.temb = nn.Sequential(
            nn.Linear(base_channels, temb_channels), nn.SiLU(), nn.Linear(temb_channels, temb_channels)
        )
        # +1 row for the null label used by classifier-free guidance.
        self.label_emb = nn.Embedding(num_classes + 1, temb_channels) if num_classes else None
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        def block(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, temb_channels, dropout, norm_groups)

        self.down, skip_channels, resolution = down_path(
            base_channels,
            channel_mult,
            num_res_blocks,
            attn_resolutions,
            image_size,
            temb_channels,
            dropout,
            norm_groups,
        )
        ch = skip_channels[-1]

        self.mid = nn.ModuleList(
            [block(ch, ch), AttnBlock(ch, norm_groups) if mid_attention else nn.Identity(), block(ch, ch)]
        )

        # Up path: num_res_blocks + 1 blocks per level, each consuming one skip connection.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                layers = nn.ModuleList([block(ch + skip_channels.pop(), base_channels * mult)])
                ch = base_channels * mult
                if resolution in attn_resolutions:
                    layers.append(AttnBlock(ch, norm_groups))
                self.up.append(layers)
            if level != 0:
                self.up.append(nn.ModuleList([Upsample(ch)]))
                resolution *= 2

        self.norm_out = group_norm(ch, norm_groups)
        self.conv_out = nn.Conv2d(ch, self.out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet expects (B, {self.in_channels}, H, W) images, got {tuple(x.shape)}")
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        # The embedding in the weights' dtype, so a float64 net (exact Hessians in tests) or a bf16 one runs as is.
        temb = self.temb(timestep_embedding(t, self.base_channels).to(self.temb[0].weight.dtype))
        if self.label_emb is not None:
            if y is None:
                raise ValueError("this UNet is class-conditional (num_classes set): pass labels y")
            temb = temb + self.label_emb(y)
        elif y is not None:
            raise ValueError("labels y given to an unconditional UNet (num_classes is None)")

        h = self.conv_in(x)
        skips = [h, *run_down_path(self.down, h, temb)]
        h = skips[-1]

        h = self.mid[0](h, temb)
        h = self.mid[1](h)
        h = self.mid[2](h, temb)

        for layers in self.up:
            if isinstance(layers[0], Upsample):
                h = layers[0](h, skips[-1].shape[-2:])
                continue
            h = layers[0](torch.cat([h, skips.pop()], dim=1), temb)
            for layer in layers[1:]:
                h = layer(h)

        return self.conv_out(F.silu(self.norm_out(h)))

    # ------------------------------------------------------------------ interoperability (src/models/convert.py)
    @classmethod
    def from_diffusers(cls, path: str | os.PathLike) -> UNet:
        """A UNet with the weights of a diffusers `UNet2DModel` folder (config.json + diffusion_pytorch_model
        .safetensors or .bin), e.g. google/ddpm-cifar10-32; raises ValueError for configurations this UNet
        cannot represent and for weights that do not match the config."""
        from src.models.convert import load_diffusers_unet  # convert.py imports this module

        return load_diffusers_unet(path)

    def to_diffusers(self, path: str | os.PathLike) -> None:
        """Write config.json + diffusion_pytorch_model.safetensors that `diffusers.UNet2DModel.from_pretrained`
        loads into the same function."""
        from src.models.convert import save_diffusers_unet

        save_diffusers_unet(self, path)
