"""FID/KID/IS: the math against scipy and torch-fidelity, streaming and DDP statistics, the reference cache, the
Inception weights error, and the rule that stand-in numbers never land under `val/fid`."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import scipy.linalg
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from src.callbacks.fid import FIDCallback
from src.metrics import evaluation
from src.metrics.evaluation import (
    cache_path,
    cached_statistics,
    load_statistics,
    metric_name,
    reference_key,
    sample_statistics,
    save_statistics,
    shard_indices,
)
from src.metrics.features import (
    INCEPTION_WEIGHTS_FILE,
    InceptionFeatures,
    InceptionWeightsNotFoundError,
    StandInFeatures,
)
from src.metrics.fid import StreamingStatistics, feature_statistics, frechet_distance
from src.metrics.scores import inception_score, kernel_inception_distance
from src.models.unet import UNet
from src.module import DiffusionModule


def random_gaussian(rng: np.random.Generator, dim: int) -> tuple[np.ndarray, np.ndarray]:
    a = rng.standard_normal((dim, dim))
    return rng.standard_normal(dim), a @ a.T / dim + 0.1 * np.eye(dim)


def scipy_frechet(mu1, sigma1, mu2, sigma2) -> float:
    """pytorch-fid's calculate_frechet_distance (without its epsilon fallback), float64."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_scipy_sqrtm() -> None:
    rng = np.random.default_rng(0)
    for dim in (2, 16, 64):
        (mu1, s1), (mu2, s2) = random_gaussian(rng, dim), random_gaussian(rng, dim)
        ours, ref = frechet_distance(mu1, s1, mu2, s2), scipy_frechet(mu1, s1, mu2, s2)
        assert ours == pytest.approx(ref, rel=1e-6)
        # tensors (float32 included) give the float64 result of their values
        as_tensors = frechet_distance(*(torch.from_numpy(a) for a in (mu1, s1, mu2, s2)))
        assert as_tensors == pytest.approx(ref, rel=1e-12)


def test_frechet_distance_of_singular_covariances_is_finite() -> None:
    # Fewer samples than dimensions: singular covariances, where sqrtm needs pytorch-fid's epsilon offset.
    rng = np.random.default_rng(1)
    f1, f2 = rng.standard_normal((10, 32)), rng.standard_normal((10, 32)) + 0.5
    mu1, s1 = feature_statistics(f1)
    mu2, s2 = feature_statistics(f2)
    value = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(value) and value > 0
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6)


def test_fid_of_a_set_against_itself_is_zero_and_statistics_match_numpy() -> None:
    features = np.random.default_rng(2).standard_normal((500, 48)) * 3 + 1
    mu, sigma = feature_statistics(features)
    np.testing.assert_allclose(mu, features.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-12)
    assert mu.dtype == sigma.dtype == np.float64
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)
    mu_t, sigma_t = feature_statistics(torch.from_numpy(features).float())
    assert mu_t.dtype == torch.float64 and sigma_t.shape == (48, 48)


def test_streaming_statistics_do_not_depend_on_batch_size() -> None:
    features = torch.from_numpy(np.random.default_rng(3).standard_normal((301, 20)) + 2.0)
    mu_ref, sigma_ref = feature_statistics(features.numpy())
    for batch in (1, 7, 64, 301):
        stats = StreamingStatistics(20)
        for chunk in features.split(batch):
            stats.update(chunk)
        mu, sigma = stats.compute()
        assert stats.num_samples == 301
        np.testing.assert_allclose(mu, mu_ref, rtol=1e-12)
        np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-10, atol=1e-12)
    # merging two halves is the same as one pass (what all_reduce does across processes)
    a, b = StreamingStatistics(20), StreamingStatistics(20)
    a.update(features[:100])
    b.update(features[100:])
    a.merge(b)
    np.testing.assert_allclose(a.compute()[1], sigma_ref, rtol=1e-10, atol=1e-12)


def test_kid_and_inception_score_match_torch_fidelity() -> None:
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    rng = np.random.default_rng(4)
    f1 = torch.from_numpy(rng.standard_normal((60, 16)))
    f2 = torch.from_numpy(rng.standard_normal((50, 16)) + 0.3)
    ref = kid_features_to_metric(f1, f2, kid_subsets=5, kid_subset_size=40, verbose=False, rng_seed=2020,
                                 kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None,
                                 kid_kernel_poly_coef0=1)  # fmt: skip
    mean, std = kernel_inception_distance(f1, f2, subsets=5, subset_size=40)
    assert mean == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-10)
    assert std == pytest.approx(ref["kernel_inception_distance_std"], rel=1e-10)

    logits = torch.from_numpy(rng.standard_normal((100, 10)) * 3)
    ref = isc_features_to_metric(logits, splits=4)
    assert inception_score(logits, splits=4) == pytest.approx(
        (ref["inception_score_mean"], ref["inception_score_std"]), rel=1e-10
    )


