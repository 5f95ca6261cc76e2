"""FID/KID/IS/precision-recall: the math against scipy and torch-fidelity, the torchmetrics Metrics against the same
references (batching, reference statistics in the metric, the sync of 2 processes), the reference cache, the
Inception weights error, and the rule that stand-in numbers never land under `val/fid`."""

from __future__ import annotations

import json
import os
import socket
from functools import partial
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
    save_statistics,
    shard_indices,
)
from src.metrics.features import (
    INCEPTION_WEIGHTS_FILE,
    InceptionFeatures,
    InceptionWeightsNotFoundError,
    StandInFeatures,
)
from src.metrics.fid import FeatureStatistics, FrechetDistance, feature_statistics, frechet_distance
from src.metrics.scores import (
    InceptionScore,
    KernelInceptionDistance,
    PrecisionRecall,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)
from src.models.unet import UNet
from src.module import DiffusionModule
from src.optim import LinearWarmup
from src.options import Sampling, Schedule


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
        stats = FeatureStatistics(20)
        for chunk in features.split(batch):
            stats.update(chunk)
        mu, sigma = stats.compute()
        assert int(stats.num_samples) == 301 and mu.dtype == sigma.dtype == torch.float64
        np.testing.assert_allclose(mu, mu_ref, rtol=1e-12)
        np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-10, atol=1e-12)
    # merging two halves is the same as one pass (what the sync does across processes)
    a, b = FeatureStatistics(20), FeatureStatistics(20)
    a.update(features[:100])
    b.update(features[100:])
    a.merge_state(b)
    np.testing.assert_allclose(a.compute()[1], sigma_ref, rtol=1e-10, atol=1e-12)


def test_frechet_distance_metric_is_frechet_distance_of_the_statistics_and_holds_its_reference() -> None:
    rng = np.random.default_rng(5)
    generated = torch.from_numpy(rng.standard_normal((200, 12)) * 1.5 + 0.2).float()
    real = rng.standard_normal((300, 12))
    ref_mu, ref_sigma = feature_statistics(real)
    expected = frechet_distance(*feature_statistics(generated.double().numpy()), ref_mu, ref_sigma)
    assert expected == pytest.approx(scipy_frechet(*feature_statistics(generated.double().numpy()), ref_mu, ref_sigma),
                                     rel=1e-6)  # fmt: skip
    metric = FrechetDistance(12)
    metric.load_reference(ref_mu, ref_sigma)  # the cached .npz statistics go into the metric
    for chunk in generated.split(64):
        metric.update(chunk)
    value = metric.compute()
    assert value.dtype == torch.float64 and float(value) == pytest.approx(expected, rel=1e-10)
    # The reference is part of the metric's state_dict and survives reset(); the sample statistics do not.
    state = metric.state_dict()
    assert torch.equal(state["reference_mean"], torch.from_numpy(ref_mu)) and state["reference_cov"].shape == (12, 12)
    metric.reset()
    assert int(metric.num_samples) == 0 and metric.has_reference
    metric.update(generated)
    assert float(metric.compute()) == pytest.approx(expected, rel=1e-10)
    fresh = FrechetDistance(12)
    assert not fresh.has_reference
    fresh.load_state_dict(state)
    fresh.update(generated)
    assert fresh.has_reference and float(fresh.compute()) == pytest.approx(expected, rel=1e-10)
    # A set against its own statistics: 0.
    itself = FrechetDistance(12, reference=feature_statistics(generated))
    itself.update(generated)
    assert float(itself.compute()) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError, match="another feature extractor"):
        FrechetDistance(13).load_reference(ref_mu, ref_sigma)
    with pytest.raises(RuntimeError, match="no reference statistics"):
        without = FrechetDistance(12)
        without.update(generated)
        without.compute()


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


def test_kid_is_and_precision_recall_metrics_match_torch_fidelity_and_brute_force() -> None:
    from test_precision_recall import brute_force
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    rng = np.random.default_rng(6)
    generated = torch.from_numpy(rng.standard_normal((60, 16))).float()
    real = torch.from_numpy(rng.standard_normal((50, 16)) + 0.3).float()
    kid = KernelInceptionDistance(subsets=5, subset_size=40)
    prc = PrecisionRecall(k=3, batch_size=16)
    for metric in (kid, prc):
        for chunk in generated.split(25):  # batches, as a sampling loop gives them
            metric.update(chunk)
        metric.update(real, real=True)
    ref = kid_features_to_metric(generated.double(), real.double(), kid_subsets=5, kid_subset_size=40, verbose=False,
                                 rng_seed=2020, kid_kernel="poly", kid_kernel_poly_degree=3,
                                 kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1)  # fmt: skip
    mean, std = kid.compute()
    assert float(mean) == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-10)
    assert float(std) == pytest.approx(ref["kernel_inception_distance_std"], rel=1e-10)
    precision, recall = prc.compute()
    assert (float(precision), float(recall)) == pytest.approx(
        brute_force(real.double().numpy(), generated.double().numpy(), 3), abs=1e-12
    )

    logits = torch.from_numpy(rng.standard_normal((100, 10)) * 3)
    isc = InceptionScore(splits=4)
    for chunk in logits.split(30):
        isc.update(chunk)
    ref = isc_features_to_metric(logits, splits=4)
    assert tuple(float(v) for v in isc.compute()) == pytest.approx(
        (ref["inception_score_mean"], ref["inception_score_std"]), rel=1e-10
    )
    kid.reset()
    with pytest.raises(RuntimeError, match="generated and real features"), pytest.warns(UserWarning, match="before"):
        kid.compute()


