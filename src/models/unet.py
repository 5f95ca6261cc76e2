"""The DDPM noise-prediction UNet (Ho et al. 2020, appendix B), one plain nn.Module.

A PixelCNN++-style UNet (Salimans et al. 2017) built from Wide-ResNet blocks with GroupNorm, the timestep
fed through a sinusoidal embedding (Transformer positional encoding) and an MLP into every residual block,
and single-head self-attention at the configured resolutions. With the CIFAR-10 settings
(base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,)) it has the
paper's 35.7M parameters, layer for layer as the official TensorFlow code (`diffusion_tf/models/unet.py`).

Options for larger images, each off by default so that the default network stays DDPM's:
- multi-head attention (`num_heads`, or `head_channels` per head), as improved DDPM (Nichol & Dhariwal 2021,
  4 heads) and ADM (Dhariwal & Nichol 2021, section 3: 64 channels per head);
- `use_scale_shift_norm`: the time embedding modulates the second GroupNorm, h = GN(h) * (1 + s) + b with
  (s, b) projected from the embedding (improved DDPM; ADM's adaptive group normalization, section 3);
- `resblock_updown`: residual blocks that resample their input (BigGAN, Brock et al. 2019) in place of the
  strided-conv Downsample and the nearest+conv Upsample, as ADM;
- `gradient_checkpointing`: recompute each residual and attention block in the backward pass instead of keeping
  its activations (Chen et al. 2016), same outputs and gradients, less memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
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


def resample(x: Tensor, kind: str | None, size: Sequence[int] | None = None) -> Tensor:
    """The parameter-free resampling of a residual up/down block (ADM's ResBlock(up/down=True)): a 2x2 average pool
    ("down") or nearest-neighbour upsampling ("up", to `size`, by default twice the input). ceil_mode averages the
    last odd row/column alone, so odd sizes halve rounding up (7 -> 4) as the strided-conv Downsample does."""
    if kind == "down":
        return F.avg_pool2d(x, 2, ceil_mode=True)
    if kind == "up" and size is not None:
        return F.interpolate(x, size=tuple(size), mode="nearest")
    if kind == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, + projected time embedding, GroupNorm -> SiLU -> dropout -> conv, + skip.

    use_scale_shift_norm: the embedding is projected to (scale, shift) and applied after the second GroupNorm,
        GN(h) * (1 + scale) + shift (improved DDPM; ADM's AdaGN), instead of added before it.
    resample: "down" or "up" makes a BigGAN-style resampling block (ADM): input and hidden state are resampled
        after the first GroupNorm -> SiLU (`resample`), so the block halves or doubles the feature map.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        dropout: float,
        norm_groups: int,
        use_scale_shift_norm: bool = False,
        resample: str | None = None,
    ):
        super().__init__()
        if resample not in (None, "down", "up"):
            raise ValueError(f"resample must be None, 'down' or 'up', got {resample!r}")
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resample = resample
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb_proj = nn.Linear(temb_channels, (2 if use_scale_shift_norm else 1) * out_channels)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # The official code zero-initialises the last conv of each block so every block starts as identity.
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor, size: Sequence[int] | None = None) -> Tensor:
        """`size`: the output size of an "up" block (the skip connection's; default twice the input)."""
        h = F.silu(self.norm1(x))
        if self.resample is not None:
            h, x = resample(h, self.resample, size), resample(x, self.resample, size)
        h = self.conv1(h)
        emb = self.temb_proj(F.silu(temb))[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + emb)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


def attention_heads(channels: int, num_heads: int = 1, head_channels: int | None = None) -> int:
    """The number of heads of an attention layer `channels` wide: channels // head_channels when head_channels is
    set (ADM's num_head_channels, which overrides num_heads), else num_heads; the width must divide evenly."""
    if head_channels is not None:
        if head_channels < 1 or channels % head_channels:
            raise ValueError(
                f"head_channels={head_channels} does not divide the attention width {channels}: choose a divisor "
                "of every attention layer's width (base_channels * channel_mult)"
            )
        return channels // head_channels
    if num_heads < 1 or channels % num_heads:
        raise ValueError(
            f"num_heads={num_heads} does not divide the attention width {channels}: choose a divisor of every "
            "attention layer's width, or set head_channels instead"
        )
    return num_heads


class AttnBlock(nn.Module):
    """Self-attention over the H*W positions with `num_heads` heads, with a residual connection.

    The qkv conv's 3C outputs are (q, k, v), each split into heads of C / num_heads consecutive channels; every head
    attends with softmax(q k^T / sqrt(C / num_heads)) (Vaswani et al. 2017, multi-head attention)."""

    def __init__(self, channels: int, norm_groups: int, num_heads: int = 1):
        super().__init__()
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide the attention width ({channels})")
        self.num_heads = num_heads
        self.norm = group_norm(channels, norm_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # (B, heads, HW, C / heads) each
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C / heads)
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class CrossAttention(nn.Module):
    """Multi-head attention of `dim`-wide queries to a context of `context_dim`-wide tokens (self-attention when no
    context is given): q, k, v without bias, the output projection with it (LDM's `CrossAttention`; the attribute
    names are diffusers' `Attention`'s, so its weights load as they are)."""

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context

        def heads(t: Tensor) -> Tensor:  # (B, N, dim) -> (B, heads, N, dim / heads)
            return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.to_q(x)), heads(self.to_k(context)), heads(self.to_v(context)))
        return self.to_out(out.transpose(1, 2).flatten(2))