# ---------------------------------------------------------------------------------------------- DDP
def fake_images(indices: torch.Tensor) -> torch.Tensor:
    """A deterministic uint8 image per sample index (what a sampler with per-index noise produces)."""
    return torch.stack(
        [torch.randint(0, 256, (1, 12, 12), generator=torch.Generator().manual_seed(int(i)), dtype=torch.uint8)
         for i in indices]
    )  # fmt: skip


def _ddp_worker(rank: int, world_size: int, port: int, num_samples: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        seen = []

        def sample_fn(indices):
            seen.extend(indices.tolist())
            return fake_images(indices)

        stats, _ = sample_statistics(sample_fn, StandInFeatures(), num_samples, batch_size=2)
        mu, sigma = stats.compute()
        np.savez(f"{out}/rank{rank}.npz", mu=mu, sigma=sigma, seen=np.array(seen), count=stats.num_samples)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_statistics_equal_one_process_with_exactly_n_samples(tmp_path: Path) -> None:
    num_samples = 7  # not divisible by the 2 processes
    assert [shard_indices(num_samples, r, 2).tolist() for r in range(2)] == [[0, 2, 4, 6], [1, 3, 5]]
    mp.spawn(_ddp_worker, args=(2, _free_port(), num_samples, str(tmp_path)), nprocs=2, join=True)
    single, _ = sample_statistics(fake_images, StandInFeatures(), num_samples, batch_size=3)
    mu_ref, sigma_ref = single.compute()
    results = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    assert sorted(np.concatenate([r["seen"] for r in results]).tolist()) == list(range(num_samples))
    # Equal up to float32 round-off of the features (conv batches differ: 4 + 3 images vs 3 + 3 + 1).
    for r in results:
        assert int(r["count"]) == num_samples
        np.testing.assert_allclose(r["mu"], mu_ref, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(r["sigma"], sigma_ref, rtol=1e-5, atol=1e-7)
    ref = (mu_ref + 0.1, sigma_ref)
    assert frechet_distance(results[0]["mu"], results[0]["sigma"], *ref) == pytest.approx(
        frechet_distance(mu_ref, sigma_ref, *ref), rel=1e-6
    )


# ---------------------------------------------------------------------------------------------- cache
def test_reference_statistics_are_cached_and_invalidated_when_the_key_changes(tmp_path: Path) -> None:
    calls = []

    def compute():
        calls.append(1)
        return np.full(3, float(len(calls))), np.eye(3)

    key = reference_key("cifar10", "train", "standin", 32, 50000)
    mu, _, path, computed = cached_statistics(key, compute, tmp_path)
    assert computed and len(calls) == 1 and path.is_file() and path.name.startswith("cifar10-train-standin-32px")
    with np.load(path) as data:  # pytorch-fid / torch-fidelity format, plus the key
        assert set(data.files) == {"mu", "sigma", "key"} and json.loads(str(data["key"])) == key
    mu2, _, path2, computed = cached_statistics(key, compute, tmp_path)
    assert not computed and len(calls) == 1 and path2 == path and np.array_equal(mu, mu2)

    other = {**key, "image_size": 64}  # another key: another file, computed again
    assert cache_path(tmp_path, other) != path
    assert cached_statistics(other, compute, tmp_path)[3] and len(calls) == 2
    # a file whose stored key differs from its name's (e.g. a new cache version) is recomputed
    save_statistics(path, np.zeros(3), np.eye(3), {**key, "version": -1})
    assert cached_statistics(key, compute, tmp_path)[3] and len(calls) == 3
    # user files from pytorch-fid / torch-fidelity (no key) load as they are
    user = tmp_path / "user.npz"
    np.savez(user, mu=np.ones(3, np.float32), sigma=np.eye(3))
    mu_u, sigma_u, stored = load_statistics(user)
    assert stored is None and mu_u.dtype == np.float64 and mu_u.tolist() == [1, 1, 1]


# ---------------------------------------------------------------------------------------------- Inception
def test_missing_inception_weights_give_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DDIM_FID_WEIGHTS", raising=False)
    with pytest.raises(InceptionWeightsNotFoundError) as error:
        InceptionFeatures(weights_path=tmp_path / "nope.pth")
    message = str(error.value)
    assert "\n" not in message and INCEPTION_WEIGHTS_FILE in message and "fid_weights_path" in message

    # no file anywhere and no network: the download fails -> the same single line
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", offline)
    with pytest.raises(InceptionWeightsNotFoundError) as error:
        InceptionFeatures()
    assert "\n" not in str(error.value) and "Network is unreachable" in str(error.value)
    assert str(tmp_path / "hub" / "checkpoints") in str(error.value)


def test_inception_wrapper_repeats_grayscale_and_returns_2048_features(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random weights (the real ones cannot be downloaded here): checks the wiring only."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    weights = tmp_path / "w.pth"
    torch.save({}, weights)
    monkeypatch.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
    monkeypatch.setenv("DDIM_FID_WEIGHTS", str(weights))
    torch.manual_seed(0)
    extractor = InceptionFeatures()
    gray = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    out = extractor(gray)
    assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    torch.testing.assert_close(extractor(gray.repeat(1, 3, 1, 1))["pool"], out["pool"])


# ---------------------------------------------------------------------------------------------- Lightning
def tiny_module(tmp_path: Path, **kwargs) -> DiffusionModule:
    net = UNet(in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
               image_size=8, norm_groups=4, mid_attention=False)  # fmt: skip
    # Reference statistics of random images through the stand-in extractor.
    ref_images = torch.randint(0, 256, (40, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    mu, sigma = feature_statistics(StandInFeatures()(ref_images)["pool"].double().numpy())
    save_statistics(tmp_path / "ref.npz", mu, sigma)
    defaults = dict(timesteps=20, warmup_steps=1, sampling_steps=2, fid_extractor="standin",
                    fid_ref_stats=str(tmp_path / "ref.npz"), fid_batch_size=4)  # fmt: skip
    return DiffusionModule(net, **{**defaults, **kwargs})


def loader() -> DataLoader:
    images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return DataLoader(list(zip(images, torch.zeros(8, dtype=torch.int64), strict=True)), batch_size=4)


def trainer(root: Path, **kwargs) -> L.Trainer:
    return L.Trainer(default_root_dir=root, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, **kwargs)  # fmt: skip


def test_standin_numbers_never_land_under_val_fid(tmp_path: Path) -> None:
    assert metric_name("inception") == "val/fid"
    assert metric_name("standin") == "val/fid_standin"
    module = tiny_module(tmp_path, num_fid_samples=5)
    metrics = trainer(tmp_path).validate(module, loader())[0]
    assert "val/fid_standin" in metrics and "val/loss" in metrics
    assert not any(key == "val/fid" for key in metrics)
    assert np.isfinite(metrics["val/fid_standin"]) and metrics["val/fid_standin"] > 0


def test_fid_callback_logs_during_fit_for_model_checkpoint(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = tiny_module(tmp_path)
    callback = FIDCallback(every_n_steps=2, num_samples=3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/fid_standin", every_n_train_steps=2)
    t = trainer(tmp_path, max_steps=2, callbacks=[callback, checkpoint], limit_val_batches=0)
    t.fit(module, loader())
    assert set(callback.last) == {"val/fid_standin"}
    assert "val/fid_standin" in t.callback_metrics and "val/fid" not in t.callback_metrics
    assert checkpoint.best_model_path and Path(checkpoint.best_model_path).is_file()
    # the extractor is not part of the checkpoint
    state = torch.load(checkpoint.best_model_path, weights_only=False)["state_dict"]
    assert not any("convs" in key for key in state)


def test_reference_from_datamodule_split_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without fid_ref_stats the module computes the split's statistics once and caches them."""
    images = torch.randint(0, 256, (10, 1, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    calls = []

    def fake_load(name, split, data_dir=None):
        calls.append((name, split))
        return images, torch.zeros(10, dtype=torch.int64)

    monkeypatch.setattr("src.data.load_dataset", fake_load)

    class DM(L.LightningDataModule):
        dataset, data_dir = "fashion_mnist", None

        def val_dataloader(self):
            return loader()

    for _ in range(2):
        module = tiny_module(tmp_path, num_fid_samples=3, fid_ref_stats=None, fid_cache_dir=str(tmp_path / "c"))
        trainer(tmp_path).validate(module, datamodule=DM())
    files = list((tmp_path / "c").glob("*.npz"))
    assert len(files) == 1 and files[0].name.startswith("fashion_mnist-train-standin-8px-n10-")
    assert evaluation.load_statistics(files[0])[2]["num_images"] == 10


def test_offline_evaluate_command_on_pngs_and_npz(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    from src.evaluate import load_samples, main

    images = torch.randint(0, 256, (6, 3, 10, 10), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    (tmp_path / "pngs").mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "pngs" / f"{i}.png")
    np.savez(tmp_path / "samples.npz", images.permute(0, 2, 3, 1).numpy())  # NHWC, as the DDPM/ADM code
    assert torch.equal(load_samples(tmp_path / "pngs"), images)
    assert torch.equal(load_samples(tmp_path / "samples.npz"), images)
    mu, sigma = feature_statistics(StandInFeatures()(images)["pool"].double().numpy())
    save_statistics(tmp_path / "ref.npz", mu, sigma)
    results = main(["--samples", str(tmp_path / "pngs"), "--ref", str(tmp_path / "ref.npz"), "--extractor", "standin",
                    "--device", "cpu"])  # fmt: skip
    assert "fid" not in results and results["fid_standin"] == pytest.approx(0.0, abs=1e-6)
    assert results["num_samples"] == 6 and "NOT" in results["note"]
    assert json.loads(capsys.readouterr().out)["fid_standin"] == pytest.approx(results["fid_standin"])
