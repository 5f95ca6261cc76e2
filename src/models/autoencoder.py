"""The first-stage autoencoders of latent diffusion: a KL-regularised VAE and a VQ-regularised VQ-VAE.

Latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", section 3.1
and appendix G) trains the diffusion model in the latent space of a convolutional autoencoder, E: x -> z with
z of shape (c, H/f, W/f), f = 2^(levels - 1), and D: z -> x. Its latent is regularised in one of two ways:

- KL-reg (`AutoencoderKL`): the encoder outputs a diagonal Gaussian posterior q(z|x) = N(mean, diag(var)), and a
  small KL penalty pulls it towards N(0, I), as in a VAE (Kingma & Welling 2014, "Auto-Encoding Variational Bayes");
  Stable Diffusion's first stage is this model.
- VQ-reg (`VQModel`): a vector-quantisation layer inside the decoder snaps every latent vector to its nearest
  codebook entry (van den Oord et al. 2017, "Neural Discrete Representation Learning"). The encoder's output is the
  continuous latent the diffusion runs on; quantisation happens at decoding ("a vector quantization layer within
  the decoder", section 3.1), so `decode` quantises first.

The network is the one of the latent-diffusion code (`ldm/modules/diffusionmodules/model.py`) and of diffusers'
`Encoder` / `Decoder` (`diffusers.models.autoencoders.vae`), layer for layer, with the same numerics: GroupNorm
eps 1e-6, SiLU, stride-2 downsampling after padding right/bottom by one (pad (0, 1, 0, 1)), nearest-neighbour x2
upsampling then a 3x3 conv, single-head self-attention over all positions scaled by 1/sqrt(C) in the middle.

Our module names are our own (LDM's, made explicit), so converting to and from diffusers is a written map, below:

    ours                                   diffusers
    {net}.conv_in, {net}.conv_out          {net}.conv_in, {net}.conv_out                  (net: encoder, decoder)
    {net}.norm_out                         {net}.conv_norm_out
    encoder.down.{level}.blocks.{j}        encoder.down_blocks.{level}.resnets.{j}
    encoder.down.{level}.downsample.conv   encoder.down_blocks.{level}.downsamplers.0.conv
    decoder.up.{level}.blocks.{j}          decoder.up_blocks.{L - 1 - level}.resnets.{j}
    decoder.up.{level}.upsample.conv       decoder.up_blocks.{L - 1 - level}.upsamplers.0.conv
    {net}.mid.block1, .attn, .block2       {net}.mid_block.resnets.0, .attentions.0, .resnets.1
    quant_conv, post_quant_conv            quant_conv, post_quant_conv
    quantizer.codebook                     quantize.embedding                             (VQModel only)

    ResnetBlock: norm1, conv1, norm2, conv2, shortcut  <->  norm1, conv1, norm2, conv2, conv_shortcut
    SelfAttention: norm, q, k, v, proj_out (1x1 convs, (C, C, 1, 1))
                   <->  group_norm, to_q, to_k, to_v, to_out.0 (Linear layers, (C, C))

`level` counts resolutions from the full-size one (level 0) down, in the encoder and in the decoder alike (as LDM
does); diffusers numbers the decoder's blocks in the order they run, lowest resolution first, hence L - 1 - level.

The latent scale (`scaling_factor`: the diffusion runs on scaling_factor * z, the factor set so that the latents
have unit variance, section 4.3.2 and appendix D.1) is recorded in `config` for the code that wraps the first
stage; the modules here do not apply it.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.atomic import save_atomically

NORM_EPS = 1e-6  # LDM's and diffusers' GroupNorm eps in the autoencoder
LOGVAR_RANGE = (-30.0, 20.0)  # LDM's and diffusers' clamp of the posterior log-variance, against exp overflow


def group_norm(channels: int, num_groups: int) -> nn.GroupNorm:
    if channels % num_groups:
        raise ValueError(f"channels ({channels}) must be divisible by norm_num_groups ({num_groups})")
    return nn.GroupNorm(num_groups, channels, eps=NORM_EPS)


# ---------------------------------------------------------------------------------------------- layers
class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv, twice, plus the input (through a 1x1 conv where the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, norm_num_groups: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, norm_num_groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over the H*W positions, with a GroupNorm before and the input added after."""

    def __init__(self, channels: int, norm_num_groups: int) -> None:
        super().__init__()
        self.norm = group_norm(channels, norm_num_groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # (B, C, H, W) -> (B, H*W, C): every position attends to every other, softmax(q k^T / sqrt(C)) v.
        q, k, v = (proj(y).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """3x3 conv of stride 2 after padding one row and column at the bottom/right only (LDM's and diffusers'
    asymmetric padding: an even size halves exactly, and the kernel's window starts at the top-left pixel)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResNet block, self-attention (optional: diffusers' `mid_block_add_attention`), ResNet block."""

    def __init__(self, channels: int, norm_num_groups: int, attention: bool) -> None:
        super().__init__()
        self.block1 = ResnetBlock(channels, channels, norm_num_groups)
        self.attn = SelfAttention(channels, norm_num_groups) if attention else None
        self.block2 = ResnetBlock(channels, channels, norm_num_groups)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block1(x)
        if self.attn is not None:
            x = self.attn(x)
        return self.block2(x)


def resnet_blocks(in_channels: int, out_channels: int, num_blocks: int, norm_num_groups: int) -> nn.ModuleList:
    """`num_blocks` ResNet blocks, the first one changing the width."""
    return nn.ModuleList(
        ResnetBlock(in_channels if j == 0 else out_channels, out_channels, norm_num_groups) for j in range(num_blocks)
    )


class DownLevel(nn.Module):
    """The encoder's ResNet blocks at one resolution, then (but at the last level) a Downsample."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, norm_num_groups: int, last: bool):
        super().__init__()
        self.blocks = resnet_blocks(in_channels, out_channels, num_blocks, norm_num_groups)
        self.downsample = None if last else Downsample(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class UpLevel(nn.Module):
    """The decoder's ResNet blocks at one resolution, then (but at full resolution) an Upsample."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, norm_num_groups: int, first: bool):
        super().__init__()
        self.blocks = resnet_blocks(in_channels, out_channels, num_blocks, norm_num_groups)
        self.upsample = None if first else Upsample(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    """x (B, in_channels, H, W) -> (B, out_channels, H / f, W / f), f = 2^(len(block_out_channels) - 1)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        block_out_channels: Sequence[int],
        layers_per_block: int,
        norm_num_groups: int,
        mid_attention: bool,
    ) -> None:
        super().__init__()
        widths = list(block_out_channels)
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        # Level `level` runs at resolution H / 2^level; each level takes the previous level's width.
        self.down = nn.ModuleList(
            DownLevel(widths[max(level - 1, 0)], width, layers_per_block, norm_num_groups, level == len(widths) - 1)
            for level, width in enumerate(widths)
        )
        self.mid = MidBlock(widths[-1], norm_num_groups, mid_attention)
        self.norm_out = group_norm(widths[-1], norm_num_groups)
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z (B, in_channels, h, w) -> (B, out_channels, h * f, w * f); the encoder's mirror image, with one more ResNet
    block per level (LDM's num_res_blocks + 1)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        block_out_channels: Sequence[int],
        layers_per_block: int,
        norm_num_groups: int,
        mid_attention: bool,
    ) -> None:
        super().__init__()
        widths = list(block_out_channels)
        self.conv_in = nn.Conv2d(in_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], norm_num_groups, mid_attention)
        # Indexed by level as the encoder (up[0] is full resolution), run from the last level to the first; each
        # level takes the width of the level below it (the one that ran before).
        self.up = nn.ModuleList(
            UpLevel(widths[min(level + 1, len(widths) - 1)], width, layers_per_block + 1, norm_num_groups, level == 0)
            for level, width in enumerate(widths)
        )
        self.norm_out = group_norm(widths[0], norm_num_groups)
        self.conv_out = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ---------------------------------------------------------------------------------------------- KL-reg
class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))) from the encoder's (B, 2C, h, w) output: mean then log-variance along the
    channels, the log-variance clamped to [-30, 20] (LDM's `DiagonalGaussianDistribution`, as diffusers')."""

    def __init__(self, parameters: Tensor) -> None:
        self.parameters = parameters
        self.mean, logvar = parameters.chunk(2, dim=1)
        self.logvar = logvar.clamp(*LOGVAR_RANGE)
        self.var = self.logvar.exp()
        self.std = (0.5 * self.logvar).exp()

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """z = mean + std * eps (the reparameterisation, Kingma & Welling 2014). The noise is drawn on the generator's
        device and moved, as diffusers' `randn_tensor`, so that a seeded CPU generator gives the same z anywhere."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample, summed over C, h, w: 0.5 * sum(mean^2 + var - 1 - logvar)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=(1, 2, 3))

    def nll(self, x: Tensor, dims: Sequence[int] = (1, 2, 3)) -> Tensor:
        """-log q(x) per sample in nats, summed over `dims`."""
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + (x - self.mean).pow(2) / self.var, dim=dims)


class AutoencoderKL(nn.Module):
    """The KL-regularised first stage. Defaults: Stable Diffusion's (LDM's KL-f8: 4 levels, 4 latent channels)."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        block_out_channels: Sequence[int] = (128, 256, 512, 512),
        layers_per_block: int = 2,
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        mid_attention: bool = True,
        scaling_factor: float = 1.0,
    ) -> None:
        super().__init__()
        self.config = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "block_out_channels": [int(c) for c in block_out_channels],
            "layers_per_block": layers_per_block,
            "latent_channels": latent_channels,
            "norm_num_groups": norm_num_groups,
            "mid_attention": mid_attention,
            # 1.0 until measured: the factor belongs to the trained weights (1 / std of their latents).
            "scaling_factor": float(scaling_factor),
        }
        args = (block_out_channels, layers_per_block, norm_num_groups, mid_attention)
        self.encoder = Encoder(in_channels, 2 * latent_channels, *args)  # mean and log-variance
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.decoder = Decoder(latent_channels, out_channels, *args)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.config["block_out_channels"]) - 1)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: Tensor, sample_posterior: bool = False, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussian]:
        """(reconstruction, posterior), as LDM's AutoencoderKL: the posterior's `kl()` is the regulariser."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


# ---------------------------------------------------------------------------------------------- VQ-reg
class Quantized(NamedTuple):
    latents: Tensor  # z_q (B, C, h, w), the codebook vectors, with the straight-through gradient to z_e
    loss: Tensor  # the codebook and commitment loss, a scalar
    indices: Tensor  # (B, h, w) codebook indices


class VectorQuantizer(nn.Module):
    """Nearest-codebook-vector quantisation (van den Oord et al. 2017) with a straight-through gradient.

    loss = ||sg[z_e] - z_q||^2 + beta ||z_e - sg[z_q]||^2 (means over all elements): the first term moves the codes
    towards the encoder's outputs, the second (the commitment loss) keeps the encoder's outputs near their codes.
    `beta_term` says which term beta weights: "commitment" is the paper's. diffusers' `VectorQuantizer` weights the
    codebook term by default (legacy=True, kept there for compatibility with a bug of the original code) and the
    commitment term with legacy=False; its `VQModel` uses the default, so `config_from_diffusers` gives
    beta_term="codebook". The loss's value is (1 + beta) * mean((z_q - z_e)^2) either way; only how its gradient
    splits between encoder and codebook differs.

    Code usage is counted in a buffer over every call until `reset_usage()`, so that it can be measured over an
    epoch (dead codes) rather than per batch. The buffer is per process and not saved in the state dict.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, beta: float = 0.25, beta_term: str = "commitment"):
        super().__init__()
        if beta_term not in ("commitment", "codebook"):
            raise ValueError(f"beta_term must be 'commitment' or 'codebook', got {beta_term!r}")
        self.beta = beta
        self.beta_term = beta_term
        self.codebook = nn.Embedding(num_embeddings, embedding_dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / num_embeddings, 1.0 / num_embeddings)  # LDM's, diffusers'
        self.register_buffer("usage", torch.zeros(num_embeddings, dtype=torch.long), persistent=False)

    def forward(self, z: Tensor) -> Quantized:
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        # torch.cdist, as diffusers, so that near-ties resolve the same way.
        indices = torch.cdist(flat, self.codebook.weight).argmin(dim=1)
        z_q = self.codebook(indices).view(b, h, w, c).permute(0, 3, 1, 2)
        codebook_loss = torch.mean((z.detach() - z_q) ** 2)
        commitment_loss = torch.mean((z - z_q.detach()) ** 2)
        if self.beta_term == "commitment":
            loss = codebook_loss + self.beta * commitment_loss
        else:
            loss = self.beta * codebook_loss + commitment_loss
        self.usage += torch.bincount(indices, minlength=self.usage.numel())
        # Straight-through: the forward pass outputs z_q, the backward pass copies z_q's gradient to z.
        z_q = z + (z_q - z).detach()
        return Quantized(z_q, loss, indices.view(b, h, w))

    def lookup(self, indices: Tensor) -> Tensor:
        """The codebook vectors of (B, h, w) indices, (B, C, h, w)."""
        return self.codebook(indices).permute(0, 3, 1, 2)

    def code_usage(self) -> Tensor:
        """How often each code was chosen since the last reset, (num_embeddings,) int64."""
        return self.usage.clone()

    def reset_usage(self) -> None:
        self.usage.zero_()