class GEGLU(nn.Module):
    """x W_a * GELU(x W_g) (Shazeer 2020, "GLU Variants Improve Transformer"): LDM's feed-forward gate."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU to 4 x dim, dropout, back to dim (LDM's FeedForward with glu=True; diffusers' `ff.net.{0,1,2}`)."""

    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(dropout), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the context, GEGLU feed-forward, each residual (LDM's
    `BasicTransformerBlock`, Rombach et al. 2022 section 3.3)."""

    def __init__(self, dim: int, num_heads: int, context_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, num_heads)
        self.attn2 = CrossAttention(dim, num_heads, context_dim)
        self.ff = FeedForward(dim, dropout)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Cross-attention conditioning of a feature map (LDM's `SpatialTransformer`): GroupNorm, a 1x1 conv in, the
    H*W positions as tokens through `depth` transformer blocks that attend to the context (B, N, context_dim), a 1x1
    conv out (zero-initialised: the block starts as the identity), plus the input. The layout and names are
    diffusers' `Transformer2DModel` with `use_linear_projection=False`."""

    def __init__(self, channels: int, norm_groups: int, num_heads: int, context_dim: int, depth: int = 1) -> None:
        super().__init__()
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide the attention width ({channels})")
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(channels, num_heads, context_dim) for _ in range(depth)
        )
        self.proj_out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        h = self.proj_in(self.norm(x))
        tokens = h.flatten(2).transpose(1, 2)  # (B, HW, C)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return x + self.proj_out(tokens.transpose(1, 2).reshape_as(h))


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


def feature_resolutions(image_size: int, num_levels: int) -> list[int]:
    """The feature-map size of each level of the encoder (`down_path`) for ``image_size`` inputs, from the input's
    down to the middle block's: each level but the last halves it, rounding up (28 -> 14 -> 7). `attn_resolutions`
    name sizes from this list."""
    sizes = [image_size]
    for _ in range(num_levels - 1):
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


def attention_block(
    channels: int, norm_groups: int, num_heads: int, context_dim: int | None = None, transformer_depth: int = 1
) -> nn.Module:
    """The attention layer of the UNet and its encoder: self-attention (`AttnBlock`), or with `context_dim` a
    `SpatialTransformer` of `transformer_depth` blocks that also attends to a context."""
    if context_dim is None:
        return AttnBlock(channels, norm_groups, num_heads)
    return SpatialTransformer(channels, norm_groups, num_heads, context_dim, transformer_depth)


