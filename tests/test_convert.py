"""diffusers interoperability (load_diffusers_unet, save_diffusers_unet, NoiseSchedule.from_diffusers):
randomly initialised diffusers models, perturbed away from their zero inits and saved with `save_pretrained`, compute
the same function after conversion, in both directions; unsupported configs and mismatched weights fail clearly."""

import json

import pytest
import torch

from src.diffusion.schedule import NoiseSchedule
from src.models.convert import (
    DiffusersConversionError,
    load_diffusers_unet,
    read_diffusers_unet,
    save_diffusers_unet,
    state_dict_from_diffusers,
    unet_args_from_diffusers,
)
from src.models.unet import UNet

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

# google/ddpm-cifar10-32's config.json (diffusers 0.0.4 conversion of the DDPM TensorFlow checkpoint).
DDPM_CIFAR10 = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    norm_eps=1e-6,
    norm_num_groups=32,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    attention_head_dim=None,
    center_input_sample=False,
    mid_block_scale_factor=1,
    time_embedding_type="positional",
    act_fn="silu",
)
# A small 1-channel 28x28 model: 28 -> 14 -> 7 and back, attention at 7x7 (the bottom level).
SMALL_28 = dict(
    DDPM_CIFAR10,
    sample_size=28,
    in_channels=1,
    out_channels=1,
    block_out_channels=(16, 32, 32),
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    norm_num_groups=4,
)


pytestmark = pytest.mark.usefixtures("one_thread")


@torch.no_grad()
def perturbed_diffusers(config, seed=0, scale=0.02):
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    for p in model.parameters():  # off the zero inits (conv_out, ...), else every output is 0
        p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def inputs(model, batch=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    c, s = model.config.in_channels, model.config.sample_size
    return torch.randn(batch, c, s, s, generator=g), torch.tensor([0, 977][:batch])


@torch.no_grad()
def max_error(ref, ours, x, t, y=None):
    a = ref(x, t, class_labels=y).sample
    b = ours(x, t) if y is None else ours(x, t, y)
    assert a.abs().max() > 0.1  # a meaningful comparison, not of two near-zero outputs
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------- UNet both ways
def test_ddpm_cifar10_from_and_to_diffusers(tmp_path):
    """The 35.7M DDPM CIFAR-10 UNet: diffusers -> ours -> diffusers, same outputs. Measured max abs error 3.7e-6 (on
    outputs of magnitude ~2, float32)."""
    ref = perturbed_diffusers(DDPM_CIFAR10)
    ref.save_pretrained(tmp_path / "diffusers", safe_serialization=True)
    net = load_diffusers_unet(tmp_path / "diffusers")
    assert net.config == dict(
        in_channels=3,
        base_channels=128,
        channel_mult=[1, 2, 2, 2],
        num_res_blocks=2,
        attn_resolutions=[16],
        dropout=0.0,
        image_size=32,
        num_classes=None,
        out_channels=3,
        norm_groups=32,
        mid_attention=True,
    )
    x, t = inputs(ref)
    assert max_error(ref, net, x, t) < 1e-5

    save_diffusers_unet(net, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert {k: config[k] for k in DDPM_CIFAR10} == {
        k: list(v) if isinstance(v, tuple) else v for k, v in DDPM_CIFAR10.items()
    }
    back = diffusers.UNet2DModel.from_pretrained(tmp_path / "ours").eval()
    assert max_error(back, net, x, t) < 1e-5
    # Bit-identical weights after the round trip.
    for key, value in ref.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key


def test_small_28x28_and_deprecated_attention_names(tmp_path):
    """Odd bottom size 7 (7 -> 14 -> 28): diffusers' Upsample2D doubles, ours matches the skip's size; they agree
    here. The weights are saved as a .bin with the old AttentionBlock names (query/key/value/proj_attn), as the
    published google/ddpm-* files have them."""
    ref = perturbed_diffusers(SMALL_28)
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(ref.config)))
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, value in ref.state_dict().items():
        for new, old in old_names.items():
            key = key.replace(f".{new}.", f".{old}.")
        state[key] = value
    assert any(".query." in k for k in state)
    torch.save(state, folder / "diffusion_pytorch_model.bin")
    net = load_diffusers_unet(folder)
    assert net.config["attn_resolutions"] == [7] and net.config["channel_mult"] == [1, 2, 2]
    x, t = inputs(ref)
    assert max_error(ref, net, x, t) < 1e-5
    save_diffusers_unet(net, tmp_path / "ours")
    assert max_error(diffusers.UNet2DModel.from_pretrained(tmp_path / "ours").eval(), net, x, t) < 1e-5


def test_class_conditional(tmp_path):
    """num_class_embeds = N becomes num_classes = N - 1 (our table's last row is the null label)."""
    ref = perturbed_diffusers(dict(SMALL_28, num_class_embeds=11))
    ref.save_pretrained(tmp_path)
    net = load_diffusers_unet(tmp_path)
    assert net.num_classes == 10
    x, t = inputs(ref)
    y = torch.tensor([3, 10])
    assert max_error(ref, net, x, t, y) < 1e-5


