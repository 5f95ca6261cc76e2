"""UNet (src/models/unet.py): the DDPM CIFAR-10 parameter count, the shape and argument contract, the zero
initialisation of the output, and the sinusoidal timestep embedding against DDPM's `get_timestep_embedding`."""

import functools
import math

import numpy as np
import pytest
import torch

from src.models.unet import UNet, timestep_embedding

DDPM_CIFAR10_PARAMETERS = 35_746_307  # the official DDPM CIFAR-10 model (diffusion_tf, google/ddpm-cifar10-32)


pytestmark = pytest.mark.usefixtures("one_thread")


def count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.fixture
def small_unet(small_unet):
    """The shared small UNet (tests/conftest.py) with dropout 0.1."""
    return functools.partial(small_unet, dropout=0.1)


@pytest.fixture
def perturb(perturb):
    """Every parameter off its initialisation (the zero-initialised convs make the network start as a constant)."""
    return functools.partial(perturb, scale=0.05)


def numpy_get_timestep_embedding(timesteps, embedding_dim):
    """DDPM's `get_timestep_embedding` (diffusion_tf/nn.py), in float64 numpy."""
    half_dim = embedding_dim // 2
    emb = math.log(10000) / (half_dim - 1)
    emb = np.exp(np.arange(half_dim, dtype=np.float64) * -emb)
    emb = np.asarray(timesteps, dtype=np.float64)[:, None] * emb[None, :]
    emb = np.concatenate([np.sin(emb), np.cos(emb)], axis=1)
    if embedding_dim % 2 == 1:
        emb = np.pad(emb, [[0, 0], [0, 1]])
    return emb


# ---------------------------------------------------------------------------------------------- DDPM CIFAR-10
def test_ddpm_cifar10_parameter_count():
    net = UNet(
        in_channels=3,
        base_channels=128,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attn_resolutions=(16,),
        dropout=0.1,
        image_size=32,
    )
    assert count(net) == DDPM_CIFAR10_PARAMETERS
    with torch.no_grad():  # one batch-1 forward (~0.1 s): shape contract and the zero output at init
        out = net.eval()(torch.randn(1, 3, 32, 32), torch.tensor([999]))
    assert out.shape == (1, 3, 32, 32) and torch.equal(out, torch.zeros_like(out))
    # Defaults are the CIFAR-10 configuration.
    assert count(UNet()) == DDPM_CIFAR10_PARAMETERS


def test_parameter_count_matches_diffusers_unet2d():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        norm_eps=1e-6,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
    )
    assert count(ref) == DDPM_CIFAR10_PARAMETERS


# ---------------------------------------------------------------------------------------------- shape contract
@pytest.mark.parametrize(
    ("config", "shape"),
    [
        (dict(), (2, 1, 28, 28)),
        (dict(channel_mult=(1, 2, 2, 2)), (2, 1, 28, 28)),  # 28 -> 14 -> 7 -> 4 and back through odd sizes
        (
            dict(in_channels=3, channel_mult=(1, 2, 2, 2), attn_resolutions=(16,), image_size=32, num_res_blocks=2),
            (3, 3, 32, 32),
        ),
    ],
)
def test_output_shape(config, shape, small_unet, perturb):
    net = perturb(small_unet(**config)).eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    t = torch.randint(0, 1000, (shape[0],), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = net(x, t)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()


def test_scalar_t_broadcasts(small_unet, perturb):
    net = perturb(small_unet()).eval()
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(net(x, torch.tensor(17)), net(x, torch.full((3,), 17, dtype=torch.int64)))


def test_learned_variance_output_channels(small_unet):
    net = small_unet(out_channels=2)
    assert net(torch.zeros(1, 1, 28, 28), torch.zeros(1, dtype=torch.int64)).shape == (1, 2, 28, 28)


def test_output_is_zero_at_init(small_unet):
    """DDPM zero-initialises the final conv, so a fresh network predicts eps = 0 for every input."""
    net = small_unet().eval()
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = net(x, torch.tensor([0, 999]))
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(net.conv_out.weight, torch.zeros_like(net.conv_out.weight))


def test_output_depends_on_t_and_y(small_unet, perturb):
    net = perturb(small_unet(num_classes=10)).eval()
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(6))
    y = torch.tensor([1, 2])
    with torch.no_grad():
        base = net(x, torch.tensor([10, 10]), y)
        other_t = net(x, torch.tensor([500, 500]), y)
        other_y = net(x, torch.tensor([10, 10]), torch.tensor([3, 10]))  # 10 is the null label
        again = net(x, torch.tensor([10, 10]), y)
    assert (base - other_t).abs().amax(dim=(1, 2, 3)).min() > 1e-4
    assert (base - other_y).abs().amax(dim=(1, 2, 3)).min() > 1e-4
    torch.testing.assert_close(base, again, rtol=0, atol=0)  # eval mode: no dropout
    # Batch elements are independent (GroupNorm, not BatchNorm): the first sample does not see the second.
    with torch.no_grad():
        alone = net(x[:1], torch.tensor([10]), y[:1])
    torch.testing.assert_close(alone, base[:1], rtol=1e-5, atol=1e-6)