def down_path(
    base_channels: int,
    channel_mult: Sequence[int],
    num_res_blocks: int,
    attn_resolutions: Sequence[int],
    image_size: int,
    temb_channels: int,
    dropout: float,
    norm_groups: int,
    num_heads: int = 1,
    head_channels: int | None = None,
    use_scale_shift_norm: bool = False,
    resblock_updown: bool = False,
    context_dim: int | None = None,
    transformer_depth: int = 1,
) -> tuple[nn.ModuleList, list[int], int]:
    """The encoder shared by the UNet and the noise-conditioned classifier: per level `num_res_blocks` residual
    blocks (each followed by attention at `attn_resolutions`), then a stride-2 Downsample (or, with
    `resblock_updown`, a downsampling ResBlock) on every level but the last. With `context_dim`, the attention is a
    `SpatialTransformer` (self- and cross-attention to a context) of `transformer_depth` blocks. Returns the layers,
    the channels of
    every feature map the UNet keeps as a skip connection (the stem's first; the last is the encoder's output) and
    the final resolution."""
    down = nn.ModuleList()
    skip_channels = [base_channels]
    ch, resolution = base_channels, image_size
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            out = base_channels * mult
            layers = nn.ModuleList(
                [ResBlock(ch, out, temb_channels, dropout, norm_groups, use_scale_shift_norm=use_scale_shift_norm)]
            )
            ch = out
            if resolution in attn_resolutions:
                heads = attention_heads(ch, num_heads, head_channels)
                layers.append(attention_block(ch, norm_groups, heads, context_dim, transformer_depth))
            down.append(layers)
            skip_channels.append(ch)
        if level != len(channel_mult) - 1:
            if resblock_updown:
                downsample = ResBlock(ch, ch, temb_channels, dropout, norm_groups, use_scale_shift_norm, "down")
            else:
                downsample = Downsample(ch)
            down.append(nn.ModuleList([downsample]))
            skip_channels.append(ch)
            resolution = (resolution + 1) // 2
    return down, skip_channels, resolution


def run_layer(
    layer: nn.Module,
    h: Tensor,
    temb: Tensor,
    size: Sequence[int] | None,
    checkpoint: bool,
    context: Tensor | None = None,
) -> Tensor:
    """One layer of the UNet's lists on h: a ResBlock takes the embedding (and an up block the output size), an
    Upsample the size, a SpatialTransformer the context. With `checkpoint`, residual and attention blocks keep no
    activations for the backward pass and run again in it (torch.utils.checkpoint; the RNG state is restored, so
    dropout draws the same mask)."""
    if isinstance(layer, Downsample):
        return layer(h)
    if isinstance(layer, Upsample):
        return layer(h, size)
    if isinstance(layer, ResBlock):
        args = (h, temb, size)
    elif isinstance(layer, AttnBlock):
        args = (h,)
    elif isinstance(layer, SpatialTransformer):
        args = (h, context)
    else:
        return layer(h)  # nn.Identity (no middle attention)
    if checkpoint:
        return torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


def run_down_path(
    down: nn.ModuleList, h: Tensor, temb: Tensor, checkpoint: bool = False, context: Tensor | None = None
) -> list[Tensor]:
    """Every feature map of the encoder `down` (from `down_path`) for input h, in order; the last is its output."""
    features = []
    for layers in down:
        for layer in layers:
            h = run_layer(layer, h, temb, None, checkpoint, context)
        features.append(h)
    return features


# The options for large images and their defaults (DDPM's network): UNet.config records only those that differ.
OPTION_DEFAULTS = dict(
    num_heads=1,
    head_channels=None,
    use_scale_shift_norm=False,
    resblock_updown=False,
    gradient_checkpointing=False,
    fourier_features=None,
    conditioning="embedding",
    context_dim=None,
    transformer_depth=1,
    cond_channels=None,
)
CONDITIONINGS = ("embedding", "cross_attention", "concat")


