"""The first-stage autoencoders (src/models/autoencoder.py) against diffusers' AutoencoderKL and VQModel: the same
posterior, the same network function both ways through the key map, and the VQ layer's gradient, loss and usage."""

from __future__ import annotations

import pytest
import torch

from src.models.autoencoder import (
    AutoencoderKL,
    DiagonalGaussian,
    VectorQuantizer,
    VQModel,
    autoencoder_kl_from_diffusers,
    autoencoder_kl_to_diffusers,
    config_from_diffusers,
    diffusers_config,
    vq_model_from_diffusers,
    vq_model_to_diffusers,
)

diffusers = pytest.importorskip("diffusers")
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # noqa: E402
from diffusers.models.autoencoders.vae import VectorQuantizer as DiffusersVectorQuantizer  # noqa: E402

TOL = 1e-5
# A tiny network: two levels (f = 2), two ResNet blocks per encoder level so that the block index matters.
TINY = {"block_out_channels": [8, 16], "layers_per_block": 2, "latent_channels": 4, "norm_num_groups": 4}


def diffusers_tiny(kind: str, **options):
    blocks = {"down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2}
    if kind == "kl":
        return diffusers.AutoencoderKL(**TINY, **blocks, **options)
    return diffusers.VQModel(**TINY, **blocks, num_vq_embeddings=32, **options)


def perturb(module: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its initial value: GroupNorms start at weight 1, bias 0, so a map that swapped two
    of them would otherwise go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def images(seed: int = 0, size: int = 16) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- posterior
def test_posterior_matches_diffusers():
    params = torch.randn(2, 8, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    ours, theirs = DiagonalGaussian(params), DiagonalGaussianDistribution(params)
    assert max_diff(ours.kl(), theirs.kl()) < 1e-6
    x = torch.randn_like(params[:, :4])
    assert max_diff(ours.nll(x), theirs.nll(x)) < 1e-6
    assert torch.equal(ours.mode(), theirs.mode())
    sample_ours = ours.sample(torch.Generator().manual_seed(1))
    sample_theirs = theirs.sample(torch.Generator().manual_seed(1))
    assert max_diff(sample_ours, sample_theirs) < 1e-12
    # The KL written out: 0.5 * sum(mean^2 + var - 1 - logvar), against N(0, I).
    mean, logvar = params.chunk(2, dim=1)
    expected = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))
    assert max_diff(ours.kl(), expected) < 1e-9


def test_posterior_clamps_the_log_variance():
    mean = torch.zeros(1, 2, 1, 1, dtype=torch.float64)
    logvar = torch.tensor([-100.0, 100.0], dtype=torch.float64).view(1, 2, 1, 1)
    posterior = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    assert posterior.logvar.flatten().tolist() == [-30.0, 20.0]
    assert torch.equal(posterior.var.flatten(), torch.tensor([-30.0, 20.0], dtype=torch.float64).exp())
    # Clamped: 0.5 * ((e^-30 - 1 + 30) + (e^20 - 1 - 20)); unclamped the first term alone would be 0.5 * 99.
    expected = 0.5 * ((torch.tensor(-30.0).double().exp() + 29) + (torch.tensor(20.0).double().exp() - 21))
    assert abs(posterior.kl().item() - expected.item()) < 1e-6
    assert max_diff(posterior.kl(), DiagonalGaussianDistribution(posterior.parameters).kl()) < 1e-6


# ---------------------------------------------------------------------------------------------- AutoencoderKL
def kl_outputs_ours(model: AutoencoderKL, x: torch.Tensor):
    posterior = model.encode(x)
    return posterior.mean, posterior.logvar, model.decode(posterior.mean)


def kl_outputs_diffusers(model, x: torch.Tensor):
    posterior = model.encode(x).latent_dist
    return posterior.mean, posterior.logvar, model.decode(posterior.mean).sample


@torch.no_grad()
def test_autoencoder_kl_from_diffusers():
    torch.manual_seed(0)
    theirs = diffusers_tiny("kl").eval()
    perturb(theirs, 1)
    ours = AutoencoderKL(**config_from_diffusers(dict(theirs.config))).eval()
    ours.load_state_dict(autoencoder_kl_from_diffusers(theirs.state_dict()), strict=True)
    x = images()
    for a, b in zip(kl_outputs_ours(ours, x), kl_outputs_diffusers(theirs, x)):
        assert a.shape == b.shape and max_diff(a, b) < TOL
    # Sampling the posterior with the same generator: the same latent, and forward's reconstruction of it.
    reconstruction, _ = ours(x, sample_posterior=True, generator=torch.Generator().manual_seed(2))
    expected = theirs(x, sample_posterior=True, generator=torch.Generator().manual_seed(2)).sample
    assert max_diff(reconstruction, expected) < TOL


@torch.no_grad()
def test_autoencoder_kl_to_diffusers():
    torch.manual_seed(0)
    ours = AutoencoderKL(**TINY, mid_attention=True, scaling_factor=0.5).eval()
    perturb(ours, 3)
    theirs = diffusers.AutoencoderKL(**diffusers_config(ours)).eval()
    theirs.load_state_dict(autoencoder_kl_to_diffusers(ours.state_dict()), strict=True)
    assert theirs.config.scaling_factor == 0.5
    x = images(1)
    for a, b in zip(kl_outputs_ours(ours, x), kl_outputs_diffusers(theirs, x)):
        assert max_diff(a, b) < TOL
    assert config_from_diffusers(dict(theirs.config)) == ours.config


@torch.no_grad()
def test_autoencoder_kl_without_mid_attention():
    torch.manual_seed(0)
    theirs = diffusers_tiny("kl", mid_block_add_attention=False).eval()
    perturb(theirs, 4)
    ours = AutoencoderKL(**config_from_diffusers(dict(theirs.config))).eval()
    assert ours.encoder.mid.attn is None
    ours.load_state_dict(autoencoder_kl_from_diffusers(theirs.state_dict()), strict=True)
    x = images(2)
    for a, b in zip(kl_outputs_ours(ours, x), kl_outputs_diffusers(theirs, x)):
        assert max_diff(a, b) < TOL


def test_key_map_round_trips_and_is_a_real_map():
    ours = AutoencoderKL(**TINY)
    state = ours.state_dict()
    theirs = autoencoder_kl_to_diffusers(state)
    back = autoencoder_kl_from_diffusers(theirs)
    assert list(back) == list(state) and all(torch.equal(back[k], state[k]) for k in state)
    reference = diffusers_tiny("kl").state_dict()
    assert set(theirs) == set(reference)
    assert all(theirs[k].shape == reference[k].shape for k in reference)
    again = autoencoder_kl_to_diffusers(autoencoder_kl_from_diffusers(reference))
    assert list(again) == list(reference) and all(torch.equal(again[k], reference[k]) for k in reference)
    # The decoder's levels reverse (ours: full resolution first; diffusers: in running order), and attention's
    # 1x1 convs become Linear layers.
    assert theirs["decoder.up_blocks.1.resnets.0.conv1.weight"] is state["decoder.up.0.blocks.0.conv1.weight"]
    assert theirs["decoder.up_blocks.0.upsamplers.0.conv.weight"] is state["decoder.up.1.upsample.conv.weight"]
    assert (
        theirs["encoder.down_blocks.1.resnets.0.conv_shortcut.bias"] is state["encoder.down.1.blocks.0.shortcut.bias"]
    )
    assert theirs["encoder.mid_block.attentions.0.to_out.0.weight"].shape == (16, 16)
    assert state["encoder.mid.attn.proj_out.weight"].shape == (16, 16, 1, 1)
    with pytest.raises(ValueError, match="unexpected.weight"):
        autoencoder_kl_to_diffusers({"unexpected.weight": torch.zeros(1)})


# ---------------------------------------------------------------------------------------------- VQModel
def spread_codebook(codebook: torch.Tensor, latents: torch.Tensor, seed: int) -> None:
    """Codes at the latents' scale, so that the nearest code varies from position to position."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        codebook.copy_(torch.randn(codebook.shape, generator=generator) * latents.std() + latents.mean())


@torch.no_grad()
def test_vq_model_from_diffusers():
    torch.manual_seed(0)
    theirs = diffusers_tiny("vq").eval()
    perturb(theirs, 5)
    x = images(3)
    spread_codebook(theirs.quantize.embedding.weight, theirs.encode(x).latents, 6)
    ours = VQModel(**config_from_diffusers(dict(theirs.config))).eval()
    ours.load_state_dict(vq_model_from_diffusers(theirs.state_dict()), strict=True)

    h_ours, h_theirs = ours.encode(x), theirs.encode(x).latents
    assert max_diff(h_ours, h_theirs) < TOL
    quantized = ours.quantize(h_ours)
    z_q, loss, (_, _, indices) = theirs.quantize(h_ours)
    assert torch.equal(quantized.indices.flatten(), indices.flatten())
    assert quantized.indices.unique().numel() > 4  # a real test of the nearest-code search
    assert max_diff(quantized.latents, z_q) < TOL
    assert abs(quantized.loss.item() - loss.item()) < TOL
    decoded = theirs.decode(h_theirs)
    assert max_diff(ours.decode(h_ours), decoded.sample) < TOL
    assert abs(ours(x)[1].loss.item() - decoded.commit_loss.item()) < TOL
    assert max_diff(ours.decode_indices(quantized.indices), decoded.sample) < TOL


@torch.no_grad()
def test_vq_model_to_diffusers():
    torch.manual_seed(0)
    ours = VQModel(**TINY, num_embeddings=32).eval()
    perturb(ours, 7)
    x = images(4)
    spread_codebook(ours.quantizer.codebook.weight, ours.encode(x), 8)
    theirs = diffusers.VQModel(**diffusers_config(ours)).eval()
    theirs.load_state_dict(vq_model_to_diffusers(ours.state_dict()), strict=True)

    h = ours.encode(x)
    assert max_diff(h, theirs.encode(x).latents) < TOL
    quantized = ours.quantize(h)
    z_q, loss, (_, _, indices) = theirs.quantize(h)
    assert torch.equal(quantized.indices.flatten(), indices.flatten())
    assert max_diff(quantized.latents, z_q) < TOL
    assert abs(quantized.loss.item() - loss.item()) < TOL
    assert max_diff(ours.decode(h), theirs.decode(h).sample) < TOL
    # Back: the same constructor arguments, but for which beta term diffusers' VQModel weights.
    assert config_from_diffusers(dict(theirs.config)) == ours.config | {"beta_term": "codebook"}
    state = ours.state_dict()
    back = vq_model_from_diffusers(vq_model_to_diffusers(state))
    assert list(back) == list(state) and all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("beta_term, legacy", [("commitment", False), ("codebook", True)])
def test_vq_loss_and_its_gradients_match_diffusers(beta_term, legacy):
    torch.manual_seed(0)
    ours = VectorQuantizer(16, 4, beta=0.25, beta_term=beta_term)
    theirs = DiffusersVectorQuantizer(16, 4, beta=0.25, legacy=legacy)
    z0 = torch.randn(2, 4, 3, 3)
    spread_codebook(ours.codebook.weight, z0, 9)
    theirs.embedding.weight.data.copy_(ours.codebook.weight)

    z_ours, z_theirs = z0.clone().requires_grad_(), z0.clone().requires_grad_()
    quantized = ours(z_ours)
    z_q, loss, _ = theirs(z_theirs)
    assert abs(quantized.loss.item() - loss.item()) < 1e-6
    quantized.loss.backward()
    loss.backward()
    assert max_diff(z_ours.grad, z_theirs.grad) < 1e-7
    assert max_diff(ours.codebook.weight.grad, theirs.embedding.weight.grad) < 1e-7
    # The paper's convention, written out: d/dz of beta * mean((z - sg[z_q])^2) is 2 beta (z - z_q) / N.
    z_q = ours.lookup(quantized.indices)
    weight = 0.25 if beta_term == "commitment" else 1.0
    assert max_diff(z_ours.grad, 2 * weight * (z0 - z_q.detach()) / z0.numel()) < 1e-7


def test_vq_straight_through_gradient_reaches_the_encoder():
    torch.manual_seed(0)
    model = VQModel(**TINY, num_embeddings=32)
    x = images(5)
    h = model.encode(x)
    quantized = model.quantize(h)
    # Straight through: z_q's gradient is copied to h unchanged, although argmin has none.
    weights = torch.randn_like(h)
    (grad_h,) = torch.autograd.grad((quantized.latents * weights).sum(), h)
    assert torch.equal(grad_h, weights)
    # Through the whole model, a reconstruction loss alone (no VQ loss) trains the encoder.
    model.zero_grad()
    reconstruction, _ = model(x)
    ((reconstruction - x) ** 2).mean().backward()
    grad = model.encoder.conv_in.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@torch.no_grad()
def test_vq_code_usage_accumulates_until_reset():
    quantizer = VectorQuantizer(8, 2)
    quantizer.codebook.weight.copy_(torch.randn(8, 2, generator=torch.Generator().manual_seed(0)))
    assert quantizer.code_usage().sum() == 0
    batches = [torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(s)) for s in (1, 2, 3)]
    indices = [quantizer(z).indices for z in batches]
    expected = torch.bincount(torch.cat([i.flatten() for i in indices]), minlength=8)
    assert torch.equal(quantizer.code_usage(), expected)
    assert quantizer.code_usage().sum() == 3 * 2 * 3 * 3
    assert "usage" not in quantizer.state_dict()  # a measurement, not a weight
    quantizer.reset_usage()
    assert quantizer.code_usage().sum() == 0
    quantizer(batches[0])
    assert torch.equal(quantizer.code_usage(), torch.bincount(indices[0].flatten(), minlength=8))

    model = VQModel(**TINY, num_embeddings=32)
    model.decode(model.encode(images(6)))
    model.decode(model.encode(images(7)))
    assert model.code_usage().sum() == 2 * 2 * 8 * 8  # two batches of 2 latents of 8 x 8
    model.reset_usage()
    assert model.code_usage().sum() == 0


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "kind, option, value",
    [
        ("kl", "use_quant_conv", False),
        ("kl", "shift_factor", 0.1159),
        ("kl", "act_fn", "gelu"),
        ("vq", "norm_type", "spatial"),
        ("vq", "vq_embed_dim", 8),
        ("kl", "down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
    ],
)
def test_unrepresentable_configs_are_refused(kind, option, value):
    config = dict(diffusers_tiny(kind).config) | {option: value}
    with pytest.raises(ValueError) as error:
        config_from_diffusers(config)
    message = str(error.value)
    assert option in message and "\n" not in message
    # The same config without that option converts.
    config_from_diffusers(dict(diffusers_tiny(kind).config))


def test_unknown_options_and_unexportable_beta_are_refused():
    with pytest.raises(ValueError, match="some_new_option"):
        config_from_diffusers(dict(diffusers_tiny("kl").config) | {"some_new_option": 1})
    with pytest.raises(ValueError, match="beta=0.5"):
        diffusers_config(VQModel(**TINY, num_embeddings=32, beta=0.5))