class VQModel(nn.Module):
    """The VQ-regularised first stage. Defaults: LDM's VQ-f4 (3 levels, 3 latent channels, 8192 codes).

    `encode(x)` is the continuous latent h (after quant_conv) the diffusion model runs on; `decode(h)` quantises it,
    then decodes. `quantize(h)` exposes z_q, the loss and the indices, `forward(x)` returns them with the
    reconstruction, for training."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        block_out_channels: Sequence[int] = (128, 256, 512),
        layers_per_block: int = 2,
        latent_channels: int = 3,
        norm_num_groups: int = 32,
        mid_attention: bool = True,
        num_embeddings: int = 8192,
        beta: float = 0.25,
        beta_term: str = "commitment",
        scaling_factor: float = 1.0,
    ) -> None:
        super().__init__()
        self.config = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "block_out_channels": [int(c) for c in block_out_channels],
            "layers_per_block": layers_per_block,
            "latent_channels": latent_channels,
            "norm_num_groups": norm_num_groups,
            "mid_attention": mid_attention,
            "num_embeddings": num_embeddings,
            "beta": float(beta),
            "beta_term": beta_term,
            "scaling_factor": float(scaling_factor),
        }
        args = (block_out_channels, layers_per_block, norm_num_groups, mid_attention)
        self.encoder = Encoder(in_channels, latent_channels, *args)
        self.quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.quantizer = VectorQuantizer(num_embeddings, latent_channels, beta, beta_term)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.decoder = Decoder(latent_channels, out_channels, *args)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.config["block_out_channels"]) - 1)

    def encode(self, x: Tensor) -> Tensor:
        return self.quant_conv(self.encoder(x))

    def quantize(self, h: Tensor) -> Quantized:
        return self.quantizer(h)

    def decode_quantized(self, z_q: Tensor) -> Tensor:
        """Decode latents that are already quantised (diffusers' decode(force_not_quantize=True))."""
        return self.decoder(self.post_quant_conv(z_q))

    def decode(self, h: Tensor) -> Tensor:
        return self.decode_quantized(self.quantize(h).latents)

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Decode (B, h, w) codebook indices."""
        return self.decode_quantized(self.quantizer.lookup(indices))

    def code_usage(self) -> Tensor:
        return self.quantizer.code_usage()

    def reset_usage(self) -> None:
        self.quantizer.reset_usage()

    def forward(self, x: Tensor) -> tuple[Tensor, Quantized]:
        quantized = self.quantize(self.encode(x))
        return self.decode_quantized(quantized.latents), quantized


# ---------------------------------------------------------------------------------------------- diffusers key map
_RESNET_PARTS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "shortcut": "conv_shortcut"}
_ATTENTION_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_LINEAR_IN_DIFFUSERS = ("q", "k", "v", "proj_out")  # our 1x1 convs that are Linear layers in diffusers

# (ours, diffusers) module paths, the table in the module docstring. {level}, {j}: integers; {rlevel} = L - 1 -
# {level}, the decoder's block order in diffusers. Each ResNet / attention entry expands to its parts below.
_MODULE_TABLE: list[tuple[str, str, dict[str, str] | None]] = [
    ("{net}.conv_in", "{net}.conv_in", None),
    ("{net}.conv_out", "{net}.conv_out", None),
    ("{net}.norm_out", "{net}.conv_norm_out", None),
    ("encoder.down.{level}.blocks.{j}", "encoder.down_blocks.{level}.resnets.{j}", _RESNET_PARTS),
    ("encoder.down.{level}.downsample.conv", "encoder.down_blocks.{level}.downsamplers.0.conv", None),
    ("decoder.up.{level}.blocks.{j}", "decoder.up_blocks.{rlevel}.resnets.{j}", _RESNET_PARTS),
    ("decoder.up.{level}.upsample.conv", "decoder.up_blocks.{rlevel}.upsamplers.0.conv", None),
    ("{net}.mid.block1", "{net}.mid_block.resnets.0", _RESNET_PARTS),
    ("{net}.mid.attn", "{net}.mid_block.attentions.0", _ATTENTION_PARTS),
    ("{net}.mid.block2", "{net}.mid_block.resnets.1", _RESNET_PARTS),
    ("quant_conv", "quant_conv", None),
    ("post_quant_conv", "post_quant_conv", None),
]
_VQ_TABLE = [("quantizer.codebook", "quantize.embedding", None)]

_PLACEHOLDERS = {"net": r"(?P<net>encoder|decoder)", "level": r"(?P<level>\d+)", "j": r"(?P<j>\d+)"}
_PLACEHOLDERS |= {"rlevel": r"(?P<rlevel>\d+)"}


def _rules(table: list, to_diffusers: bool) -> list[tuple[re.Pattern, str, bool]]:
    """(source pattern, target template, is a Linear weight in diffusers) for every module, parts expanded."""
    rules = []
    for our_module, their_module, parts in table:
        for our_part, their_part in (parts or {"": ""}).items():
            ours = f"{our_module}.{our_part}" if our_part else our_module
            theirs = f"{their_module}.{their_part}" if their_part else their_module
            source, target = (ours, theirs) if to_diffusers else (theirs, ours)
            regex = re.escape(source).replace(r"\{", "{").replace(r"\}", "}").format(**_PLACEHOLDERS)
            linear = parts is _ATTENTION_PARTS and our_part in _LINEAR_IN_DIFFUSERS
            rules.append((re.compile(rf"{regex}\.(?P<param>weight|bias)"), f"{target}.{{param}}", linear))
    return rules


def _num_levels(state_dict: dict[str, Tensor], decoder_level: str) -> int:
    levels = [int(m.group(1)) for key in state_dict if (m := re.match(decoder_level, key))]
    return max(levels, default=-1) + 1


def _convert(state_dict: dict[str, Tensor], table: list, to_diffusers: bool) -> dict[str, Tensor]:
    rules = _rules(table, to_diffusers)
    # L, the number of levels, from the decoder's level indices (they run 0 .. L-1 in both namings).
    num_levels = _num_levels(state_dict, r"decoder\.up\.(\d+)\." if to_diffusers else r"decoder\.up_blocks\.(\d+)\.")
    converted = {}
    for key, tensor in state_dict.items():
        for pattern, template, linear in rules:
            if match := pattern.fullmatch(key):
                groups = match.groupdict()
                # level <-> rlevel = L - 1 - level, in whichever direction the key goes.
                if "level" in groups:
                    groups["rlevel"] = str(num_levels - 1 - int(groups["level"]))
                elif "rlevel" in groups:
                    groups["level"] = str(num_levels - 1 - int(groups["rlevel"]))
                if linear and groups["param"] == "weight":
                    # (C, C, 1, 1) 1x1 conv <-> (C, C) Linear: the same matrix.
                    tensor = tensor[:, :, 0, 0] if to_diffusers else tensor[:, :, None, None]
                converted[template.format(**groups)] = tensor
                break
        else:
            raise ValueError(f"no {'diffusers' if to_diffusers else 'our'} name for the parameter {key!r}")
    return converted


def autoencoder_kl_to_diffusers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our `AutoencoderKL` state dict in diffusers' `AutoencoderKL` names and shapes."""
    return _convert(state_dict, _MODULE_TABLE, to_diffusers=True)


def autoencoder_kl_from_diffusers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers `AutoencoderKL` state dict in our names and shapes."""
    return _convert(state_dict, _MODULE_TABLE, to_diffusers=False)


def vq_model_to_diffusers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our `VQModel` state dict in diffusers' `VQModel` names and shapes."""
    return _convert(state_dict, _MODULE_TABLE + _VQ_TABLE, to_diffusers=True)


def vq_model_from_diffusers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers `VQModel` state dict in our names and shapes."""
    return _convert(state_dict, _MODULE_TABLE + _VQ_TABLE, to_diffusers=False)


# ---------------------------------------------------------------------------------------------- diffusers configs
DIFFUSERS_VQ_BETA = 0.25  # diffusers' VQModel hard-codes its VectorQuantizer's beta

# diffusers' constructor defaults (diffusers 0.42), for the keys a config.json may leave out; these are the keys read
# and checked below.
_COMMON_DEFAULTS = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
    "mid_block_add_attention": True,
}
_KL_DEFAULTS = _COMMON_DEFAULTS | {"latent_channels": 4, "use_quant_conv": True, "use_post_quant_conv": True}
_KL_DEFAULTS |= {"shift_factor": None, "latents_mean": None, "latents_std": None}
_VQ_DEFAULTS = _COMMON_DEFAULTS | {"latent_channels": 3, "num_vq_embeddings": 256, "vq_embed_dim": None}
_VQ_DEFAULTS |= {"norm_type": "group"}
# Keys that do not change what the network computes: metadata, and diffusers' own switches.
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "sample_size"}
_IGNORED |= {"force_upcast"}  # fp16 handling in diffusers' pipelines
_IGNORED |= {"lookup_from_codebook"}  # only for decode(force_not_quantize=True); ours is `decode_indices`


def diffusers_config(model: AutoencoderKL | VQModel) -> dict:
    """The diffusers `AutoencoderKL` / `VQModel` config (constructor arguments) of the same network."""
    c = model.config
    levels = len(c["block_out_channels"])
    config = {
        "in_channels": c["in_channels"],
        "out_channels": c["out_channels"],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": list(c["block_out_channels"]),
        "layers_per_block": c["layers_per_block"],
        "act_fn": "silu",
        "latent_channels": c["latent_channels"],
        "norm_num_groups": c["norm_num_groups"],
        "mid_block_add_attention": c["mid_attention"],
        "scaling_factor": c["scaling_factor"],
    }
    if isinstance(model, VQModel):
        if c["beta"] != DIFFUSERS_VQ_BETA:
            raise ValueError(
                f"beta={c['beta']} has no diffusers equivalent (VQModel's commitment beta is fixed at 0.25)"
            )
        # beta_term: either is exported. diffusers computes the same loss value; it splits the gradient as "codebook".
        return config | {"num_vq_embeddings": c["num_embeddings"], "vq_embed_dim": c["latent_channels"]}
    return config | {"use_quant_conv": True, "use_post_quant_conv": True}


def config_from_diffusers(config: dict) -> dict:
    """Our constructor arguments from a diffusers `AutoencoderKL` or `VQModel` config (a config.json dict or
    `model.config`): VQModel's when the config has `num_vq_embeddings` or says `_class_name: VQModel`.

    Raises a one-line ValueError naming every option that our network cannot represent.
    """
    is_vq = config.get("_class_name") == "VQModel" or "num_vq_embeddings" in config
    defaults = _VQ_DEFAULTS if is_vq else _KL_DEFAULTS
    c = defaults | {key: value for key, value in config.items() if key not in _IGNORED}
    problems = [f"{key} (an option we do not know)" for key in c if key not in defaults]

    def require(key: str, allowed: tuple, why: str) -> None:
        if c[key] not in allowed:
            problems.append(f"{key}={c[key]!r} ({why})")

    widths = [int(w) for w in c["block_out_channels"]]
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if list(c[key]) != [block] * len(widths):
            problems.append(f"{key}={list(c[key])} (only {block}, one per block_out_channels entry)")
    require("act_fn", ("silu", "swish"), "SiLU only")  # diffusers' "swish" is SiLU as well
    if is_vq:
        require("norm_type", ("group",), "GroupNorm only, not MoVQ's spatial norm")
        require("vq_embed_dim", (None, c["latent_channels"]), "the codebook width is latent_channels")
    else:
        require("use_quant_conv", (True,), "the model always has quant_conv")
        require("use_post_quant_conv", (True,), "the model always has post_quant_conv")
        require("shift_factor", (None,), "no latent shift")
        require("latents_mean", (None,), "no per-channel latent normalisation")
        require("latents_std", (None,), "no per-channel latent normalisation")
    if problems:
        kind = "VQModel" if is_vq else "AutoencoderKL"
        raise ValueError(f"diffusers {kind} config has no equivalent here: {'; '.join(problems)}")

    args = {
        "in_channels": int(c["in_channels"]),
        "out_channels": int(c["out_channels"]),
        "block_out_channels": widths,
        "layers_per_block": int(c["layers_per_block"]),
        "latent_channels": int(c["latent_channels"]),
        "norm_num_groups": int(c["norm_num_groups"]),
        "mid_attention": bool(c["mid_block_add_attention"]),
    }
    if is_vq:
        # diffusers' VQModel: beta 0.25 on the codebook term (VectorQuantizer(legacy=True), see VectorQuantizer).
        args |= {"num_embeddings": int(c["num_vq_embeddings"]), "beta": DIFFUSERS_VQ_BETA, "beta_term": "codebook"}
    return args | {"scaling_factor": float(c["scaling_factor"])}


# ---------------------------------------------------------------------------------------------- files
AUTOENCODERS: dict[str, type[nn.Module]] = {"AutoencoderKL": AutoencoderKL, "VQModel": VQModel}


def save_autoencoder(model: AutoencoderKL | VQModel, path: str | os.PathLike) -> Path:
    """{"class", "config", "state_dict"} in one torch file, written atomically (`src.atomic.save_atomically`: an
    interrupted save never leaves half a file where a good one was); `load_autoencoder` rebuilds the model."""
    blob = {"class": type(model).__name__, "config": dict(model.config), "state_dict": model.state_dict()}
    save_atomically(blob, path)
    return Path(path)


def load_autoencoder(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> AutoencoderKL | VQModel:
    """The autoencoder saved in `path` by `save_autoencoder` (what `python -m src.autoencoder_main fit` writes as
    `<run dir>/autoencoder.pt`), in eval mode."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"autoencoder file {path} does not exist: train one with "
            "python -m src.autoencoder_main fit --config configs/fashion_mnist_autoencoder.yaml"
        )
    blob = torch.load(path, map_location=map_location, weights_only=True)
    name = blob.get("class") if isinstance(blob, dict) else None
    if name not in AUTOENCODERS:
        raise ValueError(f"{path} holds no autoencoder written by save_autoencoder (class {name!r})")
    model = AUTOENCODERS[name](**blob["config"])
    model.load_state_dict(blob["state_dict"])
    return model.eval()
