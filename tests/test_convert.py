"""diffusers interoperability (src/models/convert.py, UNet.from_diffusers / to_diffusers, NoiseSchedule.from_diffusers):
randomly initialised diffusers models, perturbed away from their zero inits and saved with `save_pretrained`, compute
the same function after conversion, in both directions; unsupported configs and mismatched weights fail clearly."""

import json

import pytest
import torch

from src.diffusion.schedule import NoiseSchedule
from src.models.convert import (
    DiffusersConversionError,
    read_diffusers_unet,
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


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    net = UNet.from_diffusers(tmp_path / "diffusers")
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

    net.to_diffusers(tmp_path / "ours")
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
    net = UNet.from_diffusers(folder)
    assert net.config["attn_resolutions"] == [7] and net.config["channel_mult"] == [1, 2, 2]
    x, t = inputs(ref)
    assert max_error(ref, net, x, t) < 1e-5
    net.to_diffusers(tmp_path / "ours")
    assert max_error(diffusers.UNet2DModel.from_pretrained(tmp_path / "ours").eval(), net, x, t) < 1e-5


def test_class_conditional(tmp_path):
    """num_class_embeds = N becomes num_classes = N - 1 (our table's last row is the null label)."""
    ref = perturbed_diffusers(dict(SMALL_28, num_class_embeds=11))
    ref.save_pretrained(tmp_path)
    net = UNet.from_diffusers(tmp_path)
    assert net.num_classes == 10
    x, t = inputs(ref)
    y = torch.tensor([3, 10])
    assert max_error(ref, net, x, t, y) < 1e-5


def test_to_diffusers_refuses_sizes_diffusers_cannot_run(tmp_path):
    net = UNet(
        in_channels=1, base_channels=8, channel_mult=(1, 2, 2, 2), num_res_blocks=1, image_size=28, norm_groups=4
    )
    with pytest.raises(DiffusersConversionError, match="not divisible by 2"):
        net.to_diffusers(tmp_path)


# ---------------------------------------------------------------------------------------------- refusals
def test_unsupported_config_lists_every_reason():
    config = dict(
        DDPM_CIFAR10,
        flip_sin_to_cos=True,
        freq_shift=0,
        resnet_time_scale_shift="scale_shift",
        attention_head_dim=8,
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
        "attention_head_dim=8 gives [32] heads",
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