def test_conditional_requires_labels_and_unconditional_rejects_them(small_unet):
    cond, uncond = small_unet(num_classes=10), small_unet()
    x, t = torch.zeros(2, 1, 28, 28), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="labels"):
        cond(x, t)
    with pytest.raises(ValueError, match="unconditional"):
        uncond(x, t, torch.tensor([0, 1]))
    assert cond(x, t, torch.tensor([0, 10])).shape == x.shape
    assert cond.label_emb.num_embeddings == 11  # + the null label for classifier-free guidance


@pytest.mark.parametrize("shape", [(2, 3, 28, 28), (2, 28, 28), (1, 2, 1, 28, 28)])
def test_wrong_input_shape_raises(shape, small_unet):
    with pytest.raises(ValueError, match=r"expects \(B, 1, H, W\)"):
        small_unet()(torch.zeros(shape), torch.tensor([0, 1]))


def test_gradient_reaches_every_parameter(small_unet, perturb):
    net = perturb(small_unet(num_classes=3, dropout=0.0)).train()
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(7))
    out = net(x, torch.tensor([0, 5, 500, 999]), torch.tensor([0, 1, 2, 3]))
    out.pow(2).mean().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_gradient_at_init_reaches_the_output_conv(small_unet):
    """At init only the zero-initialised output conv gets a non-zero gradient (everything behind it is multiplied by
    its zero weights); the rest must still be connected (grad not None)."""
    net = small_unet(dropout=0.0)
    net(torch.randn(2, 1, 28, 28), torch.tensor([3, 4])).sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    assert net.conv_out.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- timestep embedding
@pytest.mark.parametrize("dim", [128, 64, 31, 4])
def test_timestep_embedding_matches_ddpm(dim):
    t = torch.tensor([0, 1, 2, 10, 250, 999], dtype=torch.int64)
    ours = timestep_embedding(t, dim)
    ref = numpy_get_timestep_embedding(t.numpy(), dim)
    assert ours.shape == (6, dim)
    # float32 arguments up to 999: sin/cos agree to ~1e-4 absolute.
    np.testing.assert_allclose(ours.double().numpy(), ref, rtol=0, atol=2e-4)
    np.testing.assert_allclose(ours[:4].double().numpy(), ref[:4], rtol=0, atol=1e-6)
    # First half sin, second half cos (DDPM's order, not flip_sin_to_cos).
    np.testing.assert_allclose(ours[0, : dim // 2].numpy(), 0.0, atol=0)
    np.testing.assert_allclose(ours[0, dim // 2 : 2 * (dim // 2)].numpy(), 1.0, atol=0)
