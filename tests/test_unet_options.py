"""The UNet's options for 64x64 and 256x256 images (src/models/unet.py): multi-head attention, scale-shift
normalisation, residual up/down-sampling blocks and gradient checkpointing, each against a closed form written out
by hand here; the parameter counts of DDPM's 256x256 and improved DDPM's ImageNet-64 networks against diffusers'
UNet2DModel; and a run through the command line with every option on. The same options against diffusers' own
blocks, output for output, are in tests/test_convert.py."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from src.data import DATASETS
from src.main import cli_main
from src.models.unet import AttnBlock, Downsample, ResBlock, UNet, Upsample, attention_heads

REPO = Path(__file__).resolve().parents[1]
OPTIONS = ("num_heads", "head_channels", "use_scale_shift_norm", "resblock_updown", "gradient_checkpointing")
ALL_ON = dict(num_heads=2, use_scale_shift_norm=True, resblock_updown=True, gradient_checkpointing=True)


pytestmark = pytest.mark.usefixtures("one_thread")


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture
def perturb(perturb):
    """Off the zero initialisations (last convs, attention output), else every block is the identity."""
    return functools.partial(perturb, scale=0.1)


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------------------------- defaults
def test_defaults_build_ddpm_network_and_config_records_only_set_options(small_unet):
    explicit = small_unet(num_heads=1, head_channels=None, use_scale_shift_norm=False, resblock_updown=False,
                          gradient_checkpointing=False)  # fmt: skip
    default = small_unet()
    assert explicit.config == default.config and not set(OPTIONS) & set(default.config)
    assert {k: v.shape for k, v in explicit.state_dict().items()} == {
        k: v.shape for k, v in default.state_dict().items()
    }
    assert all(a.num_heads == 1 for a in default.modules() if isinstance(a, AttnBlock))
    assert any(isinstance(m, Downsample) for m in default.modules())

    # Set options are recorded, and the recorded config alone rebuilds the same network (checkpoints, export).
    net = small_unet(head_channels=8, **ALL_ON)
    assert {k: net.config[k] for k in OPTIONS} == dict(ALL_ON, head_channels=8)
    rebuilt = UNet(**json.loads(json.dumps(net.config)))
    assert rebuilt.config == net.config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}


# ---------------------------------------------------------------------------------------------- multi-head attention
def attention_by_hand(block: AttnBlock, x: torch.Tensor, heads: int) -> torch.Tensor:
    """GroupNorm, q/k/v as 1x1 convs, then per head h (channels h*d .. (h+1)*d - 1): softmax(q^T k / sqrt(d)) over
    the H*W positions applied to v, the heads concatenated, the output projection, the residual."""
    b, c, hh, ww = x.shape
    d = c // heads
    n = F.group_norm(x, block.norm.num_groups, block.norm.weight, block.norm.bias, block.norm.eps)
    qkv = torch.einsum("oc,bcp->bop", block.qkv.weight[:, :, 0, 0], n.reshape(b, c, -1)) + block.qkv.bias[:, None]
    q, k, v = qkv[:, :c], qkv[:, c : 2 * c], qkv[:, 2 * c :]
    outs = []
    for h in range(heads):
        qh, kh, vh = (z[:, h * d : (h + 1) * d] for z in (q, k, v))  # (B, d, HW)
        logits = torch.einsum("bdi,bdj->bij", qh, kh) / math.sqrt(d)
        weights = torch.exp(logits - logits.amax(-1, keepdim=True))
        weights = weights / weights.sum(-1, keepdim=True)
        outs.append(torch.einsum("bij,bdj->bdi", weights, vh))
    out = torch.cat(outs, dim=1)
    proj = torch.einsum("oc,bcp->bop", block.proj_out.weight[:, :, 0, 0], out) + block.proj_out.bias[:, None]
    return x + proj.reshape(b, c, hh, ww)


@pytest.mark.parametrize("heads", [1, 2, 4, 16])
def test_multi_head_attention_equals_hand_computed_heads(heads, perturb):
    block = perturb(AttnBlock(16, norm_groups=4, num_heads=heads).double())
    x = randn(2, 16, 5, 3)  # non-square, 15 positions
    with torch.no_grad():
        torch.testing.assert_close(block(x), attention_by_hand(block, x, heads), rtol=0, atol=1e-12)
        if heads > 1:  # the heads matter: the same weights read as one head give another function
            assert (block(x) - attention_by_hand(block, x, 1)).abs().max() > 1e-3


def test_heads_from_num_heads_or_head_channels(small_unet):
    assert attention_heads(64, num_heads=4) == 4
    assert attention_heads(64, num_heads=4, head_channels=16) == 4  # head_channels overrides num_heads
    assert attention_heads(96, num_heads=4, head_channels=32) == 3
    net = small_unet(channel_mult=(1, 2), attn_resolutions=(28, 14), head_channels=8)  # widths 16 and 32
    assert {(a.norm.num_channels, a.num_heads) for a in net.modules() if isinstance(a, AttnBlock)} == {(16, 2), (32, 4)}
    net = small_unet(channel_mult=(1, 2), attn_resolutions=(28, 14), num_heads=4)
    assert {a.num_heads for a in net.modules() if isinstance(a, AttnBlock)} == {4}
    with pytest.raises(ValueError, match="num_heads=3 does not divide the attention width 32"):
        small_unet(num_heads=3)
    with pytest.raises(ValueError, match="head_channels=12 does not divide the attention width 32"):
        small_unet(head_channels=12)


# ---------------------------------------------------------------------------------------------- residual blocks
def resblock_by_hand(block: ResBlock, x: torch.Tensor, temb: torch.Tensor, resample=lambda z: z) -> torch.Tensor:
    """DDPM's block (the embedding added before the second GroupNorm) or improved DDPM's scale-shift block,
    GN(h) * (1 + scale) + shift with (scale, shift) = Linear(SiLU(temb)), with `resample` applied to the input and
    to the hidden state after the first GroupNorm -> SiLU (BigGAN / ADM up and down blocks)."""

    def gn(z, norm):
        return F.group_norm(z, norm.num_groups, norm.weight, norm.bias, norm.eps)

    h = resample(F.silu(gn(x, block.norm1)))
    x = resample(x)
    h = F.conv2d(h, block.conv1.weight, block.conv1.bias, padding=1)
    emb = (F.silu(temb) @ block.temb_proj.weight.T + block.temb_proj.bias)[:, :, None, None]
    if block.use_scale_shift_norm:
        c = h.shape[1]
        h = gn(h, block.norm2) * (1 + emb[:, :c]) + emb[:, c:]
    else:
        h = gn(h + emb, block.norm2)
    h = F.conv2d(F.silu(h), block.conv2.weight, block.conv2.bias, padding=1)
    skip = x if isinstance(block.skip, torch.nn.Identity) else F.conv2d(x, block.skip.weight, block.skip.bias)
    return skip + h


def average_2x2(z: torch.Tensor) -> torch.Tensor:
    """Mean of each 2x2 window, a window cut by an odd edge averaging what is left of it."""
    rows, cols = (z.shape[-2] + 1) // 2, (z.shape[-1] + 1) // 2
    out = torch.empty(*z.shape[:-2], rows, cols, dtype=z.dtype)
    for i in range(rows):
        for j in range(cols):
            out[..., i, j] = z[..., 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean(dim=(-2, -1))
    return out


def nearest_x2(z: torch.Tensor) -> torch.Tensor:
    return z.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)


@pytest.mark.parametrize("scale_shift", [False, True])
@pytest.mark.parametrize(
    ("resample", "cin", "cout", "shape", "by_hand"),
    [
        (None, 8, 16, (6, 6), lambda z: z),
        ("down", 8, 8, (6, 6), average_2x2),
        ("down", 8, 8, (7, 5), average_2x2),  # odd sizes halve rounding up, as the strided-conv Downsample
        ("up", 8, 8, (3, 4), nearest_x2),
    ],
)
def test_resblock_equals_hand_computed(scale_shift, resample, cin, cout, shape, by_hand, perturb):
    block = ResBlock(cin, cout, temb_channels=12, dropout=0.0, norm_groups=4, use_scale_shift_norm=scale_shift,
                     resample=resample)  # fmt: skip
    assert block.temb_proj.out_features == (2 if scale_shift else 1) * cout
    block = perturb(block.double())
    x, temb = randn(2, cin, *shape, seed=1), randn(2, 12, seed=2)
    with torch.no_grad():
        out = block(x, temb)
        assert out.shape[-2:] == by_hand(x).shape[-2:]
        torch.testing.assert_close(out, resblock_by_hand(block, x, temb, by_hand), rtol=0, atol=1e-12)


def test_up_block_takes_the_skip_size(perturb):
    """An up block resamples to the size it is given (the skip connection's), so odd sizes round-trip: 4 -> 7."""
    block = perturb(ResBlock(8, 8, 12, 0.0, 4, resample="up").double())
    x, temb = randn(1, 8, 4, 4), randn(1, 12)
    rows = torch.div(torch.arange(7) * 4, 7, rounding_mode="floor")  # nearest: source index floor(i * 4 / 7)
    with torch.no_grad():
        expected = resblock_by_hand(block, x, temb, lambda z: z[..., rows, :][..., rows])
        torch.testing.assert_close(block(x, temb, size=(7, 7)), expected, rtol=0, atol=1e-12)


def test_resblock_updown_unet_replaces_every_resampler(small_unet, perturb):
    net = perturb(small_unet(channel_mult=(1, 2, 2, 2), attn_resolutions=(7,), resblock_updown=True)).eval()
    kinds = [m.resample for m in net.modules() if isinstance(m, ResBlock) and m.resample]
    assert kinds == ["down"] * 3 + ["up"] * 3
    assert not any(isinstance(m, (Downsample, Upsample)) for m in net.modules())
    x = randn(2, 1, 28, 28, dtype=torch.float32)  # 28 -> 14 -> 7 -> 4 -> 7 -> 14 -> 28
    with torch.no_grad():
        out = net(x, torch.tensor([3, 900]))
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().max() > 0


# ---------------------------------------------------------------------------------------------- checkpointing
def test_gradient_checkpointing_same_outputs_and_gradients(small_unet, perturb):
    """Training with dropout: the checkpointed net recomputes every residual and attention block in the backward
    pass (twice the block calls) with the dropout masks of the first pass, and gives the same outputs and
    gradients; in eval mode it runs each block once. Measured on CPU: outputs and gradients bit-identical (the
    tolerance allows for a backward that sums shared gradients, e.g. the time embedding's, in another order)."""
    options = dict(num_heads=2, use_scale_shift_norm=True, resblock_updown=True, dropout=0.3, num_classes=3)
    # Pre-hooks count the calls: the recomputation stops as soon as it has what the backward needs, before the
    # block returns, so forward hooks would not see it.
    plain = perturb(small_unet(**options))
    ckpt = small_unet(**options, gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    calls = {"plain": 0, "ckpt": 0}
    for name, net in (("plain", plain), ("ckpt", ckpt)):
        for m in net.modules():
            if isinstance(m, (ResBlock, AttnBlock)):
                m.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    x, t, y = randn(3, 1, 28, 28, dtype=torch.float32), torch.tensor([0, 400, 999]), torch.tensor([0, 3, 2])
    outputs = {}
    for name, net in (("plain", plain), ("ckpt", ckpt)):
        torch.manual_seed(123)  # the same dropout masks
        out = net.train()(x, t, y)
        out.pow(2).mean().backward()
        outputs[name] = out.detach()
    assert torch.equal(outputs["plain"], outputs["ckpt"])
    blocks = sum(isinstance(m, (ResBlock, AttnBlock)) for m in plain.modules())
    assert calls == {"plain": blocks, "ckpt": 2 * blocks}
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-6, msg=name)
    # Dropout is on in training: a different seed changes the output (the masks above were really replayed).
    torch.manual_seed(124)
    assert not torch.equal(ckpt(x, t, y).detach(), outputs["ckpt"])

    calls["ckpt"] = 0
    with torch.no_grad():
        ckpt.eval()(x, t, y)
    ckpt(x, t, y).sum()  # eval mode with grad: no recomputation either
    assert calls["ckpt"] == 2 * blocks


# ---------------------------------------------------------------------------------------------- parameter counts
DDPM_256_PARAMETERS = 113_673_219  # DDPM CelebA-HQ / LSUN 256x256: "114M" in Ho et al. 2020, section 4
IMPROVED_DDPM_64_PARAMETERS = 121_063_942  # improved DDPM ImageNet-64 (learned sigmas); openai/improved-diffusion
ADM_UPDOWN_64_PARAMETERS = 129_384_070  # the same widths with ADM's residual up/down blocks


def test_ddpm_256_parameter_count_matches_diffusers_celebahq_256():
    diffusers = pytest.importorskip("diffusers")
    ours = UNet(in_channels=3, base_channels=128, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                attn_resolutions=(16,), dropout=0.0, image_size=256)  # fmt: skip
    # google/ddpm-celebahq-256's config (also ddpm-lsun-church/bedroom/cat-256), built locally.
    ref = diffusers.UNet2DModel(
        sample_size=256, in_channels=3, out_channels=3, block_out_channels=(128, 128, 256, 256, 512, 512),
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4, layers_per_block=2,
        attention_head_dim=None, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
    )  # fmt: skip
    assert count(ours) == count(ref) == DDPM_256_PARAMETERS


@pytest.mark.parametrize(
    ("resblock_updown", "expected"), [(False, IMPROVED_DDPM_64_PARAMETERS), (True, ADM_UPDOWN_64_PARAMETERS)]
)
def test_imagenet64_parameter_count_matches_diffusers(resblock_updown, expected):
    """Improved DDPM's ImageNet-64 widths (128 channels, mult (1, 2, 3, 4), 3 blocks, attention at 16 and 8, 4 heads,
    scale-shift, learned sigmas: 6 output channels). Heads do not change the count, so diffusers' model with one
    attention_head_dim stands for num_heads=4."""
    diffusers = pytest.importorskip("diffusers")
    ours = UNet(in_channels=3, base_channels=128, channel_mult=(1, 2, 3, 4), num_res_blocks=3, attn_resolutions=(16, 8),
                dropout=0.0, image_size=64, out_channels=6, num_heads=4, use_scale_shift_norm=True,
                resblock_updown=resblock_updown)  # fmt: skip
    down, up = ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if resblock_updown else ("DownBlock2D", "UpBlock2D")
    ref = diffusers.UNet2DModel(
        sample_size=64, in_channels=3, out_channels=6, block_out_channels=(128, 256, 384, 512), layers_per_block=3,
        down_block_types=(down, down, "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", up, up), attention_head_dim=64,
        resnet_time_scale_shift="scale_shift", attn_norm_num_groups=32,
        downsample_type="resnet" if resblock_updown else "conv", upsample_type="resnet" if resblock_updown else "conv",
        norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
    )  # fmt: skip
    assert count(ours) == count(ref) == expected


# ---------------------------------------------------------------------------------------------- command line
@pytest.mark.slow
@pytest.mark.skipif(
    not any(Path(d).is_dir() for d in DATASETS["fashion_mnist"].system_dirs), reason="Fashion-MNIST not installed"
)
def test_fit_and_predict_with_every_option_on(tmp_path: Path) -> None:
    """The options are init_args of the net in the config; the checkpoint records them, so predict rebuilds the
    same network from the checkpoint alone."""
    tiny = ["--config", str(REPO / "configs" / "fashion_mnist.yaml"), "--model.net.init_args.base_channels", "8",
            "--model.net.init_args.norm_groups", "4", "--model.net.init_args.attn_resolutions", "[7]",
            "--model.sampling.steps", "2", "--logger_backend", "csv", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false"]  # fmt: skip
    options = ["--model.net.init_args.num_heads", "2", "--model.net.init_args.use_scale_shift_norm", "true",
               "--model.net.init_args.resblock_updown", "true", "--model.net.init_args.gradient_checkpointing", "true"]  # fmt: skip
    callbacks = json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                             "init_args": {"save_last": True, "save_top_k": 0}}])  # fmt: skip
    cli_main(["fit", *tiny, *options, "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.max_steps",
              "2", "--trainer.limit_val_batches", "0", "--data.batch_size", "8", "--trainer.callbacks", callbacks])  # fmt: skip
    (ckpt,) = (tmp_path / "runs").glob("*/version_*/checkpoints/last.ckpt")
    init_args = torch.load(ckpt, map_location="cpu", weights_only=False)["hyper_parameters"]["net"]["init_args"]
    assert {k: init_args[k] for k in OPTIONS if k in init_args} == ALL_ON

    cli_main(["predict", *tiny, "--ckpt_path", str(ckpt), "--trainer.default_root_dir", str(tmp_path / "runs"),
              "--data.num_samples", "2", "--output_dir", str(tmp_path / "pngs")])  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "pngs").iterdir()) == ["0.png", "1.png"]