def test_to_diffusers_refuses_sizes_diffusers_cannot_run(tmp_path):
    net = UNet(
        in_channels=1, base_channels=8, channel_mult=(1, 2, 2, 2), num_res_blocks=1, image_size=28, norm_groups=4
    )
    with pytest.raises(DiffusersConversionError, match="not divisible by 2"):
        save_diffusers_unet(net, tmp_path)


# ---------------------------------------------------------------------------------------------- refusals
def test_unsupported_config_lists_every_reason():
    config = dict(
        DDPM_CIFAR10,
        flip_sin_to_cos=True,
        freq_shift=0,
        resnet_time_scale_shift="scale_shift",
        attention_head_dim=48,  # 256 is not a whole number of 48-channel heads
        class_embed_type="timestep",
        norm_eps=1e-5,
        downsample_padding=1,
    )
    with pytest.raises(DiffusersConversionError) as info:
        unet_args_from_diffusers(config)
    message = str(info.value)
    for key in (
        "flip_sin_to_cos",
        "freq_shift",
        "resnet_time_scale_shift",
        "attention_head_dim=48 does not divide the attention widths [256]",
        "class_embed_type",
        "norm_eps",
        "downsample_padding",
    ):
        assert key in message


def test_attention_head_dim_equal_to_width_is_single_head():
    args = unet_args_from_diffusers(dict(SMALL_28, attention_head_dim=32))
    assert args["attn_resolutions"] == [7]


def test_attention_placed_differently_up_and_down_is_refused():
    config = dict(SMALL_28, up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    with pytest.raises(DiffusersConversionError, match="same levels on both paths"):
        unet_args_from_diffusers(config)


def test_mismatched_weights_list_the_differing_keys(tmp_path):
    ref = perturbed_diffusers(SMALL_28)
    ref.save_pretrained(tmp_path)
    config, state = read_diffusers_unet(tmp_path)
    net = UNet(**unet_args_from_diffusers(config))
    del state["mid_block.attentions.0.to_k.weight"]
    state["conv_in.weight"] = torch.zeros(16, 1, 5, 5)
    state["extra.bias"] = torch.zeros(3)
    with pytest.raises(DiffusersConversionError) as info:
        state_dict_from_diffusers(state, net)
    message = str(info.value)
    assert "missing (1): mid_block.attentions.0.to_k.weight" in message
    assert "unexpected (1): extra.bias" in message
    assert "wrong shape (1): conv_in.weight (16, 1, 5, 5) (expected (16, 1, 3, 3))" in message


# ---------------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(beta_schedule="linear"),
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        dict(beta_schedule="squaredcos_cap_v2"),
        dict(trained_betas=torch.linspace(1e-3, 0.05, 500).tolist(), num_train_timesteps=500),
        dict(beta_schedule="linear", num_train_timesteps=4000, beta_start=2e-5, beta_end=0.01),
    ],
)
def test_scheduler_config_to_noise_schedule(tmp_path, kwargs):
    sched = diffusers.DDPMScheduler(**kwargs)
    sched.save_config(tmp_path)  # writes scheduler_config.json
    schedule = NoiseSchedule.from_diffusers(tmp_path)
    assert schedule.num_timesteps == sched.config.num_train_timesteps
    # diffusers keeps float32; ours is float64, so they agree to float32 precision.
    torch.testing.assert_close(schedule.betas, sched.betas.double(), rtol=2e-6, atol=1e-9)
    torch.testing.assert_close(schedule.alphas_cumprod, sched.alphas_cumprod.double(), rtol=2e-5, atol=1e-7)
    assert NoiseSchedule.from_diffusers(dict(sched.config)).betas.equal(schedule.betas)  # a dict works too


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(beta_schedule="sigmoid"), "beta_schedule='sigmoid'"),
        (dict(prediction_type="v_prediction"), "eps-predictor"),
        (dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr"),
    ],
)
def test_unsupported_scheduler_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule.from_diffusers(dict(diffusers.DDPMScheduler(**kwargs).config))


