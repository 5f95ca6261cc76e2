"""Latent diffusion on the first-stage seam (src/models/first_stage.py, `LatentFirstStage`): the latent normalisation
against torch's own statistics, its measurement across processes, the stage rebuilt from a checkpoint without its
file, and configs/fashion_mnist_latent.yaml through the command line (fit, exact resume, predict, export)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import _fit, _predict, continued_equals_uninterrupted, needs_fashion_mnist

from src.errors import ConfigError
from src.models.autoencoder import AutoencoderKL, VQModel, save_autoencoder
from src.models.diffusion import DiffusionModel
from src.models.first_stage import LatentFirstStage

TINY_AE = {"in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16, 16], "layers_per_block": 1,
           "latent_channels": 4, "norm_num_groups": 4}  # fmt: skip


@pytest.fixture
def autoencoder_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_autoencoder(AutoencoderKL(**TINY_AE), tmp_path / "ae" / "autoencoder.pt")


def images(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_std_normalisation_is_ldm_scale_by_std(autoencoder_file: Path) -> None:
    """LDM's scale_factor = 1 / z.flatten().std() of the first batch's latents; encode gives z times it."""
    stage = LatentFirstStage(str(autoencoder_file), normalization="std", sample_posterior=False)
    x = images()
    z = stage.autoencoder.encode(x).mode()
    stage.calibrate(x)
    assert torch.allclose(stage.latent_std, z.double().flatten().std().expand(4), rtol=1e-10)
    assert torch.allclose(stage.encode(x), z / z.flatten().std(), atol=1e-5)
    assert stage.latent_shape((1, 28, 28)) == (4, 7, 7) and stage.image_shape((4, 7, 7)) == (1, 28, 28)


def test_channel_normalisation_and_the_round_trip(autoencoder_file: Path) -> None:
    stage = LatentFirstStage(str(autoencoder_file), normalization="channel", sample_posterior=False)
    x = images()
    z = stage.autoencoder.encode(x).mode().double()
    stage.calibrate(x)
    assert torch.allclose(stage.latent_mean, z.mean(dim=(0, 2, 3)), atol=1e-10)
    assert torch.allclose(stage.latent_std, z.transpose(0, 1).flatten(1).std(dim=1), rtol=1e-8)
    latents = stage.encode(x)
    assert torch.allclose(latents.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5)
    # decode undoes the normalisation: decode(encode(x)) is the autoencoder's own reconstruction.
    assert torch.allclose(stage.decode(latents), stage.autoencoder(x)[0], atol=1e-5)


def test_calibration_sums_every_process_moments(autoencoder_file: Path) -> None:
    """Two processes, each with half the batch, summing their moments, measure what one process measures on all."""
    whole = LatentFirstStage(str(autoencoder_file), normalization="channel", sample_posterior=False)
    x = images(8)
    expected = whole.calibrate(x)
    other: list[torch.Tensor] = []
    second = LatentFirstStage(str(autoencoder_file), normalization="channel", sample_posterior=False)
    second.calibrate(x[4:], lambda moments: other.append(moments.clone()) or moments)
    first = LatentFirstStage(str(autoencoder_file), normalization="channel", sample_posterior=False)
    assert torch.allclose(first.calibrate(x[:4], lambda moments: moments + other[0]), expected, rtol=1e-10)
    assert torch.allclose(first.latent_mean, whole.latent_mean, atol=1e-12)


def test_a_checkpoint_rebuilds_the_stage_without_its_file(autoencoder_file: Path) -> None:
    stage = LatentFirstStage(str(autoencoder_file), sample_posterior=False)
    assert not stage.calibrated
    stage.calibrate(images())
    assert "path" not in stage.config and stage.config["autoencoder"]["class"] == "AutoencoderKL"
    rebuilt = LatentFirstStage(**stage.config)  # what build_net does with the recorded spec
    rebuilt.load_state_dict(stage.state_dict())
    x = images(3, seed=1)
    assert torch.equal(rebuilt.encode(x), stage.encode(x))
    assert torch.equal(rebuilt.decode(stage.encode(x)), stage.decode(stage.encode(x)))


def test_a_vq_stage_quantises_when_decoding(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vq = VQModel(**TINY_AE, num_embeddings=8)
    stage = LatentFirstStage(str(save_autoencoder(vq, tmp_path / "vq.pt")), normalization="none")
    x = images(2)
    assert torch.equal(stage.encode(x), vq.encode(x))
    assert torch.allclose(stage.decode(stage.encode(x)), vq(x)[0], atol=1e-6)


def test_bad_first_stage_options_fail_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="normalization"):
        LatentFirstStage("x.pt", normalization="minmax")
    with pytest.raises(ConfigError, match="autoencoder file"):
        LatentFirstStage()
    with pytest.raises(FileNotFoundError, match="autoencoder_main fit"):
        LatentFirstStage(str(tmp_path / "missing.pt"))


# ---------------------------------------------------------------------------------------------- through the CLI
def latent_options(path: Path) -> list[str]:
    config = str(Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist_latent.yaml")
    return ["--config", config, "--model.first_stage.init_args.path", str(path),
            "--model.net.init_args.base_channels", "8", "--model.net.init_args.norm_groups", "4",
            "--model.sampling_steps", "3", "--logger_backend", "csv"]  # fmt: skip


@pytest.mark.slow
@needs_fashion_mnist
def test_the_latent_recipe_trains_resumes_exactly_and_predicts_image_sized_pngs(
    tmp_path: Path, autoencoder_file: Path
) -> None:
    options = latent_options(autoencoder_file)
    straight = continued_equals_uninterrupted(tmp_path, *options)
    state = torch.load(straight, weights_only=True, map_location="cpu")["state_dict"]
    scale = state["model.first_stage.latent_std"]
    assert torch.isfinite(scale).all() and (scale > 0).all()
    # The resumed run kept the scale measured at step 0 (continued_equals_uninterrupted compared every entry).
    out = tmp_path / "pngs"
    _predict(straight, tmp_path / "r", out, *options)
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 5 and all(np.array(Image.open(p)).shape == (28, 28) for p in pngs)
    model = DiffusionModel.load(straight)
    assert isinstance(model.first_stage, LatentFirstStage) and model.image_shape == (1, 28, 28)
    assert torch.equal(model.first_stage.latent_std, scale)
    again = DiffusionModel.load(model.save(tmp_path / "export"))
    indices = torch.arange(2)
    assert torch.equal(again.sample_indices(indices), model.sample_indices(indices))


@pytest.mark.slow
@needs_fashion_mnist
def test_a_latent_fit_with_a_missing_autoencoder_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="autoencoder_main fit"):
        _fit(tmp_path / "runs", 1, *latent_options(tmp_path / "no_autoencoder.pt"))