# ---------------------------------------------------------------------------------------------- DDP
def fake_images(indices: torch.Tensor) -> torch.Tensor:
    """A deterministic uint8 image per sample index (what a sampler with per-index noise produces)."""
    return torch.stack(
        [torch.randint(0, 256, (1, 12, 12), generator=torch.Generator().manual_seed(int(i)), dtype=torch.uint8)
         for i in indices]
    )  # fmt: skip


class FakeDiffusionModule:
    """What `FIDCallback.compute` needs of a LightningModule: `device` and `model.sample_indices` (images in
    [-1, 1]); the fake is its own `model`."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.seen: list[int] = []
        self.model = self

    def sample_indices(self, indices: torch.Tensor) -> torch.Tensor:
        self.seen.extend(indices.tolist())
        return fake_images(indices).float() / 127.5 - 1.0


class FakeTrainer:
    def __init__(self, rank: int, world_size: int) -> None:
        self.global_rank, self.world_size = rank, world_size


def score_features(num: int = 40) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generated features, real features and logits for the KID / IS / precision-recall sync."""
    rng = np.random.default_rng(7)
    return (torch.from_numpy(rng.standard_normal((num, 8))), torch.from_numpy(rng.standard_normal((num, 8)) + 0.5),
            torch.from_numpy(rng.standard_normal((num, 5)) * 2))  # fmt: skip


def one_process_scores(generated, real, logits) -> dict[str, list[float]]:
    return {
        "kid": list(kernel_inception_distance(generated, real, subsets=4, subset_size=15)),
        "is": list(inception_score(logits, splits=3)),
        "prc": list(precision_recall(real, generated, k=3)),
    }


