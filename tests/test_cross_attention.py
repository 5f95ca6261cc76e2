"""Cross-attention conditioning (src/models/unet.py, `conditioning="cross_attention"`; LDM, Rombach et al. 2022
section 3.3): the SpatialTransformer against diffusers' Transformer2DModel with the same weights, the labels
entering only through the attention layers, the null label's learned context, options recorded and rebuilt, and a
class-conditional latent model trained and sampled with guidance through the command line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_cli import _fit, _predict, needs_fashion_mnist
from test_latent_diffusion import autoencoder_file, latent_options  # noqa: F401 (a fixture)

from src.models.convert import DiffusersConversionError, diffusers_config_from_unet
from src.models.unet import SpatialTransformer, UNet

CROSS = dict(in_channels=1, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
             dropout=0.0, image_size=8, norm_groups=4, num_classes=3, conditioning="cross_attention")  # fmt: skip


def randomise_zero_layers(module: torch.nn.Module, seed: int = 0) -> None:
    """The zero-initialised output convolutions get random weights, so that every path carries a signal."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "proj_out" in name or "conv_out" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def test_the_spatial_transformer_equals_diffusers_transformer2d() -> None:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    theirs = diffusers.Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16,
                                          norm_num_groups=4, cross_attention_dim=24, num_layers=2).eval()  # fmt: skip
    ours = SpatialTransformer(16, norm_groups=4, num_heads=2, context_dim=24, depth=2).eval()
    ours.load_state_dict(theirs.state_dict())  # strict: the same names and shapes, key for key
    randomise_zero_layers(ours)
    theirs.load_state_dict(ours.state_dict())
    x, context = torch.randn(3, 16, 5, 5), torch.randn(3, 2, 24)
    with torch.no_grad():
        expected = theirs(x, encoder_hidden_states=context).sample
        assert torch.allclose(ours(x, context), expected, atol=1e-5)


def test_labels_enter_only_through_the_cross_attention() -> None:
    torch.manual_seed(0)
    net = UNet(**CROSS).eval()
    randomise_zero_layers(net)
    assert sum(isinstance(m, SpatialTransformer) for m in net.modules()) == 4  # 1 down + 2 up at 4x4, + middle
    assert net.label_emb.weight.shape == (4, 64)  # 3 classes + the null label, context_dim = 4 * base_channels
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([10, 200, 500, 900])
    with torch.no_grad():
        outputs = [net(x, t, torch.full((4,), label)) for label in range(4)]
        for other in outputs[1:]:
            assert not torch.allclose(outputs[0], other, atol=1e-4)
        # The time embedding holds no label: with the cross-attention's output projections at zero, y changes nothing.
        for name, parameter in net.named_parameters():
            if "attn2.to_out" in name:
                parameter.zero_()
        assert torch.equal(net(x, t, torch.zeros(4, dtype=torch.long)), net(x, t, torch.full((4,), 3)))
    with pytest.raises(ValueError, match="pass labels y"):
        net(x, t)


def test_cross_attention_options_are_recorded_checked_and_rebuilt() -> None:
    torch.manual_seed(0)
    net = UNet(**CROSS, context_dim=32, transformer_depth=2)
    assert net.config["conditioning"] == "cross_attention" and net.config["context_dim"] == 32
    assert "conditioning" not in UNet(**{**CROSS, "conditioning": "embedding"}).config  # the default stays unrecorded
    rebuilt = UNet(**net.config)
    rebuilt.load_state_dict(net.state_dict())  # strict: the same layers
    with pytest.raises(ValueError, match="needs labels"):
        UNet(**{**CROSS, "num_classes": None})
    with pytest.raises(ValueError, match="has none"):
        UNet(**{**CROSS, "attn_resolutions": (), "mid_attention": False})
    with pytest.raises(ValueError, match="unknown"):
        UNet(**{**CROSS, "conditioning": "gated"})
    with pytest.raises(DiffusersConversionError, match="cross-attention"):
        diffusers_config_from_unet(net)


def test_gradient_checkpointing_gives_the_same_gradients_with_cross_attention() -> None:
    torch.manual_seed(0)
    plain = UNet(**CROSS)
    randomise_zero_layers(plain)
    checkpointed = UNet(**CROSS, gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 2])
    grads = []
    for net in (plain, checkpointed):
        net.zero_grad()
        net(x, t, y).square().sum().backward()
        grads.append(net.label_emb.weight.grad.clone())
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.slow
@needs_fashion_mnist
def test_a_cross_attention_latent_model_trains_and_samples_with_guidance(
    tmp_path: Path,
    autoencoder_file: Path,  # noqa: F811
) -> None:
    options = [*latent_options(autoencoder_file), "--model.net.init_args.num_classes", "10",
               "--model.net.init_args.conditioning", "cross_attention", "--model.net.init_args.context_dim", "32",
               "--model.guidance.scale", "2.0", "--data.cache_dir", str(tmp_path / "cache")]  # fmt: skip
    ckpt = _fit(tmp_path / "runs", 3, *options)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert state["net.label_emb.weight"].shape == (11, 32)
    assert any("attn2.to_k" in key for key in state)
    _predict(ckpt, tmp_path / "r", tmp_path / "pngs", *options)
    names = sorted(p.name for p in (tmp_path / "pngs").glob("*.png"))
    assert len(names) == 5 and all("_" in name for name in names)  # <label>_<index>.png: conditional samples
