"""FID of EMA samples: in `validate`, and every N optimizer steps during fit (logged as `val/fid`, so that
ModelCheckpoint can monitor it). The callback owns the metric, the feature extractor and the reference statistics.

The command line adds it as the `fid` group (`src/main.py`): `--fid.num_samples N` makes `validate` log FID,
`--fid.every_n_steps K` adds it every K steps of fit.
"""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from tqdm.auto import tqdm

from src.errors import ConfigError
from src.images import to_uint8
from src.metrics import evaluation
from src.metrics.features import EXTRACTORS, build_feature_extractor, extractor_id, is_classifier_file
from src.metrics.fid import FeatureStatistics, FrechetDistance


class FIDCallback(Callback):
    """Generate `num_samples` images with the EMA weights and the model's sampler options (sample i from its own
    noise, `sample_indices`; rank r of W takes r, r + W, ...: exactly N samples whatever the number of processes)
    and log the Fréchet distance of their features to the reference statistics: `val/fid` with the standard
    Inception network, `val/fid_standin` with the offline stand-in (NOT an FID), `val/fd_classifier` with a
    classifier file. The statistics are a torchmetrics `FrechetDistance`, summed across processes by its sync.
    With a classifier file it also logs `val/classifier_accuracy` (the file's accuracy on the data set's real test
    split, computed once and cached) and, for conditional samples, `val/label_agreement` (the fraction the
    classifier gives the label they were drawn with; `src/metrics/labels.py`).

    In fit, monitor it with `ModelCheckpoint(monitor="val/fid", mode="min", every_n_train_steps=<every_n_steps>)`.
    Few samples (e.g. 5,000) bias FID upwards; compare such numbers only with each other.

    Args:
        num_samples: generated samples per evaluation, over all processes (0: no FID; 50000 for the papers' numbers).
        every_n_steps: fit: optimizer steps between evaluations (0: none during fit; `validate` evaluates whenever
            num_samples > 0).
        extractor: "inception" (the standard FID network, torch-fidelity's), "standin" (a small offline network
            for smoke tests, logged as `val/fid_standin`: NOT an FID) or the path of a classifier file (logged as
            `val/fd_classifier`; configs/fashion_mnist_fd_classifier.yaml trains one).
        weights_path: the InceptionV3 weights file (default: $DDIM_FID_WEIGHTS, then torch-fidelity's download
            location; docs/evaluation.md).
        ref_stats: a .npz with `mu` and `sigma` (pytorch-fid / torch-fidelity format) used as is; None: computed
            from the data set's `ref_split` once and cached.
        ref_split: "train" (the convention for CIFAR-10 FIDs) or "test".
        cache_dir: folder of cached reference statistics (default: $DDIM_FID_CACHE, then
            ~/.cache/ddim-lightning/fid_stats).
        batch_size: images per sampling and feature-extraction batch.
    """

    def __init__(
        self,
        num_samples: int = 0,
        every_n_steps: int = 0,
        extractor: str = "inception",
        weights_path: str | None = None,
        ref_stats: str | None = None,
        ref_split: str = "train",
        cache_dir: str | None = None,
        batch_size: int = 250,
    ) -> None:
        if num_samples < 0 or num_samples == 1 or every_n_steps < 0 or (every_n_steps > 0 and num_samples < 2):
            raise ConfigError(
                f"--fid.num_samples must be 0 (off) or >= 2 (>= 2 when --fid.every_n_steps > 0) and "
                f"--fid.every_n_steps >= 0, got {num_samples} and {every_n_steps}"
            )
        if extractor not in EXTRACTORS and not is_classifier_file(extractor):
            raise ConfigError(
                f"--fid.extractor {extractor!r} is unknown; choose one of {', '.join(EXTRACTORS)} "
                "or a classifier file (configs/fashion_mnist_fd_classifier.yaml trains one)"
            )
        if ref_split not in ("train", "test"):
            raise ConfigError(f"--fid.ref_split must be train or test, got {ref_split!r}")
        if batch_size < 1:
            raise ConfigError(f"--fid.batch_size must be >= 1, got {batch_size}")
        self.num_samples = num_samples
        self.every_n_steps = every_n_steps
        self.extractor_name = extractor
        self.weights_path = weights_path
        self.ref_stats = ref_stats
        self.ref_split = ref_split
        self.cache_dir = cache_dir
        self.batch_size = batch_size
        self.last: dict[str, float] = {}
        self._last_step = -1
        # Built on first use (a config that never evaluates never needs the Inception weights). The callback's
        # state_dict is empty, so neither the extractor nor the metric lands in checkpoints.
        self._extractor: nn.Module | None = None
        self.metric: FrechetDistance | None = None
        self._accuracy: float | None = None  # a classifier extractor's test accuracy

    # ------------------------------------------------------------------ Lightning hooks
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # `validate` only: during fit the periodic evaluation below decides (a validation loop runs far more often).
        if self.num_samples > 0 and trainer.state.fn == "validate":
            for name, value in self.compute(pl_module, trainer).items():
                pl_module.log(name, value)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps <= 0 or step == 0 or step % self.every_n_steps != 0 or step == self._last_step:
            return
        self._last_step = step  # once per optimizer step, also under gradient accumulation
        self.compute(pl_module, trainer)
        for name, value in self.last.items():
            # For ModelCheckpoint(monitor=...) and the progress bar (callback metrics)...
            pl_module.log(name, value, on_step=True, on_epoch=False)
        # ...and straight to the loggers: a step's logged values reach them only every `log_every_n_steps` steps,
        # which would drop an FID computed at any other step.
        for logger in trainer.loggers:
            logger.log_metrics(self.last, step=step)

    # ------------------------------------------------------------------ FID
    def extractor(self, device: torch.device | str) -> nn.Module:
        if self._extractor is None:
            self._extractor = build_feature_extractor(self.extractor_name, self.weights_path)
        return self._extractor.to(device)

    def reference(self, trainer: L.Trainer | None, device: torch.device | str) -> FrechetDistance:
        """The metric, with the reference statistics loaded into it: `ref_stats` as is, else the data set's
        split, computed over all processes (sharded as the samples are) and cached on disk."""
        if self.metric is not None:
            return self.metric.to(device)
        extractor = self.extractor(device)
        metric = FrechetDistance(extractor.pool_dim).to(device)
        if self.ref_stats:
            mu, sigma, _ = evaluation.load_statistics(self.ref_stats)
        else:
            datamodule = getattr(trainer, "datamodule", None)
            if datamodule is None or not hasattr(datamodule, "dataset"):
                raise ConfigError("FID needs reference statistics: pass --fid.ref_stats FILE.npz or a datamodule")
            if hasattr(datamodule, "reference_images"):  # ImageDataModule: a built-in split or a folder's cache
                images, name = datamodule.reference_images(self.ref_split)
            else:
                from src.data import load_dataset

                name = datamodule.dataset
                images = load_dataset(name, self.ref_split, datamodule.data_dir)[0]
            key = evaluation.reference_key(name, self.ref_split, extractor_id(extractor), images.shape[-1], len(images))
            path, cached = evaluation.read_cached_statistics(key, self.cache_dir)
            # Computing is a collective (the metric's sync): any process without a valid file makes all compute.
            computed = trainer.strategy.reduce_boolean_decision(cached is None, all=False)
            if computed:
                statistics = FeatureStatistics(extractor.pool_dim).to(device)
                mine = evaluation.shard_indices(len(images), trainer.global_rank, trainer.world_size)
                bar = tqdm(total=len(mine), desc="FID reference", unit="img", leave=False,
                           disable=not trainer.is_global_zero)  # fmt: skip
                for chunk in mine.split(self.batch_size):
                    statistics.update(extractor(images[chunk].to(device))["pool"])
                    bar.update(len(chunk))
                bar.close()
                mu, sigma = (x.cpu().numpy() for x in statistics.compute())
                if trainer.is_global_zero:
                    evaluation.save_statistics(path, mu, sigma, key)
            else:
                mu, sigma = cached
            rank_zero_info(f"FID reference statistics {'computed and saved to' if computed else 'loaded from'} {path}")
        metric.load_reference(mu, sigma)
        self.metric = metric
        return metric

    @torch.no_grad()
    def compute(
        self, pl_module: L.LightningModule, trainer: L.Trainer | None = None, num_samples: int | None = None
    ) -> dict[str, float]:
        """{"val/fid" (or "val/fid_standin", "val/fd_classifier"): value} of `num_samples` (default: the
        callback's) EMA samples of `pl_module`; also kept as `last`. Every process must call it. Without a trainer
        it runs as one process and needs `ref_stats`."""
        num_samples = self.num_samples if num_samples is None else num_samples
        device = pl_module.device
        extractor = self.extractor(device)
        metric = self.reference(trainer, device)
        # Fresh states in the current grad mode: validate runs in inference mode, fit's hooks do not.
        metric.reset()
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        indices = evaluation.shard_indices(num_samples, rank, world_size)
        start = time.perf_counter()
        bar = tqdm(total=len(indices), desc="FID: sampling + features", unit="img", leave=False, disable=rank != 0)
        is_classifier = extractor.name == "classifier"
        labels_for = getattr(pl_module.model, "labels_for", None) if is_classifier else None
        agreement = torch.zeros(2, dtype=torch.float64, device=device)  # (agreeing, labelled) samples
        for chunk in indices.split(self.batch_size):
            images: Tensor = to_uint8(pl_module.model.sample_indices(chunk))
            features = extractor(images.to(device))
            metric.update(features["pool"])
            labels = labels_for(chunk) if labels_for is not None else None
            if labels is not None:  # conditional samples: does the classifier give them their label?
                predicted = features["class_logits"].argmax(1)
                agreement += torch.stack(
                    [(predicted == labels.to(device)).sum(), torch.tensor(len(chunk), device=device)]
                )
            bar.update(len(chunk))
        bar.close()
        value = float(metric.compute())  # over all processes (torchmetrics' sync)
        if metric.computed_num_samples != num_samples:
            raise RuntimeError(f"FID statistics hold {metric.computed_num_samples} samples, expected {num_samples}")
        seconds_per_1k = (time.perf_counter() - start) / max(num_samples, 1) * 1000.0
        name = evaluation.metric_name(extractor.name, "fid")
        self.last = {name: value}
        label = {"inception": "", "classifier": f" (features of {getattr(extractor, 'path', '')}: NOT an FID)"}.get(
            extractor.name, " (stand-in features: NOT an FID, not comparable to papers)"
        )
        if is_classifier:
            if trainer is not None and trainer.world_size > 1:
                agreement = trainer.strategy.reduce(agreement, reduce_op="sum")
            extra = []
            accuracy = self.classifier_accuracy(trainer, device)
            if accuracy is not None:
                self.last["val/classifier_accuracy"] = accuracy
                extra.append(f"classifier test accuracy {accuracy:.2%}")
            if agreement[1] > 0:
                self.last["val/label_agreement"] = float(agreement[0] / agreement[1])
                extra.append(f"label agreement {self.last['val/label_agreement']:.2%}")
            label += "".join(f"; {text}" for text in extra)
        rank_zero_info(
            f"{name} = {value:.4f} from {num_samples} samples{label}; {seconds_per_1k:.1f} s per 1,000 samples"
        )
        return self.last

    def classifier_accuracy(self, trainer: L.Trainer | None, device: torch.device | str) -> float | None:
        """A classifier extractor's accuracy on the built-in data set's test split (cached on disk by the file's
        hash, `src.metrics.labels`); None without a trainer's built-in data set (a folder, or `ref_stats` alone)."""
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        if datamodule is None or getattr(datamodule, "is_folder", False) or not hasattr(datamodule, "dataset"):
            return None
        if self._accuracy is None:
            from src.data import load_dataset
            from src.metrics.labels import classifier_test_accuracy

            images, labels = load_dataset(datamodule.dataset, "test", getattr(datamodule, "data_dir", None))
            self._accuracy = classifier_test_accuracy(
                self.extractor(device), datamodule.dataset, images, labels, self.batch_size, device, self.cache_dir
            )
        return self._accuracy