def fourier_features(x: Tensor, exponents: Sequence[int]) -> Tensor:
    """x with sin(2^n 2 pi x) and cos(2^n 2 pi x) of every channel for each n in `exponents` appended, (B, C (1 +
    2 len), H, W): VDM's input features (Kingma et al. 2021, appendix C; the reference's `Base2FourierFeatures`,
    n = 6, 7), which let the network see the fine detail that decides the likelihood of 8-bit data (adjacent
    levels 2/255 apart are half a period apart at n = 6)."""
    freqs = (2.0 ** torch.tensor(list(exponents), dtype=x.dtype, device=x.device)) * (2 * math.pi)
    h = (x.unsqueeze(2) * freqs.view(1, 1, -1, 1, 1)).flatten(1, 2)  # (B, C len, H, W), channel-major
    return torch.cat([x, torch.sin(h), torch.cos(h)], dim=1)


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
        num_heads: attention heads in every attention layer (1 in DDPM; 4 in improved DDPM).
        head_channels: channels per head instead (64 in ADM); overrides num_heads: heads = width // head_channels.
        use_scale_shift_norm: the time embedding scales and shifts the normalised activations of every residual
            block, GN(h) * (1 + scale) + shift, instead of being added (improved DDPM, ADM).
        resblock_updown: resample with residual blocks (avg-pool / nearest inside the block, BigGAN and ADM)
            instead of DDPM's strided conv and nearest + conv.
        gradient_checkpointing: in training, recompute residual and attention blocks in the backward pass instead
            of storing their activations: less memory, ~1/3 more compute, the same outputs and gradients.
        fourier_features: exponents n of VDM's Fourier input features sin / cos(2^n 2 pi x) (`fourier_features`; [6, 7]
            in VDM), appended to the input channels before the first convolution; None: none (DDPM).
        conditioning: how the labels y enter a class-conditional net: "embedding" (a learned class embedding added
            to the time embedding, as ADM) or "cross_attention" (LDM, Rombach et al. 2022 section 3.3: a class
            embedder gives the context, one `context_dim` token per label, and every attention layer, at
            `attn_resolutions` and in the middle block, becomes a `SpatialTransformer` whose cross-attention reads
            it; the null label's learned row is the unconditional context of classifier-free guidance). "concat": y
            is not a label but an image (B, cond_channels, H, W), spatially aligned with x, concatenated to its
            channels before the first convolution (LDM section 3.3 and 4.4 for super-resolution and inpainting;
            SR3, Saharia et al. 2021; `src/diffusion/conditioning.py` makes such y from images); no num_classes.
        cond_channels: channels of the concatenated y ("concat" only).
        context_dim: width of the context tokens (default: 4 * base_channels, the time embedding's width).
        transformer_depth: transformer blocks per SpatialTransformer (LDM: 1).
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
        num_heads: int = 1,
        head_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        gradient_checkpointing: bool = False,
        fourier_features: Sequence[int] | None = None,
        conditioning: str = "embedding",
        context_dim: int | None = None,
        transformer_depth: int = 1,
        cond_channels: int | None = None,
    ) -> None:
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning {conditioning!r} is unknown; choose one of {', '.join(CONDITIONINGS)}")
        concat = conditioning == "concat"
        if concat and (not cond_channels or cond_channels < 1 or num_classes):
            raise ValueError(
                "conditioning 'concat' takes an image y of cond_channels channels instead of labels: set cond_channels "
                f"(got {cond_channels}) and leave num_classes unset (got {num_classes})"
            )
        if cond_channels and not concat:
            raise ValueError(f"cond_channels {cond_channels} is for conditioning 'concat', not {conditioning!r}")
        cross_attention = conditioning == "cross_attention"
        if cross_attention and not num_classes:
            raise ValueError("conditioning 'cross_attention' needs labels: set num_classes")
        if cross_attention and not (attn_resolutions or mid_attention):
            raise ValueError(
                "conditioning 'cross_attention' reads the labels in the attention layers, and this net has none: set "
                "attn_resolutions or mid_attention"
            )
        if transformer_depth < 1:
            raise ValueError(f"transformer_depth must be >= 1, got {transformer_depth}")
        # The constructor arguments, JSON-ready: what checkpoints, `src.export` and `src.models.convert` (diffusers'
        # format) write beside the weights. The options for large images appear only when set, so the DDPM network's
        # config (and every file written before they existed) stays as it was; a missing option is its default.
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
        options = dict(
            num_heads=num_heads,
            head_channels=head_channels,
            use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown,
            gradient_checkpointing=gradient_checkpointing,
            fourier_features=None if fourier_features is None else [int(n) for n in fourier_features],
            conditioning=conditioning,
            context_dim=context_dim if cross_attention else None,
            transformer_depth=transformer_depth if cross_attention else 1,
            cond_channels=int(cond_channels) if concat else None,
        )
        self.config.update({k: v for k, v in options.items() if v != OPTION_DEFAULTS[k]})
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.image_size = image_size
        self.num_classes = num_classes
        self.cond_channels = options["cond_channels"] or 0
        self.base_channels = base_channels
        self.gradient_checkpointing = gradient_checkpointing
        temb_channels = 4 * base_channels

        self.temb = nn.Sequential(
            nn.Linear(base_channels, temb_channels), nn.SiLU(), nn.Linear(temb_channels, temb_channels)
        )
        # +1 row for the null label used by classifier-free guidance. With cross-attention this is the class
        # embedder (LDM's ClassEmbedder): its rows are the context tokens, not added to the time embedding.
        self.context_dim = (context_dim or temb_channels) if cross_attention else None
        label_width = self.context_dim if cross_attention else temb_channels
        self.label_emb = nn.Embedding(num_classes + 1, label_width) if num_classes else None
        self.fourier_exponents = options["fourier_features"] or []
        input_channels = in_channels * (1 + 2 * len(self.fourier_exponents)) + self.cond_channels
        self.conv_in = nn.Conv2d(input_channels, base_channels, 3, padding=1)

        def block(cin: int, cout: int, resample: str | None = None) -> ResBlock:
            return ResBlock(cin, cout, temb_channels, dropout, norm_groups, use_scale_shift_norm, resample)

        def attention(channels: int) -> nn.Module:
            heads = attention_heads(channels, num_heads, head_channels)
            return attention_block(channels, norm_groups, heads, self.context_dim, transformer_depth)

        self.down, skip_channels, resolution = down_path(
            base_channels,
            channel_mult,
            num_res_blocks,
            attn_resolutions,
            image_size,
            temb_channels,
            dropout,
            norm_groups,
            num_heads=num_heads,
            head_channels=head_channels,
            use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown,
            context_dim=self.context_dim,
            transformer_depth=transformer_depth,
        )
        ch = skip_channels[-1]

        self.mid = nn.ModuleList([block(ch, ch), attention(ch) if mid_attention else nn.Identity(), block(ch, ch)])

        # Up path: num_res_blocks + 1 blocks per level, each consuming one skip connection.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                layers = nn.ModuleList([block(ch + skip_channels.pop(), base_channels * mult)])
                ch = base_channels * mult
                if resolution in attn_resolutions:
                    layers.append(attention(ch))
                self.up.append(layers)
            if level != 0:
                self.up.append(nn.ModuleList([block(ch, ch, "up") if resblock_updown else Upsample(ch)]))
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
        context = None
        if self.label_emb is not None:
            if y is None:
                raise ValueError("this UNet is class-conditional (num_classes set): pass labels y")
            if self.context_dim is None:
                temb = temb + self.label_emb(y)
            else:  # one context token per image, (B, 1, context_dim), in the weights' dtype
                context = self.label_emb(y)[:, None]
        elif self.cond_channels:
            if y is None or y.ndim != 4 or y.shape[1] != self.cond_channels or y.shape[-2:] != x.shape[-2:]:
                shape = None if y is None else tuple(y.shape)
                raise ValueError(
                    f"this UNet concatenates a condition y of shape (B, {self.cond_channels}, {x.shape[-2]}, "
                    f"{x.shape[-1]}) to x; got {shape}"
                )
        elif y is not None:
            raise ValueError("labels y given to an unconditional UNet (num_classes is None)")
        # Only where activations are kept for a backward pass: sampling and evaluation run as without it.
        checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()

        h = fourier_features(x, self.fourier_exponents) if self.fourier_exponents else x
        h = self.conv_in(torch.cat([h, y.to(h.dtype)], dim=1) if self.cond_channels else h)
        skips = [h, *run_down_path(self.down, h, temb, checkpoint, context)]
        h = skips[-1]

        for layer in self.mid:
            h = run_layer(layer, h, temb, None, checkpoint, context)

        for layers in self.up:
            if isinstance(layers[0], Upsample) or getattr(layers[0], "resample", None) == "up":
                # Upsampling to the skip's size (not a fixed x2) lets odd sizes (7 -> 14 -> 28) round-trip.
                h = run_layer(layers[0], h, temb, tuple(skips[-1].shape[-2:]), checkpoint)
                continue
            h = torch.cat([h, skips.pop()], dim=1)
            for layer in layers:
                h = run_layer(layer, h, temb, None, checkpoint, context)

        return self.conv_out(F.silu(self.norm_out(h)))