def _ddp_worker(rank: int, world_size: int, port: int, num_samples: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        # FID as the callback computes it: this rank's shard of the samples, summed by the metric's sync.
        module = FakeDiffusionModule()
        callback = FIDCallback(num_samples, extractor="standin", ref_stats=f"{out}/ref.npz", batch_size=2)
        fid = callback.compute(module, FakeTrainer(rank, world_size))["val/fid_standin"]
        stats = FeatureStatistics(StandInFeatures().pool_dim)
        for chunk in shard_indices(num_samples, rank, world_size).split(2):
            stats.update(StandInFeatures()(fake_images(chunk))["pool"])
        mu, sigma = stats.compute()
        # KID / IS / precision-recall: "cat" states; each rank holds a contiguous block of the same order.
        generated, real, logits = score_features()
        block = slice(rank * len(generated) // world_size, (rank + 1) * len(generated) // world_size)
        kid, prc = KernelInceptionDistance(subsets=4, subset_size=15), PrecisionRecall(k=3)
        for metric in (kid, prc):
            metric.update(generated[block])
            metric.update(real[block], real=True)
        isc = InceptionScore(splits=3)
        isc.update(logits[block])
        scores = {name: [float(v) for v in m.compute()] for name, m in (("kid", kid), ("is", isc), ("prc", prc))}
        np.savez(f"{out}/rank{rank}.npz", mu=mu.numpy(), sigma=sigma.numpy(), seen=np.array(module.seen),
                 count=stats.computed_num_samples, fid=fid, scores=json.dumps(scores))  # fmt: skip
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_statistics_equal_one_process_with_exactly_n_samples(tmp_path: Path) -> None:
    num_samples = 7  # not divisible by the 2 processes
    assert [shard_indices(num_samples, r, 2).tolist() for r in range(2)] == [[0, 2, 4, 6], [1, 3, 5]]
    ref_images = torch.randint(0, 256, (20, 1, 12, 12), generator=torch.Generator().manual_seed(9), dtype=torch.uint8)
    ref_mu, ref_sigma = feature_statistics(StandInFeatures()(ref_images)["pool"].double().numpy())
    save_statistics(tmp_path / "ref.npz", ref_mu, ref_sigma)
    mp.spawn(_ddp_worker, args=(2, _free_port(), num_samples, str(tmp_path)), nprocs=2, join=True)
    single = FeatureStatistics(StandInFeatures().pool_dim)
    for chunk in torch.arange(num_samples).split(3):
        single.update(StandInFeatures()(fake_images(chunk))["pool"])
    mu_ref, sigma_ref = (x.numpy() for x in single.compute())
    one_process = FakeDiffusionModule()
    callback = FIDCallback(num_samples, extractor="standin", ref_stats=str(tmp_path / "ref.npz"), batch_size=3)
    fid_ref = callback.compute(one_process)["val/fid_standin"]
    assert one_process.seen == list(range(num_samples))
    results = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    assert sorted(np.concatenate([r["seen"] for r in results]).tolist()) == list(range(num_samples))
    # Equal up to float32 round-off of the features (conv batches differ: 2 + 2 + 2 + 1 images vs 3 + 3 + 1).
    for r in results:
        assert int(r["count"]) == num_samples
        np.testing.assert_allclose(r["mu"], mu_ref, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(r["sigma"], sigma_ref, rtol=1e-5, atol=1e-7)
        assert float(r["fid"]) == pytest.approx(fid_ref, rel=1e-6)
    # The callback's FID is the Fréchet distance of the samples' statistics to the loaded reference.
    assert fid_ref == pytest.approx(frechet_distance(mu_ref, sigma_ref, ref_mu, ref_sigma), rel=1e-10)
    # KID, IS and precision/recall gathered from 2 processes: the one-process values of all the features.
    expected = one_process_scores(*score_features())
    for r in results:
        for name, values in json.loads(str(r["scores"])).items():
            assert values == pytest.approx(expected[name], rel=1e-10), name


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
    assert "\n" not in message and INCEPTION_WEIGHTS_FILE in message and "fid.weights_path" in message

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
def tiny_module(tmp_path: Path) -> DiffusionModule:
    net = UNet(in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
               image_size=8, norm_groups=4, mid_attention=False)  # fmt: skip
    return DiffusionModule(
        net,
        lr_scheduler=partial(LinearWarmup, warmup_steps=1),
        schedule=Schedule(timesteps=20),
        sampling=Sampling(steps=2),
    )


def fid_callback(tmp_path: Path, **kwargs) -> FIDCallback:
    # Reference statistics of random images through the stand-in extractor.
    ref_images = torch.randint(0, 256, (40, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    mu, sigma = feature_statistics(StandInFeatures()(ref_images)["pool"].double().numpy())
    save_statistics(tmp_path / "ref.npz", mu, sigma)
    defaults = dict(extractor="standin", ref_stats=str(tmp_path / "ref.npz"), batch_size=4)
    return FIDCallback(**{**defaults, **kwargs})


def loader() -> DataLoader:
    images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return DataLoader(list(zip(images, torch.zeros(8, dtype=torch.int64), strict=True)), batch_size=4)


def trainer(root: Path, **kwargs) -> L.Trainer:
    return L.Trainer(default_root_dir=root, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, **kwargs)  # fmt: skip


def test_standin_numbers_never_land_under_val_fid(tmp_path: Path) -> None:
    assert metric_name("inception") == "val/fid"
    assert metric_name("standin") == "val/fid_standin"
    module = tiny_module(tmp_path)
    metrics = trainer(tmp_path, callbacks=[fid_callback(tmp_path, num_samples=5)]).validate(module, loader())[0]
    assert "val/fid_standin" in metrics and "val/loss" in metrics
    assert not any(key == "val/fid" for key in metrics)
    assert np.isfinite(metrics["val/fid_standin"]) and metrics["val/fid_standin"] > 0


def test_fid_callback_logs_during_fit_for_model_checkpoint(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = tiny_module(tmp_path)
    callback = fid_callback(tmp_path, every_n_steps=2, num_samples=3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/fid_standin", every_n_train_steps=2)
    t = trainer(tmp_path, max_steps=2, callbacks=[callback, checkpoint], limit_val_batches=0)
    t.fit(module, loader())
    assert set(callback.last) == {"val/fid_standin"}
    assert "val/fid_standin" in t.callback_metrics and "val/fid" not in t.callback_metrics
    assert checkpoint.best_model_path and Path(checkpoint.best_model_path).is_file()
    # the extractor is not part of the checkpoint
    state = torch.load(checkpoint.best_model_path, weights_only=False)["state_dict"]
    assert not any("convs" in key for key in state)


def test_fid_options_that_cannot_work_fail_at_once_naming_the_option() -> None:
    from src.errors import ConfigError

    for kwargs, option in [({"num_samples": 1}, "--fid.num_samples"), ({"every_n_steps": 5}, "--fid.num_samples"),
                           ({"extractor": "resnet"}, "--fid.extractor"), ({"ref_split": "val"}, "--fid.ref_split"),
                           ({"batch_size": 0}, "--fid.batch_size")]:  # fmt: skip
        with pytest.raises(ConfigError, match=option):
            FIDCallback(**kwargs)
    assert FIDCallback().num_samples == 0 and FIDCallback().every_n_steps == 0  # off unless asked for


def test_reference_from_datamodule_split_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ref_stats the callback computes the split's statistics once and caches them."""
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
        callback = fid_callback(tmp_path, num_samples=3, ref_stats=None, cache_dir=str(tmp_path / "c"))
        trainer(tmp_path, callbacks=[callback]).validate(tiny_module(tmp_path), datamodule=DM())
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