# ---------------------------------------------------------------------------------------------- large-image options
# A 32x32 model with attention at two widths (16x16: 32 channels, 8x8 and the middle: 64), so that head counts differ
# between layers; 32 -> 16 -> 8 halves exactly, as diffusers' resampling needs.
OPTIONS_32 = dict(
    DDPM_CIFAR10,
    block_out_channels=(16, 32, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    norm_num_groups=4,
)
RESNET_UPDOWN = dict(
    down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"),
    downsample_type="resnet",
    upsample_type="resnet",
)
SCALE_SHIFT = dict(resnet_time_scale_shift="scale_shift", attn_norm_num_groups=4)


@pytest.mark.parametrize(
    ("changes", "options"),
    [
        (dict(attention_head_dim=8), dict(head_channels=8)),  # 4 heads at 16x16, 8 at 8x8 and in the middle
        (SCALE_SHIFT, dict(use_scale_shift_norm=True)),
        (RESNET_UPDOWN, dict(resblock_updown=True)),
        (
            dict(attention_head_dim=16, **SCALE_SHIFT, **RESNET_UPDOWN),
            dict(head_channels=16, use_scale_shift_norm=True, resblock_updown=True),
        ),
    ],
    ids=["heads", "scale_shift", "resblock_updown", "all"],
)
def test_large_image_options_from_and_to_diffusers(tmp_path, changes, options):
    """Each option against diffusers' own implementation (Attention with attention_head_dim, ResnetBlock2D with
    time_embedding_norm="scale_shift" and with down/up=True): same outputs both ways, the same weights back."""
    ref = perturbed_diffusers(dict(OPTIONS_32, **changes))
    ref.save_pretrained(tmp_path / "diffusers")
    net = load_diffusers_unet(tmp_path / "diffusers")
    assert {k: v for k, v in net.config.items() if k in options} == options
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in ref.parameters())
    x, t = inputs(ref)
    assert max_error(ref, net, x, t) < 1e-5

    save_diffusers_unet(net, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    for key, value in changes.items():
        assert written[key] == (list(value) if isinstance(value, tuple) else value), key
    back = diffusers.UNet2DModel.from_pretrained(tmp_path / "ours").eval()
    assert max_error(back, net, x, t) < 1e-5
    for key, value in ref.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key


def test_num_heads_to_diffusers(tmp_path):
    """num_heads=2 with every attention layer 64 wide is diffusers' attention_head_dim=32; with layers of two widths
    the head widths differ, which diffusers' single attention_head_dim cannot express: refused, pointing to
    head_channels."""
    torch.manual_seed(0)
    small = dict(in_channels=3, base_channels=16, channel_mult=(1, 2, 4), num_res_blocks=1, dropout=0.0,
                 image_size=16, norm_groups=4)  # fmt: skip
    net = UNet(**small, attn_resolutions=(4,), num_heads=2)  # attention at 4x4 (64 channels) and in the middle (64)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_diffusers_unet(net, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["attention_head_dim"] == 32
    ref = diffusers.UNet2DModel.from_pretrained(tmp_path).eval()
    assert ref.mid_block.attentions[0].heads == 2
    x, t = inputs(ref)
    assert max_error(ref, net.eval(), x, t) < 1e-5

    mixed = UNet(**small, attn_resolutions=(8,), num_heads=2)  # 32 channels at 8x8, 64 in the middle
    with pytest.raises(DiffusersConversionError, match=r"heads of \[16, 32\] channels.*use head_channels"):
        save_diffusers_unet(mixed, tmp_path / "mixed")


def test_large_image_option_refusals():
    """Scale-shift without attn_norm_num_groups (diffusers' middle attention then has no GroupNorm) and a mix of conv
    and residual resampling have no equivalent."""
    with pytest.raises(DiffusersConversionError, match="attn_norm_num_groups=None"):
        unet_args_from_diffusers(dict(OPTIONS_32, resnet_time_scale_shift="scale_shift"))
    assert unet_args_from_diffusers(dict(OPTIONS_32, resnet_time_scale_shift="scale_shift", add_attention=False))
    mixed = dict(OPTIONS_32, **{**RESNET_UPDOWN, "upsample_type": "conv"})  # residual down, conv up in the Attn blocks
    with pytest.raises(DiffusersConversionError, match="mix conv and residual-block resampling"):
        unet_args_from_diffusers(mixed)
    # Residual downsampling needs no downsample_padding; the conv one keeps requiring TensorFlow's SAME.
    assert unet_args_from_diffusers(dict(OPTIONS_32, **RESNET_UPDOWN, downsample_padding=1))["resblock_updown"]
    with pytest.raises(DiffusersConversionError, match="downsample_padding=1"):
        unet_args_from_diffusers(dict(OPTIONS_32, downsample_padding=1))


def test_concat_conditioning_from_and_to_diffusers(tmp_path):
    """More inputs than outputs (LDMSuperResolutionPipeline's UNet2DModel, 6 in and 3 out): our conditioning
    'concat' with the extra inputs as cond_channels, both ways; diffusers is fed [x, y] as that pipeline does."""
    ref = perturbed_diffusers(dict(SMALL_28, in_channels=2, out_channels=1))
    ref.save_pretrained(tmp_path / "diffusers")
    net = load_diffusers_unet(tmp_path / "diffusers")
    assert (net.in_channels, net.cond_channels, net.config["conditioning"]) == (1, 1, "concat")
    g = torch.Generator().manual_seed(4)
    x, y, t = torch.randn(2, 1, 28, 28, generator=g), torch.randn(2, 1, 28, 28, generator=g), torch.tensor([0, 977])
    with torch.no_grad():
        assert (ref(torch.cat([x, y], 1), t).sample - net(x, t, y)).abs().max() < 1e-5
        save_diffusers_unet(net, tmp_path / "ours")
        back = diffusers.UNet2DModel.from_pretrained(tmp_path / "ours").eval()
        assert back.config.in_channels == 2 and back.config.out_channels == 1
        assert (back(torch.cat([x, y], 1), t).sample - net(x, t, y)).abs().max() < 1e-5
