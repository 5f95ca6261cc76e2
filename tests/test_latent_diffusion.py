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

from src.data.datasets import InMemoryImageDataset, passthrough_collate, to_model_range
from src.data.latent_cache import CachedLatentDataset, CachedLatents, latent_cache
from src.errors import ConfigError
from src.models.autoencoder import AutoencoderKL, VQModel, save_autoencoder
from src.models.diffusion import DiffusionModel
from src.models.first_stage import LatentFirstStage
from src.resume import ResumableDataLoader

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


# ---------------------------------------------------------------------------------------------- the latent cache
def test_cached_moments_give_the_encoded_latents(autoencoder_file: Path) -> None:
    """z drawn from the cached (mean, std) is the z that encoding draws, from the same RNG state."""
    stage = LatentFirstStage(str(autoencoder_file))
    x = images(8)
    stage.calibrate(x)
    moments = stage.encode_moments(x)
    posterior = stage.autoencoder.encode(x)
    assert torch.equal(moments[:, 0], posterior.mean) and torch.equal(moments[:, 1], posterior.std)
    torch.manual_seed(3)
    encoded = stage.encode(x)
    torch.manual_seed(3)
    assert torch.equal(stage.normalize(stage.latents_from_moments(moments)), encoded)
    torch.manual_seed(3)
    sampled = posterior.sample()  # DiagonalGaussian's own draw
    torch.manual_seed(3)
    assert torch.equal(stage.latents_from_moments(moments), sampled)
    mean_only = LatentFirstStage(str(autoencoder_file), sample_posterior=False)
    assert torch.equal(mean_only.latents_from_moments(moments), posterior.mean)


def test_the_latent_cache_is_built_once_and_keyed_by_autoencoder_and_images(
    tmp_path: Path, autoencoder_file: Path
) -> None:
    stage = LatentFirstStage(str(autoencoder_file))
    pixels = torch.randint(0, 256, (10, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = stage.encode_moments(to_model_range(pixels))
    digest = stage.autoencoder_digest()
    cache = tmp_path / "cache"
    exact = latent_cache(stage.encode_moments, digest, pixels, "px", dtype="float32", cache_dir=cache, batch_size=4)
    assert exact.shape == (10, 1, 2, 4, 7, 7) and exact.dtype == torch.float32
    assert torch.allclose(exact[:, 0], expected, atol=1e-6)
    half = latent_cache(stage.encode_moments, digest, pixels, "px", cache_dir=cache, batch_size=4)
    assert half.dtype == torch.float16 and torch.allclose(half[:, 0].float(), expected, rtol=1e-3, atol=1e-3)

    def must_not_encode(_: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the cache was built again")

    again = latent_cache(must_not_encode, digest, pixels, "px", dtype="float32", cache_dir=cache)
    assert torch.equal(again, exact)
    assert len(list(cache.glob("*.raw"))) == 2 and not list(cache.glob(".*tmp"))  # no temporary file left
    with pytest.raises(AssertionError, match="built again"):  # another autoencoder, other images: other keys
        latent_cache(must_not_encode, "another", pixels, "px", cache_dir=cache)
    with pytest.raises(AssertionError, match="built again"):
        latent_cache(must_not_encode, digest, pixels, "other images", cache_dir=cache)
    torch.manual_seed(1)
    changed = LatentFirstStage(str(save_autoencoder(AutoencoderKL(**TINY_AE), tmp_path / "other.pt")))
    assert changed.autoencoder_digest() != digest

    flips = latent_cache(stage.encode_moments, digest, pixels, "px", orientations=2, dtype="float32", cache_dir=cache)
    assert torch.allclose(flips[:, 1], stage.encode_moments(to_model_range(pixels).flip(-1)), atol=1e-6)


def test_the_training_loader_flips_cached_latents_as_it_flips_images(tmp_path: Path, autoencoder_file: Path) -> None:
    """With random flips, a cached batch holds the flipped images' moments exactly where the image loader flips."""
    stage = LatentFirstStage(str(autoencoder_file))
    pixels = torch.randint(0, 256, (12, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(12)
    moments = latent_cache(stage.encode_moments, "d", pixels, "px", orientations=2, dtype="float32",
                           cache_dir=tmp_path)  # fmt: skip
    loaders = [ResumableDataLoader(dataset, 4, seed=5, random_flip=True, collate_fn=passthrough_collate)
               for dataset in (InMemoryImageDataset(pixels, labels), CachedLatentDataset(moments, labels))]  # fmt: skip
    flipped = 0
    for (x, y), (cached, cached_y) in zip(*loaders):
        assert isinstance(cached, CachedLatents) and torch.equal(y, cached_y)
        assert torch.allclose(cached.moments, stage.encode_moments(x), atol=1e-6)
        flipped += int((x != to_model_range(pixels[y])).flatten(1).any(1).sum())
    assert 0 < flipped < 12
    with pytest.raises(ValueError, match="no flipped latents"):
        CachedLatents(moments[:2, 0]).flip_horizontally(torch.tensor([True, False]))


# ---------------------------------------------------------------------------------------------- through the CLI
def latent_options(path: Path) -> list[str]:
    config = str(Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist_latent.yaml")
    return ["--config", config, "--model.first_stage.init_args.path", str(path),
            "--model.net.init_args.base_channels", "8", "--model.net.init_args.norm_groups", "4",
            "--model.sampling.steps", "3", "--logger_backend", "csv"]  # fmt: skip


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
def test_a_cached_latent_run_resumes_exactly_and_equals_the_encoding_run(
    tmp_path: Path, autoencoder_file: Path
) -> None:
    """--data.latent_cache: a resumed run equals the straight one bit for bit (both read one cache, built once), and
    in float32 the cached run trains as the run that encodes every batch, up to the encoder's batch rounding."""
    options = latent_options(autoencoder_file)
    cache = ["--data.latent_cache", "true", "--data.cache_dir", str(tmp_path / "cache")]
    straight = torch.load(continued_equals_uninterrupted(tmp_path / "resume", *options, *cache), weights_only=True)
    assert len(list((tmp_path / "cache" / "latents").glob("latents-*.raw"))) == 1
    assert torch.isfinite(straight["state_dict"]["model.first_stage.latent_std"]).all()

    exact = [*cache, "--data.latent_cache_dtype", "float32"]
    states = [torch.load(_fit(tmp_path / name, 3, *options, *more), weights_only=True)["state_dict"]
              for name, more in (("encoded", []), ("cached", exact))]  # fmt: skip
    for key, value in states[0].items():
        assert torch.allclose(value.double(), states[1][key].double(), rtol=1e-4, atol=1e-6), key
    assert not torch.equal(states[0]["model.net.conv_in.weight"], straight["state_dict"]["model.net.conv_in.weight"])


@pytest.mark.slow
@needs_fashion_mnist
def test_a_latent_cache_without_a_first_stage_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--data.latent_cache true .* needs --model.first_stage"):
        _fit(tmp_path / "runs", 1, "--data.latent_cache", "true", "--data.cache_dir", str(tmp_path / "cache"))


@pytest.mark.slow
@needs_fashion_mnist
def test_a_latent_fit_with_a_missing_autoencoder_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="autoencoder_main fit"):
        _fit(tmp_path / "runs", 1, *latent_options(tmp_path / "no_autoencoder.pt"))
