"""Concatenation conditioning (src/models/unet.py `conditioning="concat"`, src/diffusion/conditioning.py; LDM,
Rombach et al. 2022, section 4.4; SR3, Saharia et al. 2021): the condition enters as extra input channels, made
from clean images by a function of them (super-resolution's `LowResolution`), in training, sampling, exports and
through the CLI with the shipped recipe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from src.data.builtin import load_dataset
from src.diffusion.conditioning import LowResolution, build_condition, condition_spec
from src.diffusion.schedule import NoiseSchedule
from src.errors import ConfigError
from src.models.diffusion import DiffusionModel
from src.models.unet import UNet

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def concat_net(small_unet, perturb) -> UNet:
    return perturb(small_unet(conditioning="concat", cond_channels=1), 0.05)


def test_the_condition_is_concatenated_to_the_input(small_unet, perturb) -> None:
    """The concat net equals a plain net with in_channels + cond_channels inputs, fed [x, y], on the same weights."""
    net = concat_net(small_unet, perturb)
    plain = UNet(**{**net.config, "in_channels": 2, "out_channels": 1, "conditioning": "embedding",
                    "cond_channels": None})  # fmt: skip
    plain.load_state_dict(net.state_dict())
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 1, 28, 28, generator=generator), torch.randn(3, 1, 28, 28, generator=generator)
    t = torch.tensor([0, 400, 999])
    with torch.no_grad():
        out = net(x, t, y)
        assert torch.equal(out, plain(torch.cat([x, y], 1), t))
        assert not torch.allclose(out, net(x, t, -y), atol=1e-3)  # y is read
    assert net.config["conditioning"] == "concat" and UNet(**net.config).cond_channels == 1


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"conditioning": "concat"}, "set cond_channels"),
        ({"conditioning": "concat", "cond_channels": 1, "num_classes": 10}, "leave num_classes unset"),
        ({"cond_channels": 1}, "cond_channels 1 is for conditioning 'concat'"),
    ],
)
def test_concat_options_that_cannot_work(small_unet, options, match) -> None:
    with pytest.raises(ValueError, match=match):
        small_unet(**options)


def test_a_condition_of_the_wrong_shape_is_refused(small_unet) -> None:
    net = small_unet(conditioning="concat", cond_channels=1)
    x, t = torch.zeros(2, 1, 28, 28), torch.tensor([1, 2])
    for y in (None, torch.zeros(2, 2, 28, 28), torch.zeros(2, 1, 14, 14)):
        with pytest.raises(ValueError, match=r"concatenates a condition y of shape \(B, 1, 28, 28\)"):
            net(x, t, y)


def test_low_resolution_is_the_block_mean_enlarged() -> None:
    """reduce: the mean of each 4 x 4 block (by reshaping, independently of avg_pool); the condition: its bicubic
    enlargement, clipped; visible: each low-resolution pixel repeated 4 x 4."""
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(2, 1, 28, 28, generator=generator) * 2 - 1
    condition = LowResolution(4)
    blocks = images.reshape(2, 1, 7, 4, 7, 4).mean(dim=(3, 5))
    torch.testing.assert_close(condition.reduce(images), blocks, rtol=0, atol=1e-6)
    y = condition(images, (28, 28))
    assert y.shape == images.shape and y.min() >= -1 and y.max() <= 1
    torch.testing.assert_close(y, F.interpolate(blocks, size=(28, 28), mode="bicubic").clamp(-1, 1), rtol=0, atol=1e-6)
    enlarged = blocks.repeat_interleave(4, 2).repeat_interleave(4, 3)
    torch.testing.assert_close(condition.visible(images), enlarged, rtol=0, atol=1e-6)
    # A constant image stays constant, at any target size (a latent's, 7 x 7, too).
    assert torch.allclose(condition(torch.full((1, 1, 28, 28), 0.3), (7, 7)), torch.full((1, 1, 7, 7), 0.3))
    with pytest.raises(ValueError, match="not divisible by factor 4"):
        condition.reduce(torch.zeros(1, 1, 30, 30))


def test_condition_specs_round_trip_and_bad_ones_are_one_line() -> None:
    spec = {"name": "low_resolution", "factor": 2}
    assert condition_spec(build_condition(spec)) == spec and build_condition(None) is None
    dotted = {"name": "src.diffusion.conditioning.LowResolution", "factor": 4}
    assert condition_spec(build_condition(dotted)) == {"name": "low_resolution", "factor": 4}
    for bad, match in [
        ({"name": "blur"}, "'blur' is unknown; choose one of low_resolution"),
        ({"factor": 4}, "is {name: ..., <arguments>}"),
        ({"name": "low_resolution", "factor": 1}, "factor must be an integer >= 2"),
        ({"name": "low_resolution", "scale": 4}, "unexpected keyword argument 'scale'"),
        ({"name": "no.such.Thing"}, "cannot be imported"),
    ]:
        with pytest.raises(ValueError, match=match) as error:
            build_condition(bad)
        assert "\n" not in str(error.value)


def _model(net: UNet, **options) -> DiffusionModel:
    return DiffusionModel(net, NoiseSchedule.linear(1000), "v", condition={"name": "low_resolution", "factor": 4},
                          **options).eval()  # fmt: skip


def test_samples_are_conditioned_on_their_own_image(small_unet, perturb, tmp_path: Path) -> None:
    """Sample i is conditioned on condition_images[i % N], whatever the batch: the same image gives the same sample,
    another image another; exports keep the condition and sample the same."""
    model = _model(concat_net(small_unet, perturb))
    model.settings = model.settings.replace(sampler="dpmpp_2m", steps=3, skip="logsnr")
    generator = torch.Generator().manual_seed(2)
    images = (torch.rand(3, 1, 28, 28, generator=generator) * 255).to(torch.uint8)
    with pytest.raises(ConfigError, match="set its condition_images"):
        model.sample_indices(torch.arange(2))
    model.condition_images = images
    together = model.sample_indices(torch.arange(4))
    # The batch size changes the float rounding only.
    torch.testing.assert_close(model.sample_indices(torch.tensor([2])), together[2:3], rtol=0, atol=1e-4)
    # Index 3 uses image 0 with index 3's noise; with images swapped, index 0's condition differs, its noise not.
    model.condition_images = images.flip(0)
    assert not torch.allclose(model.sample_indices(torch.tensor([0])), together[:1], atol=1e-3)
    model.condition_images = images
    with pytest.raises(ValueError, match="conditioned on images: pass its y"):
        model.sample(torch.randn(1, 1, 28, 28))
    loaded = DiffusionModel.load(model.save(tmp_path / "export"))
    assert json.loads((tmp_path / "export" / "config.json").read_text())["condition"] == condition_spec(model.condition)
    loaded.settings, loaded.condition_images = model.settings, images
    torch.testing.assert_close(loaded.sample_indices(torch.arange(4)), together, rtol=0, atol=1e-4)


def test_a_condition_needs_a_concat_net_and_the_other_way_round(small_unet) -> None:
    with pytest.raises(ConfigError, match="go together: the net concatenates no condition channels"):
        _model(small_unet())
    with pytest.raises(ConfigError, match=r"go together: the net concatenates 1 .* --model.condition is None"):
        DiffusionModel(small_unet(conditioning="concat", cond_channels=1), NoiseSchedule.linear(1000))
    with pytest.raises(ConfigError, match="classifier_scale guides towards class labels"):
        _model(small_unet(conditioning="concat", cond_channels=1), classifier_path="c.pt", classifier_scale=1.0)


def test_super_resolution_through_the_command_line(tmp_path: Path) -> None:
    """The shipped recipe, shrunk: fit (the loss reads the condition; the grid shows, per row of 8 samples, their 7x7
    inputs enlarged, the samples and the originals), then predict writes 28 x 28 PNGs, the same for the same test
    images and others for the training images; a mismatched net is one line before anything runs."""
    from PIL import Image
    from test_sample import TINY, _grid_size

    from src.main import cli_main

    config = ["--config", str(REPO / "configs" / "fashion_mnist_super_resolution.yaml"), *TINY]
    root = ["--trainer.default_root_dir", str(tmp_path / "runs")]
    cli_main(["fit", *config, *root, "--trainer.max_steps", "2", "--data.batch_size", "8"])
    run = next((tmp_path / "runs").rglob("last.ckpt")).parents[1]
    grids = sorted((run / "samples").glob("*.png"))
    assert grids and Image.open(grids[-1]).size == _grid_size(3 * 32 // 8, 8)  # the recipe's 32 samples
    hparams = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["condition"] == {"name": "low_resolution", "factor": 4}

    def predict(out: str, *extra: str) -> list[bytes]:
        cli_main(["predict", *config, *root, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
                  "--data.num_samples", "3", "--output_dir", str(tmp_path / out), *extra])  # fmt: skip
        files = sorted((tmp_path / out).iterdir())
        assert [p.name for p in files] == ["0.png", "1.png", "2.png"]
        assert all(Image.open(p).size == (28, 28) for p in files)
        return [p.read_bytes() for p in files]

    test_images = predict("test", "--grid_path", str(tmp_path / "test.png"))
    # 3 samples: one block of 3 columns, the 7x7 inputs enlarged, the samples, the originals (test images 0..2).
    grid = np.asarray(Image.open(tmp_path / "test.png"))
    assert grid.shape == _grid_size(3, 3)[::-1]
    originals = load_dataset("fashion_mnist", "test", None)[0][:3, 0].numpy()
    assert all(np.array_equal(grid[2 + 2 * 30 : 30 + 2 * 30, 2 + c * 30 : 30 + c * 30], originals[c]) for c in range(3))
    assert np.array_equal(grid[32:60, 2:30], np.asarray(Image.open(tmp_path / "test" / "0.png")))
    assert predict("again") == test_images
    assert predict("train", "--model.sampling.condition_split", "train") != test_images
    with pytest.raises(ConfigError, match="makes 1-channel conditions of these images; the net concatenates 3") as e:
        cli_main(["fit", *config, "--trainer.default_root_dir", str(tmp_path / "bad"),
                  "--model.net.init_args.cond_channels", "3", "--trainer.max_steps", "1"])  # fmt: skip
    assert "\n" not in str(e.value) and not list((tmp_path / "bad").rglob("*.ckpt"))


def test_in_latent_space_the_condition_has_the_latents_size(tmp_path: Path, tiny_module) -> None:
    """With a first stage, y is made at the latent's size (7x7 for 28x28 images, f = 4) and samples are decoded to
    images; a latent-cache batch (latents only, no images to make y from) is a one-line error."""
    from test_latent_diffusion import TINY_AE

    from src.data.latent_cache import CachedLatents
    from src.models.autoencoder import AutoencoderKL, save_autoencoder
    from src.models.first_stage import LatentFirstStage

    torch.manual_seed(0)
    path = save_autoencoder(AutoencoderKL(**TINY_AE), tmp_path / "autoencoder.pt")
    stage = LatentFirstStage(str(path), sample_posterior=False)
    images = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(3)) * 2 - 1
    stage.calibrate(images)
    net = UNet(in_channels=4, image_size=7, base_channels=8, channel_mult=[1], num_res_blocks=1, attn_resolutions=[],
               dropout=0.0, norm_groups=4, conditioning="concat", cond_channels=1)  # fmt: skip
    model = _model(net, first_stage=stage)
    model.settings = model.settings.replace(sampler="ddim", steps=2)
    torch.testing.assert_close(model.condition_input(images), LowResolution(4)(images, (7, 7)))
    model.condition_images = images
    assert model.sample_indices(torch.arange(2)).shape == (2, 1, 28, 28)
    module = tiny_module(net, condition={"name": "low_resolution", "factor": 4}, first_stage=stage)
    with pytest.raises(ConfigError, match="--data.latent_cache holds latents only"):
        module.net_y((CachedLatents(torch.zeros(2, 2, 4, 7, 7)), torch.zeros(2)))
