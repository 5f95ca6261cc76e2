"""Weights in and out of diffusers' `UNet2DModel` format (config.json + diffusion_pytorch_model.safetensors).

    net = load_diffusers_unet("ddpm-cifar10-32/")    # our UNet with diffusers' weights
    save_diffusers_unet(net, "out/")                 # diffusers.UNet2DModel.from_pretrained("out/") loads it

This file imports the UNet; the UNet knows nothing of diffusers (the model layer depends on torch only).

diffusers' DDPM checkpoints (google/ddpm-cifar10-32, ddpm-celebahq-256, ddpm-lsun-*, ddpm-cat-256, ...) are
conversions of the same TensorFlow DDPM network our UNet reproduces, so the map is one-to-one, parameter by
parameter. It is written out explicitly below, as nanoGPT's `from_pretrained` does, and every tensor's shape is
checked against the network built from the config:

    ours                         diffusers
    conv_in                      conv_in
    temb.0, temb.2               time_embedding.linear_1, time_embedding.linear_2
    label_emb                    class_embedding                      (num_class_embeds = num_classes + 1)
    down.k.0 (ResBlock)          down_blocks.<level>.resnets.<j>
    down.k.1 (AttnBlock)         down_blocks.<level>.attentions.<j>
    down.k.0.conv (Downsample)   down_blocks.<level>.downsamplers.0.conv
    mid.0, mid.1, mid.2          mid_block.resnets.0, mid_block.attentions.0, mid_block.resnets.1
    up.k.0 / up.k.1              up_blocks.<L - 1 - level>.resnets.<j> / .attentions.<j>
    up.k.0.conv (Upsample)       up_blocks.<L - 1 - level>.upsamplers.0.conv
    norm_out, conv_out           conv_norm_out, conv_out

    ResBlock: norm1, conv1, temb_proj, norm2, conv2, skip  <->  norm1, conv1, time_emb_proj, norm2, conv2,
              conv_shortcut
    AttnBlock: norm <-> group_norm; qkv, a 1x1 conv with 3C outputs ordered (q, k, v), <-> to_q, to_k, to_v
               (C x C Linear layers, concatenated along the output axis); proj_out (1x1 conv) <-> to_out.0 (Linear)

The options for large images map as well:
    num_heads / head_channels    attention_head_dim (one head width for every layer: C / num_heads, or
                                 head_channels); both split q, k, v into heads of consecutive channels
    use_scale_shift_norm         resnet_time_scale_shift="scale_shift": temb_proj / time_emb_proj has 2C outputs,
                                 (scale, shift) in that order; attn_norm_num_groups = norm_num_groups, because
                                 diffusers' middle attention otherwise has no GroupNorm in this mode
    resblock_updown              ResnetDownsampleBlock2D / ResnetUpsampleBlock2D (AttnDownBlock2D / AttnUpBlock2D
                                 with downsample_type / upsample_type="resnet" where there is attention):
    down.k.0 (ResBlock, down)    down_blocks.<level>.downsamplers.0 (a ResnetBlock2D with down=True)
    up.k.0 (ResBlock, up)        up_blocks.<L - 1 - level>.upsamplers.0 (a ResnetBlock2D with up=True)

Both networks compute the same function when the config has DDPM's choices: sin-then-cos timestep embedding with
frequencies 10000^(-i / (d/2 - 1)) (flip_sin_to_cos=False, freq_shift=1), the TensorFlow "SAME" stride-2
downsampling (downsample_padding=0 pads right/bottom only), GroupNorm eps 1e-6, attention with the residual added
unscaled. Configurations without an equivalent are refused with one error listing every reason.

Sizes: diffusers' `Upsample2D` doubles the feature map (`UNet2DModel` passes no `output_size`), ours upsamples to
the skip connection's size. They agree whenever `image_size` is divisible by 2^(levels - 1) (32 -> 4, 28 -> 7);
for other sizes (28 with four levels: 7 -> 4 -> 8) diffusers' model cannot run at all, so `save_diffusers_unet` refuses.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from src.models.unet import OPTION_DEFAULTS, Downsample, UNet, Upsample

CONFIG_NAME = "config.json"
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
NORM_EPS = 1e-6  # our GroupNorms' eps (DDPM's TensorFlow default)

# diffusers' UNet2DModel config keys that we read or check (below) and those that do not change the function.
_IGNORED_KEYS = {"num_train_timesteps", "sample_size", "in_channels", "out_channels", "block_out_channels"}

# diffusers' down / up block types and how they resample: None for the Attn blocks, which follow downsample_type /
# upsample_type ("conv" or "resnet").
_DOWN_RESAMPLING = {"DownBlock2D": "conv", "ResnetDownsampleBlock2D": "resnet", "AttnDownBlock2D": None}
_UP_RESAMPLING = {"UpBlock2D": "conv", "ResnetUpsampleBlock2D": "resnet", "AttnUpBlock2D": None}

# Our ResBlock's submodules and diffusers' ResnetBlock2D's.
_RES_NAMES = {
    "norm1": "norm1",
    "conv1": "conv1",
    "temb_proj": "time_emb_proj",
    "norm2": "norm2",
    "conv2": "conv2",
    "skip": "conv_shortcut",
}

# Attention parameter names of diffusers' old `AttentionBlock`, still in the published DDPM weight files (diffusers
# renames them when loading, in `ModelMixin._fix_state_dict_keys_on_load`).
_DEPRECATED_ATTENTION = re.compile(r"(\.attentions\.\d+)\.(query|key|value|proj_attn)\.")
_DEPRECATED_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


class DiffusersConversionError(ValueError):
    """A diffusers config or weight file that our UNet cannot represent or that does not match its config."""


# ---------------------------------------------------------------------------------------------- configs
def level_resolutions(image_size: int, num_levels: int) -> tuple[list[int], list[int]]:
    """The feature-map sizes at which our UNet tests `attn_resolutions`, per level, on the way down and up.

    Down, each level halves rounding up (28 -> 14 -> 7 -> 4); up, the size doubles from the bottom (4 -> 8 -> 16 ->
    32), so the two lists differ when `image_size` is not divisible by 2^(num_levels - 1).
    """
    down = [image_size]
    for _ in range(num_levels - 1):
        down.append((down[-1] + 1) // 2)
    up = [down[-1] * 2 ** (num_levels - 1 - level) for level in range(num_levels)]
    return down, up


def unet_args_from_diffusers(config: dict) -> dict:
    """Our `UNet` constructor arguments from a diffusers `UNet2DModel` config.json dict.

    Raises DiffusersConversionError listing every setting we cannot represent.
    """
    problems: list[str] = []

    def require(key: str, allowed: tuple, default: object, why: str) -> None:
        value = config.get(key, default)
        if value not in allowed:
            problems.append(f"{key}={value!r} ({why}; supported: {', '.join(map(repr, allowed))})")

    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        problems.append(f"_class_name={config['_class_name']!r} (only UNet2DModel is supported)")
    require("flip_sin_to_cos", (False,), True, "our timestep embedding is sin then cos, as DDPM's")
    require("freq_shift", (1,), 0, "our embedding frequencies are 10000^(-i / (d/2 - 1)), diffusers' freq_shift=1")
    require("time_embedding_type", ("positional",), "positional", "sinusoidal embedding only")
    require("center_input_sample", (False,), False, "inputs are already in [-1, 1]")
    require("act_fn", ("silu",), "silu", "SiLU everywhere")
    require("downsample_type", ("conv", "resnet"), "conv", "strided conv or residual-block downsampling")
    require("upsample_type", ("conv", "resnet"), "conv", "nearest + conv or residual-block upsampling")
    require("resnet_time_scale_shift", ("default", "scale_shift"), "default", "added or scale-shift time embedding")
    require("mid_block_type", ("UNetMidBlock2D",), "UNetMidBlock2D", "DDPM's middle block")
    require("mid_block_scale_factor", (1, 1.0), 1, "unscaled residuals")
    require("class_embed_type", (None,), None, "classes go through a learned embedding table")
    require("norm_eps", (NORM_EPS,), 1e-5, "our GroupNorm eps is DDPM's 1e-6")

    channels = list(config.get("block_out_channels", (224, 448, 672, 896)))
    base = channels[0]
    mult = [c // base for c in channels]
    if any(c % base for c in channels):
        problems.append(f"block_out_channels={channels} (every width must be a multiple of the first)")
    time_dim = config.get("time_embedding_dim")
    if time_dim not in (None, 4 * base):
        problems.append(f"time_embedding_dim={time_dim} (ours is 4 * block_out_channels[0] = {4 * base})")
    groups = config.get("norm_num_groups", 32)
    if groups is None:
        problems.append("norm_num_groups=None (set the number of GroupNorm groups explicitly)")
    if config.get("attn_norm_num_groups") not in (None, groups):
        problems.append(f"attn_norm_num_groups={config['attn_norm_num_groups']} (must equal norm_num_groups)")
    scale_shift = config.get("resnet_time_scale_shift", "default") == "scale_shift"
    add_attention = bool(config.get("add_attention", True))
    if scale_shift and add_attention and config.get("attn_norm_num_groups") is None:
        problems.append(
            "resnet_time_scale_shift='scale_shift' with attn_norm_num_groups=None (diffusers' middle attention then "
            "has no GroupNorm, ours always has one; set attn_norm_num_groups to norm_num_groups)"
        )

    down_types = list(config.get("down_block_types", ()))
    up_types = list(config.get("up_block_types", ()))
    levels = len(channels)
    if len(down_types) != levels or len(up_types) != levels:
        problems.append(f"{len(down_types)} down / {len(up_types)} up block types for {levels} block_out_channels")
    bad_down = [t for t in down_types if t not in _DOWN_RESAMPLING]
    bad_up = [t for t in up_types if t not in _UP_RESAMPLING]
    if bad_down or bad_up:
        problems.append(
            f"block types {bad_down + bad_up} (supported: {', '.join(_DOWN_RESAMPLING)}, {', '.join(_UP_RESAMPLING)})"
        )
    # How each level but the last resamples: "conv" (DDPM's strided conv / nearest + conv) or "resnet" (a ResBlock
    # that resamples); the Attn blocks follow downsample_type / upsample_type. Ours does one or the other throughout.
    down_kinds = {_DOWN_RESAMPLING.get(t) or config.get("downsample_type", "conv") for t in down_types[:-1]}
    up_kinds = {_UP_RESAMPLING.get(t) or config.get("upsample_type", "conv") for t in up_types[:-1]}
    kinds = down_kinds | up_kinds
    if len(kinds) > 1:
        problems.append(
            f"down blocks {down_types} and up blocks {up_types} with downsample_type="
            f"{config.get('downsample_type', 'conv')!r}, upsample_type={config.get('upsample_type', 'conv')!r} mix "
            "conv and residual-block resampling (ours uses one or the other at every level: resblock_updown)"
        )
    if "conv" in down_kinds:
        require("downsample_padding", (0,), 1, "we pad right/bottom only, as TensorFlow's SAME")

    size = config.get("sample_size")
    if isinstance(size, (list, tuple)):
        size = size[0] if len(set(size)) == 1 else None
    if not isinstance(size, int):
        problems.append(f"sample_size={config.get('sample_size')!r} (a square size is needed to place attention)")
        size = 32

    # Attention: diffusers places it per block, we per resolution; translate and check that it lands the same.
    attn_down = [i for i, t in enumerate(down_types) if t.startswith("Attn")]
    attn_up = [levels - 1 - j for j, t in enumerate(up_types) if t.startswith("Attn")]
    down_res, up_res = level_resolutions(size, levels)
    attn_resolutions = sorted({down_res[i] for i in attn_down} | {up_res[i] for i in attn_up})
    placed_down = [i for i in range(levels) if down_res[i] in attn_resolutions]
    placed_up = [i for i in range(levels) if up_res[i] in attn_resolutions]
    if not problems and (placed_down != attn_down or sorted(placed_up) != sorted(attn_up)):
        problems.append(
            f"attention in down levels {attn_down} and up levels {sorted(attn_up)} (ours places attention by "
            "resolution, the same levels on both paths)"
        )
    # Heads: diffusers gives every attention layer width // attention_head_dim heads (None: one head); a head
    # width equal to every layer's width is our single head, any other is our head_channels.
    head_dim = config.get("attention_head_dim")
    head_channels = None
    widths = {channels[i] for i in set(attn_down) | set(attn_up) if 0 <= i < levels}
    widths |= {channels[-1]} if add_attention else set()
    if head_dim is not None and any(w != head_dim for w in widths):
        uneven = sorted(w for w in widths if head_dim < 1 or w % head_dim)
        if uneven:
            problems.append(
                f"attention_head_dim={head_dim} does not divide the attention widths {uneven} (diffusers then "
                "attends over fewer channels than the block has; ours needs whole heads)"
            )
        head_channels = int(head_dim)

    num_class_embeds = config.get("num_class_embeds")
    if num_class_embeds is not None and num_class_embeds < 2:
        problems.append(f"num_class_embeds={num_class_embeds} (ours has num_classes + 1 >= 2 rows)")

    known = set(UNET2D_KEYS) | _IGNORED_KEYS
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
        warnings.warn(f"diffusers UNet config: ignoring unknown keys {unknown}", stacklevel=2)
    if problems:
        raise DiffusersConversionError(
            "this diffusers UNet2DModel config has no equivalent in our UNet:\n  " + "\n  ".join(problems)
        )
    # More input than output channels: the extra inputs are a concatenated condition (LDMSuperResolutionPipeline's
    # UNet2DModel: 6 in, 3 out); a learned variance is the other way round (out = 2 in).
    in_channels, out_channels = int(config.get("in_channels", 3)), int(config.get("out_channels", 3))
    concat = in_channels > out_channels
    if concat and num_class_embeds is not None:
        raise DiffusersConversionError(
            f"in_channels {in_channels} > out_channels {out_channels} (a concatenated condition) with class "
            "embeddings: ours takes either labels or a concatenated image, not both"
        )
    return dict(
        in_channels=out_channels if concat else in_channels,
        base_channels=base,
        channel_mult=mult,
        num_res_blocks=int(config.get("layers_per_block", 2)),
        attn_resolutions=attn_resolutions,
        dropout=float(config.get("dropout", 0.0)),
        image_size=size,
        # Our table has one more row than there are classes, the null label of classifier-free guidance: a
        # diffusers model with N class embeddings becomes num_classes = N - 1 (label N - 1 acts as "null").
        num_classes=None if num_class_embeds is None else int(num_class_embeds) - 1,
        out_channels=out_channels,
        norm_groups=int(groups) if groups is not None else 32,
        mid_attention=add_attention,
        **_nondefault(
            head_channels=head_channels, use_scale_shift_norm=scale_shift, resblock_updown=kinds == {"resnet"}
        ),
        **({"conditioning": "concat", "cond_channels": in_channels - out_channels} if concat else {}),
    )


def _nondefault(**options: object) -> dict:
    """The options for large images that differ from their defaults (the form of `UNet.config`)."""
    return {k: v for k, v in options.items() if v != OPTION_DEFAULTS[k]}


# Keys written by `diffusers_config_from_unet` (the UNet2DModel constructor arguments).
UNET2D_KEYS = (
    "sample_size", "in_channels", "out_channels", "center_input_sample", "time_embedding_type",
    "time_embedding_dim", "freq_shift", "flip_sin_to_cos", "down_block_types", "mid_block_type", "up_block_types",
    "block_out_channels", "layers_per_block", "mid_block_scale_factor", "downsample_padding", "downsample_type",
    "upsample_type", "dropout", "act_fn", "attention_head_dim", "norm_num_groups", "attn_norm_num_groups",
    "norm_eps", "resnet_time_scale_shift", "add_attention", "class_embed_type", "num_class_embeds",
)  # fmt: skip


def diffusers_config_from_unet(net: UNet) -> dict:
    """The diffusers `UNet2DModel` config that builds the same network as `net`."""
    args = {**OPTION_DEFAULTS, **net.config}
    if args["fourier_features"]:
        raise DiffusersConversionError(
            f"fourier_features {args['fourier_features']}: diffusers' UNet2DModel has no Fourier input features"
        )
    if args["conditioning"] == "cross_attention":
        raise DiffusersConversionError(
            f"conditioning {args['conditioning']!r}: diffusers' UNet2DModel has no cross-attention (its "
            "UNet2DConditionModel does, with another layout); use conditioning 'embedding' or 'concat' to convert"
        )
    mult, size = list(args["channel_mult"]), int(args["image_size"])
    levels = len(mult)
    if size % 2 ** (levels - 1):
        raise DiffusersConversionError(
            f"image_size {size} is not divisible by 2^{levels - 1}: diffusers' Upsample2D doubles the feature map "
            "instead of matching the skip connection's size, so its UNet2DModel cannot run at this size"
        )
    down_res, up_res = level_resolutions(size, levels)
    attn = set(args["attn_resolutions"])
    up_levels = list(reversed(range(levels)))
    widths = {args["base_channels"] * mult[i] for i in range(levels) if down_res[i] in attn}
    widths |= {args["base_channels"] * mult[-1]} if args["mid_attention"] else set()
    if args["head_channels"] is not None:
        head_dim = args["head_channels"]
    elif args["num_heads"] == 1 or not widths:
        head_dim = None  # one head of full width in every layer
    else:
        head_dims = sorted({w // args["num_heads"] for w in widths})
        if len(head_dims) > 1:
            raise DiffusersConversionError(
                f"num_heads={args['num_heads']} gives heads of {head_dims} channels in attention layers of widths "
                f"{sorted(widths)}; diffusers' UNet2DModel has one attention_head_dim for all layers (use "
                "head_channels, or attention at one width)"
            )
        head_dim = head_dims[0]
    updown = bool(args["resblock_updown"])
    scale_shift = bool(args["use_scale_shift_norm"])
    down_plain, up_plain = (
        ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if updown else ("DownBlock2D", "UpBlock2D")
    )
    return {
        "_class_name": "UNet2DModel",
        "_diffusers_version": _diffusers_version(),
        "sample_size": size,
        # A concat-conditioned net's first convolution reads x and y together: diffusers' UNet2DModel of
        # LDMSuperResolutionPipeline (in_channels 6, out_channels 3), whose caller concatenates them the same way.
        "in_channels": net.in_channels + net.cond_channels,
        "out_channels": net.out_channels,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "time_embedding_dim": None,
        "freq_shift": 1,
        "flip_sin_to_cos": False,
        "down_block_types": ["AttnDownBlock2D" if down_res[i] in attn else down_plain for i in range(levels)],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if up_res[i] in attn else up_plain for i in up_levels],
        "block_out_channels": [args["base_channels"] * m for m in mult],
        "layers_per_block": args["num_res_blocks"],
        "mid_block_scale_factor": 1,
        "downsample_padding": 0,
        "downsample_type": "resnet" if updown else "conv",
        "upsample_type": "resnet" if updown else "conv",
        "dropout": args["dropout"],
        "act_fn": "silu",
        "attention_head_dim": head_dim,
        "norm_num_groups": args["norm_groups"],
        # With scale_shift, diffusers' middle attention has a GroupNorm only when this is set (ours always has one).
        "attn_norm_num_groups": args["norm_groups"] if scale_shift else None,
        "norm_eps": NORM_EPS,
        "resnet_time_scale_shift": "scale_shift" if scale_shift else "default",
        "add_attention": bool(args["mid_attention"]),
        "class_embed_type": None,
        "num_class_embeds": None if args["num_classes"] is None else args["num_classes"] + 1,
    }


def _diffusers_version() -> str:
    try:
        import diffusers

        return diffusers.__version__
    except ImportError:  # the files do not need diffusers to be written
        return "0.30.0"


# ---------------------------------------------------------------------------------------------- the key map
@dataclass(frozen=True)
class KeyRule:
    """Our parameter `ours` is diffusers' `theirs` concatenated along dim 0 (one key but for the fused qkv);
    `linear_as_conv`: diffusers' Linear weight (out, in) is our 1x1 conv's (out, in, 1, 1)."""

    ours: str
    theirs: tuple[str, ...]
    linear_as_conv: bool = False

    def their_shape(self, our_shape: torch.Size) -> tuple[int, ...]:
        shape = (our_shape[0] // len(self.theirs), *our_shape[1:])
        return shape[:2] if self.linear_as_conv and len(shape) == 4 else shape


def _module_rules(ours: str, theirs: str, names: list[str]) -> list[KeyRule]:
    return [KeyRule(f"{ours}.{n}", (f"{theirs}.{n}",)) for n in names]


def _res_rules(ours: str, theirs: str, has_skip: bool) -> list[KeyRule]:
    return [
        KeyRule(f"{ours}.{a}.{p}", (f"{theirs}.{b}.{p}",))
        for a, b in _RES_NAMES.items()
        if a != "skip" or has_skip
        for p in ("weight", "bias")
    ]


def _attn_rules(ours: str, theirs: str) -> list[KeyRule]:
    rules = _module_rules(f"{ours}.norm", f"{theirs}.group_norm", ["weight", "bias"])
    for p in ("weight", "bias"):
        rules.append(KeyRule(f"{ours}.qkv.{p}", tuple(f"{theirs}.to_{n}.{p}" for n in "qkv"), linear_as_conv=True))
        rules.append(KeyRule(f"{ours}.proj_out.{p}", (f"{theirs}.to_out.0.{p}",), linear_as_conv=True))
    return rules


def key_rules(net: UNet) -> list[KeyRule]:
    """Every parameter of `net` with its diffusers counterpart(s), walking our module lists in order."""
    wb = ["weight", "bias"]
    rules = _module_rules("conv_in", "conv_in", wb)
    rules += _module_rules("temb.0", "time_embedding.linear_1", wb) + _module_rules(
        "temb.2", "time_embedding.linear_2", wb
    )
    if net.label_emb is not None:
        rules += _module_rules("label_emb", "class_embedding", ["weight"])

    def path(ours: str, theirs: str, modules: torch.nn.ModuleList, resample: type, resample_name: str) -> None:
        level, j = 0, 0
        for k, layers in enumerate(modules):
            if isinstance(layers[0], resample):
                rules.extend(_module_rules(f"{ours}.{k}.0.conv", f"{theirs}.{level}.{resample_name}.0.conv", wb))
                level, j = level + 1, 0
                continue
            if getattr(layers[0], "resample", None) is not None:  # a resampling ResBlock (resblock_updown)
                rules.extend(_res_rules(f"{ours}.{k}.0", f"{theirs}.{level}.{resample_name}.0", False))
                level, j = level + 1, 0
                continue
            has_skip = not isinstance(layers[0].skip, torch.nn.Identity)
            rules.extend(_res_rules(f"{ours}.{k}.0", f"{theirs}.{level}.resnets.{j}", has_skip))
            if len(layers) > 1:
                rules.extend(_attn_rules(f"{ours}.{k}.1", f"{theirs}.{level}.attentions.{j}"))
            j += 1

    # Our lists are flat over levels; diffusers' up_blocks are numbered from the bottom level, as our up list.
    path("down", "down_blocks", net.down, Downsample, "downsamplers")
    rules += _res_rules("mid.0", "mid_block.resnets.0", False)
    if not isinstance(net.mid[1], torch.nn.Identity):
        rules += _attn_rules("mid.1", "mid_block.attentions.0")
    rules += _res_rules("mid.2", "mid_block.resnets.1", False)
    path("up", "up_blocks", net.up, Upsample, "upsamplers")
    rules += _module_rules("norm_out", "conv_norm_out", wb) + _module_rules("conv_out", "conv_out", wb)
    return rules


def rename_deprecated_attention(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """query/key/value/proj_attn (diffusers' old AttentionBlock) -> to_q/to_k/to_v/to_out.0."""
    return {
        _DEPRECATED_ATTENTION.sub(lambda m: f"{m.group(1)}.{_DEPRECATED_NAMES[m.group(2)]}.", k): v
        for k, v in state_dict.items()
    }


def _mismatch_report(missing: list[str], unexpected: list[str], wrong: list[str], limit: int = 20) -> str:
    lines = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            shown = ", ".join(items[:limit]) + (f", ... and {len(items) - limit} more" if len(items) > limit else "")
            lines.append(f"  {title} ({len(items)}): {shown}")
    return "\n".join(lines)


def state_dict_from_diffusers(state_dict: dict[str, Tensor], net: UNet) -> dict[str, Tensor]:
    """`net`'s state dict built from a diffusers UNet2DModel state dict, every shape checked.

    Raises DiffusersConversionError naming every missing, unexpected and wrongly shaped key.
    """
    state_dict = rename_deprecated_attention(state_dict)
    expected = net.state_dict()
    rules = key_rules(net)
    # The map must cover the network exactly: a new layer in UNet without a rule here is a bug of this file.
    assert sorted(r.ours for r in rules) == sorted(expected), "key_rules out of date with UNet"
    out, used = {}, set()
    missing, wrong = [], []
    for rule in rules:
        shape = rule.their_shape(expected[rule.ours].shape)
        parts = []
        for key in rule.theirs:
            if key not in state_dict:
                missing.append(key)
            elif tuple(state_dict[key].shape) != shape:
                wrong.append(f"{key} {tuple(state_dict[key].shape)} (expected {shape})")
            else:
                parts.append(state_dict[key])
            used.add(key)
        if len(parts) == len(rule.theirs):
            out[rule.ours] = torch.cat(parts).reshape(expected[rule.ours].shape)
    unexpected = sorted(set(state_dict) - used)
    if missing or unexpected or wrong:
        raise DiffusersConversionError(
            "the diffusers weights do not match the UNet built from their config:\n"
            + _mismatch_report(missing, unexpected, wrong)
        )
    return out


def state_dict_to_diffusers(net: UNet) -> dict[str, Tensor]:
    """diffusers UNet2DModel parameter names and shapes for `net`'s weights (contiguous copies)."""
    ours = net.state_dict()
    out = {}
    for rule in key_rules(net):
        tensor = ours[rule.ours]
        shape = rule.their_shape(tensor.shape)
        for key, part in zip(rule.theirs, tensor.chunk(len(rule.theirs)), strict=True):
            out[key] = part.reshape(shape).detach().clone().contiguous()
    return out


# ---------------------------------------------------------------------------------------------- files
def _unet_folder(path: str | os.PathLike) -> Path:
    """A UNet folder, or a pipeline folder holding one in `unet/`."""
    path = Path(path)
    if path.is_file() and path.name == CONFIG_NAME:
        return path.parent
    for folder in (path, path / "unet"):
        if (folder / CONFIG_NAME).is_file():
            return folder
    raise FileNotFoundError(f"{path}: no {CONFIG_NAME} here or in {path / 'unet'} (a diffusers UNet2DModel folder)")


def read_diffusers_unet(path: str | os.PathLike) -> tuple[dict, dict[str, Tensor]]:
    """(config dict, state dict) of a diffusers UNet2DModel folder; safetensors preferred over the .bin pickle."""
    folder = _unet_folder(path)
    config = json.loads((folder / CONFIG_NAME).read_text())
    for name in WEIGHTS_NAMES:
        file = folder / name
        if not file.is_file():
            continue
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            return config, load_file(file)
        return config, torch.load(file, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder}: none of {', '.join(WEIGHTS_NAMES)}")


def load_diffusers_unet(path: str | os.PathLike) -> UNet:
    """Our UNet, in eval mode, with the weights of a diffusers `UNet2DModel` folder (config.json +
    diffusion_pytorch_model.safetensors or .bin, here or in `unet/`), e.g. google/ddpm-cifar10-32; raises
    DiffusersConversionError for configurations this UNet cannot represent and for weights that do not match the
    config."""
    config, state_dict = read_diffusers_unet(path)
    net = UNet(**unet_args_from_diffusers(config))
    net.load_state_dict(state_dict_from_diffusers(state_dict, net))
    return net.eval()


def save_diffusers_unet(net: UNet, path: str | os.PathLike) -> Path:
    """Write `net` as a diffusers UNet2DModel folder: config.json + diffusion_pytorch_model.safetensors, which
    `diffusers.UNet2DModel.from_pretrained` loads into the same function."""
    from safetensors.torch import save_file

    config = diffusers_config_from_unet(net)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state_dict_to_diffusers(net), folder / WEIGHTS_NAMES[0], metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return folder


__all__ = [
    "DiffusersConversionError",
    "KeyRule",
    "diffusers_config_from_unet",
    "key_rules",
    "level_resolutions",
    "load_diffusers_unet",
    "read_diffusers_unet",
    "save_diffusers_unet",
    "state_dict_from_diffusers",
    "state_dict_to_diffusers",
    "unet_args_from_diffusers",
]
