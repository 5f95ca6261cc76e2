"""DiffusionModule: Lightning wiring around a noise-prediction network and a noise schedule.

The math lives in `src/diffusion/` (schedule, loss, samplers) and the network in `src/models/unet.py`;
this file only orchestrates: the training step (DDPM Algorithm 1), the optimizer and its warm-up, the EMA
weights, and sampling with those EMA weights for validation, callbacks and `predict`.
"""

from __future__ import annotations

import importlib

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from src.diffusion.guidance import ClassifierGuidance, classifier_free_guidance, drop_labels
from src.diffusion.k_samplers import CONTINUOUS_OPTIONS
from src.diffusion.likelihood import nll_bits_per_dim
from src.diffusion.losses import l_hybrid, l_simple, sample_timesteps
from src.diffusion.ode_likelihood import ode_nll_bits_per_dim
from src.diffusion.parameterization import PREDICTIONS, EpsPredictor
from src.diffusion.samplers import CONTINUOUS_SAMPLERS, DDPM_VARIANCES, SAMPLERS, SKIP_TYPES, sample
from src.diffusion.schedule import NoiseSchedule
from src.errors import ConfigError
from src.images import to_uint8
from src.metrics import evaluation
from src.metrics.features import EXTRACTORS, build_feature_extractor, extractor_id, is_classifier_file
from src.models.ema import EMA
from src.seeding import sample_generators


def linear_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int) -> dict:
    """Lightning's lr-scheduler entry for DDPM's schedule: linear warm-up over the first `warmup_steps` optimizer
    steps, then constant."""
    warmup = max(int(warmup_steps), 0)

    def lr_factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0

    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor), "interval": "step"}


def _build_net(spec: dict) -> nn.Module:
    """Instantiate {"class_path": "pkg.mod.Class", "init_args": {...}} (the format configs and checkpoints use)."""
    module_name, _, class_name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)(**spec.get("init_args", {}))


class DiffusionModule(L.LightningModule):
    """Trains `net` as eps_theta with L_simple and samples from its EMA copy.

    Args:
        net: the noise-prediction network, `net(x_t, t) -> eps` (e.g. `src.models.unet.UNet`).
        schedule: noise schedule name, "linear" (DDPM) or "cosine" (improved DDPM).
        timesteps: number of diffusion steps T.
        beta_start: first beta of the linear schedule.
        beta_end: last beta of the linear schedule.
        lr: peak learning rate of Adam(W) (2e-4 in DDPM for CIFAR-10).
        weight_decay: AdamW weight decay (0 in DDPM).
        adam_betas: Adam's (beta1, beta2).
        warmup_steps: linear learning-rate warm-up from 0 over this many optimizer steps (5000 in DDPM).
        ema_decay: decay of the weights' exponential moving average (0.9999 in DDPM).
        ema_warmup: use the decay warm-up min(decay, (1 + n) / (10 + n)) (helps short runs).
        sampler: "ddim", "ddpm", "ddpm_respaced" (ancestral on `sampling_steps` respaced steps), "dpmpp_2m"
            (DPM-Solver++(2M)), or one of the SDE / probability-flow ODE samplers on `sampling_steps` Karras noise
            levels: "euler_maruyama", "pc" (predictor-corrector), "heun" (EDM), "dpmpp_3m", "unipc", "ipndm"
            (src/diffusion/k_samplers.py); used by validation grids, the sample callback, FID and predict.
        ode_bpd_batches: `test` also logs `test/ode_bpd`, the exact NLL through the probability-flow ODE (Song et al.
            2021, appendix D; adaptive RK45 with a Hutchinson divergence, uniform dequantisation), on this many
            test batches (0: off; each image costs some hundreds of network calls with gradients).
        sampler_options: options of the SDE / ODE samplers, e.g. {rho: 7, churn: 0, snr: 0.16, corrector_steps: 1,
            solver_order: 2} (see `k_samplers.continuous_sample`); None: their defaults.
        sampling_steps: DDIM / DPM-Solver++ / respaced-DDPM steps (ignored by "ddpm", which runs all T steps).
        eta: DDIM eta in [0, 1]: 0 deterministic DDIM, 1 DDPM-like.
        skip: timestep spacing: "uniform", "quad", "trailing", "linspace" or "logsnr" (uniform in log-SNR,
            DPM-Solver's choice; best for "dpmpp_2m").
        ddpm_variance: "fixed_small" (beta-tilde), "fixed_large" (beta) or "learned" (improved DDPM; needs a net
            with 2 x in_channels outputs) for the "ddpm" samplers.
        clip_denoised: clamp the predicted x_0 to [-1, 1] at every sampling step.
        sample_seed: seed of the predict noise; sample i of a run always starts from the same x_T.
        num_fid_samples: `validate` generates this many samples (over all processes) and logs their FID against
            the reference statistics as `val/fid` (0: off; 50000 for the papers' numbers).
        fid_extractor: "inception" (the standard FID network, torch-fidelity's) or "standin" (a small offline
            network for smoke tests, logged as `val/fid_standin`: NOT an FID) or the path of a classifier file
            (configs/fashion_mnist_fd_classifier.yaml), logged as `val/fd_classifier` (README "Quality measure").
        fid_weights_path: the InceptionV3 weights file (default: $DDIM_FID_WEIGHTS, then torch-fidelity's
            download).
        fid_ref_stats: a .npz with `mu` and `sigma` (pytorch-fid / torch-fidelity format) used as is; None:
            computed from the data set's `fid_ref_split` once and cached.
        fid_ref_split: "train" (the convention for CIFAR-10 FIDs) or "test".
        fid_cache_dir: folder of cached reference statistics (default: $DDIM_FID_CACHE, then
            ~/.cache/ddim-lightning/fid_stats).
        fid_batch_size: images per sampling and feature-extraction batch.
        bpd_timesteps: `test` logs the variational-bound NLL `test/bpd` with this many KL timesteps (stratified;
            None: all T, exact; 0: off).
        prediction: what the network predicts, "eps" (DDPM), "x0" or "v" (Salimans & Ho 2022); the loss regresses
            that target and sampling converts it to eps (src/diffusion/parameterization.py). Fixed by a checkpoint.
        p_uncond: class-conditional nets (net.num_classes set): probability of training on the null label, which
            makes the net also unconditional, for classifier-free guidance (0.1; Ho & Salimans 2022).
        guidance_scale: classifier-free guidance scale s = 1 + w (diffusers' convention; Ho & Salimans' weight is
            w): eps~ = s eps(x, t, y) + (1 - s) eps(x, t, null). 1: the plain conditional model, 0: unconditional,
            > 1: stronger guidance. Conditional nets only.
        sample_labels: conditional nets: the labels of predict / FID / grid samples, used in turn (sample i gets
            sample_labels[i % len]); None: all classes in turn (label = i % num_classes).
        vlb_weight: lambda of improved DDPM's L_hybrid = L_simple + lambda L_vlb (0.001), used when the net has
            2 x in_channels outputs (a learned variance).
        classifier_path: a `src.models.classifier.NoisyClassifier` file (`NoisyClassifier.save`) for classifier
            guidance (Dhariwal & Nichol 2021); sample labels then come from its classes for unconditional nets.
        classifier_scale: classifier guidance scale s: eps^ = eps - sqrt(1 - a_t) s grad log p(y | x_t) (0: off).
        channels_last: train in NHWC memory layout (faster convolutions on GPUs with tensor cores; +9% on the
            2-core AVX-512 CPU we measured).
        compile: train through `torch.compile(net)`; the compiled wrapper is not a submodule, so checkpoint keys stay
            `net.*` and checkpoints load with or without it.
        fused_optimizer: AdamW's fused kernel (one kernel for the whole update; 4.6x faster than the foreach
            update on our CPU, for the 1.1M-parameter Fashion-MNIST net). It also skips a non-finite step on the
            device, without a host sync (src/callbacks/faults.py). None: fused on CUDA and CPU, foreach elsewhere.
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: str = "linear",
        timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 5000,
        ema_decay: float = 0.9999,
        ema_warmup: bool = True,
        sampler: str = "ddim",
        sampling_steps: int = 50,
        eta: float = 0.0,
        skip: str = "uniform",
        ddpm_variance: str = "fixed_small",
        clip_denoised: bool = False,
        sample_seed: int = 0,
        num_fid_samples: int = 0,
        fid_extractor: str = "inception",
        fid_weights_path: str | None = None,
        fid_ref_stats: str | None = None,
        fid_ref_split: str = "train",
        fid_cache_dir: str | None = None,
        fid_batch_size: int = 250,
        bpd_timesteps: int | None = 0,
        prediction: str = "eps",
        p_uncond: float = 0.1,
        guidance_scale: float = 1.0,
        sample_labels: list[int] | None = None,
        vlb_weight: float = 0.001,
        classifier_path: str | None = None,
        classifier_scale: float = 0.0,
        channels_last: bool = False,
        compile: bool = False,
        fused_optimizer: bool | None = None,
        sampler_options: dict[str, float] | None = None,
        ode_bpd_batches: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        if sampler not in SAMPLERS:
            raise ConfigError(f"--model.sampler {sampler!r} is unknown; choose one of {', '.join(SAMPLERS)}")
        if sampler_options and sampler not in CONTINUOUS_SAMPLERS:
            raise ConfigError(
                f"--model.sampler_options apply to {', '.join(CONTINUOUS_SAMPLERS)}, not to --model.sampler {sampler}"
            )
        unknown = sorted(set(sampler_options or {}) - set(CONTINUOUS_OPTIONS))
        if unknown:
            raise ConfigError(
                f"--model.sampler_options: unknown {', '.join(unknown)}; choose from {', '.join(CONTINUOUS_OPTIONS)}"
            )
        if skip not in SKIP_TYPES:
            raise ConfigError(f"--model.skip {skip!r} is unknown; choose one of {', '.join(SKIP_TYPES)}")
        if ddpm_variance not in DDPM_VARIANCES + ("learned",):
            raise ConfigError(
                f"--model.ddpm_variance {ddpm_variance!r} is unknown; choose one of {', '.join(DDPM_VARIANCES)}, "
                "learned"
            )
        if prediction not in PREDICTIONS:
            raise ConfigError(f"--model.prediction {prediction!r} is unknown; choose one of {', '.join(PREDICTIONS)}")
        if not 0.0 <= p_uncond <= 1.0:
            raise ConfigError(f"--model.p_uncond must be in [0, 1], got {p_uncond}")
        if classifier_scale != 0.0 and not classifier_path:
            raise ConfigError("--model.classifier_scale needs --model.classifier_path (a NoisyClassifier file)")
        if not 0.0 <= eta <= 1.0:
            raise ConfigError(f"--model.eta must be in [0, 1], got {eta}")
        if not 1 <= sampling_steps <= timesteps:
            raise ConfigError(
                f"--model.sampling_steps must be in [1, {timesteps}] (--model.timesteps), got {sampling_steps}"
            )
        if fid_extractor not in EXTRACTORS and not is_classifier_file(fid_extractor):
            raise ConfigError(
                f"--model.fid_extractor {fid_extractor!r} is unknown; choose one of {', '.join(EXTRACTORS)} "
                "or a classifier file (configs/fashion_mnist_fd_classifier.yaml trains one)"
            )
        if fid_ref_split not in ("train", "test"):
            raise ConfigError(f"--model.fid_ref_split must be train or test, got {fid_ref_split!r}")
        if isinstance(net, dict):  # load_from_checkpoint passes the recorded {"class_path", "init_args"}
            net = _build_net(net)
        if hasattr(net, "config"):
            # Record the network's class and constructor arguments, so that a checkpoint alone rebuilds the model
            # (`--ckpt_path` in the CLI, `DiffusionModule.load_from_checkpoint`); the module itself is no hparam.
            cls = type(net)
            self.hparams["net"] = {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(net.config)}
        self.net = net
        # Improved DDPM: a net with twice the image channels predicts (eps-or-x0-or-v, v_variance).
        self.learned_variance = getattr(net, "out_channels", None) == 2 * getattr(net, "in_channels", -1)
        if ddpm_variance == "learned" and not self.learned_variance:
            raise ConfigError(
                "--model.ddpm_variance learned needs a net with 2 x in_channels outputs "
                "(--model.net.init_args.out_channels)"
            )
        num_classes = getattr(net, "num_classes", None)
        if sample_labels is not None and (not num_classes or not all(0 <= y < num_classes for y in sample_labels)):
            raise ConfigError(f"--model.sample_labels needs a conditional net and labels in [0, {num_classes})")
        # FID extractor and reference statistics, built on first use; a plain dict keeps them out of checkpoints.
        self._fid: dict[str, object] = {}
        self._guidance_classifier: dict[str, nn.Module] = {}  # likewise for the classifier-guidance classifier
        self.ema = EMA(net, decay=ema_decay, warmup=ema_warmup)
        self.schedule = NoiseSchedule.from_options(schedule, timesteps, beta_start, beta_end)

    # ------------------------------------------------------------------ shapes
    @property
    def image_shape(self) -> tuple[int, int, int]:
        size = self.net.image_size
        return (self.net.in_channels, size, size)

    def on_fit_start(self) -> None:
        self.schedule = self.schedule.to(self.device)
        if self.hparams.channels_last:
            self.net.to(memory_format=torch.channels_last)
            self.ema.to(memory_format=torch.channels_last)
        if self.hparams.compile and "_compiled_net" not in self.__dict__:
            # Stored past nn.Module's registry: a registered OptimizedModule would add "_orig_mod." copies of every
            # key to the state dict. It shares its parameters with self.net.
            self.__dict__["_compiled_net"] = torch.compile(self.net)

    @property
    def train_net(self) -> nn.Module:
        """The network the training step calls: `net`, or its compiled wrapper with `compile`."""
        return self.__dict__.get("_compiled_net", self.net)

    def on_predict_start(self) -> None:
        self.schedule = self.schedule.to(self.device)

    on_validation_start = on_test_start = on_predict_start

    # ------------------------------------------------------------------ training (Algorithm 1)
    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """The EMA net's output (what sampling uses), in its `prediction` target; `y`: labels of a conditional net."""
        return self.ema(x_t, t) if y is None else self.ema(x_t, t, y)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images = batch[0]
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        # t is drawn here (as l_simple would, same RNG order) and kept so that a non-finite loss can be reported
        # with the t values that produced it (src/callbacks/faults.py).
        self.last_t = sample_timesteps(images.shape[0], self.schedule.num_timesteps, images.device)
        kwargs = {}
        if self.conditional:
            # Classifier-free guidance training: the null label with probability p_uncond (Ho & Salimans, Alg. 1).
            kwargs["y"] = drop_labels(batch[1], self.hparams.p_uncond, self.net.num_classes)
        if self.learned_variance:
            terms = l_hybrid(self.train_net, images, self.schedule, t=self.last_t, prediction=self.hparams.prediction,
                             vlb_weight=self.hparams.vlb_weight, **kwargs)  # fmt: skip
            self.log_dict({"train/mse": terms["mse"].mean(), "train/vb": terms["vb"].mean()})
            loss = terms["loss"].mean()
        else:
            loss = l_simple(self.train_net, images, self.schedule, t=self.last_t, prediction=self.hparams.prediction,
                            **kwargs).mean()  # fmt: skip
        self.last_loss = loss.detach()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Norm before clipping, so a clipped run still shows how large its gradients were.
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        if grads:
            self.log(
                "train/grad_norm",
                torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])),
            )
        self.log("train/lr", optimizer.param_groups[0]["lr"], prog_bar=True)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # One EMA update per optimizer step (not per micro-batch under gradient accumulation).
        self.ema.update(self.net, self.trainer.global_step)

    def _use_fused_optimizer(self) -> bool:
        fused = self.hparams.get("fused_optimizer")
        return self.device.type in ("cuda", "cpu") if fused is None else bool(fused)

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        # Without a GradScaler (fp32, bf16-mixed) the gradients are not scaled, so they are clipped here directly.
        # Lightning's mixed-precision plugin refuses to clip for any optimizer that unscales internally (the fused
        # AdamW), which is only needed under fp16's GradScaler: bf16-mixed with clipping and fused AdamW (the GPU
        # configs) would otherwise fail at the first step.
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if not gradient_clip_val:
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def configure_optimizers(self):
        hp = self.hparams
        # Only the trained network's parameters: the EMA copy is updated by averaging, never by the optimizer.
        optimizer = torch.optim.AdamW(
            self.net.parameters(),
            lr=hp.lr,
            betas=tuple(hp.adam_betas),
            weight_decay=hp.weight_decay,
            fused=self._use_fused_optimizer(),
        )
        return {"optimizer": optimizer, "lr_scheduler": linear_warmup(optimizer, hp.warmup_steps)}

    # ------------------------------------------------------------------ evaluation: EMA loss on fixed noise
    def _fixed_noise_loss(self, images: Tensor, batch_idx: int, labels: Tensor | None = None) -> Tensor:
        # The same t and noise for the same batch at every evaluation, so successive values are comparable.
        generator = torch.Generator().manual_seed(10_000 + batch_idx)
        t = torch.randint(0, self.schedule.num_timesteps, (images.shape[0],), generator=generator)
        noise = torch.randn(images.shape, generator=generator, dtype=images.dtype)
        # Conditional nets are evaluated with the true labels (the conditional model's loss).
        kwargs = {"y": labels} if self.conditional and labels is not None else {}
        return l_simple(self.ema, images, self.schedule, t.to(self.device), noise.to(self.device),
                        prediction=self.hparams.prediction, **kwargs).mean()  # fmt: skip

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        loss = self._fixed_noise_loss(batch[0], batch_idx, batch[1] if len(batch) > 1 else None)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        labels = batch[1] if len(batch) > 1 else None
        self.log("test/loss", self._fixed_noise_loss(batch[0], batch_idx, labels), sync_dist=True)
        if self.hparams.bpd_timesteps != 0 and self.hparams.ddpm_variance == "learned":
            # likelihood.py evaluates fixed variances only; a learned one's bound is not implemented there yet.
            rank_zero_info("test/bpd skipped: the bound with --model.ddpm_variance learned is not implemented")
        elif self.hparams.bpd_timesteps != 0:
            hp = self.hparams
            generator = torch.Generator().manual_seed(20_000 + batch_idx)
            eps_model = self.eps_model(labels=labels, guidance_scale=1.0) if labels is not None else self.eps_model()
            terms = nll_bits_per_dim(eps_model, batch[0], self.schedule, hp.bpd_timesteps, hp.ddpm_variance,
                                     hp.clip_denoised, generator)  # fmt: skip
            self.log("test/bpd", terms["bpd"].mean().float(), sync_dist=True, batch_size=batch[0].shape[0])
        if batch_idx < self.hparams.get("ode_bpd_batches", 0):
            generator = torch.Generator().manual_seed(30_000 + batch_idx)
            eps_model = self.eps_model(labels=labels, guidance_scale=1.0) if labels is not None else self.eps_model()
            ode = ode_nll_bits_per_dim(eps_model, batch[0], self.schedule, generator=generator)
            self.log("test/ode_bpd", ode["bpd"].mean().float(), sync_dist=True, batch_size=batch[0].shape[0])

    def on_validation_epoch_end(self) -> None:
        if self.hparams.num_fid_samples > 0 and self.trainer.state.fn == "validate":
            self.log_dict(self.compute_fid(self.hparams.num_fid_samples))

    # ------------------------------------------------------------------ FID (src/metrics/evaluation.py)
    def fid_extractor(self) -> nn.Module:
        if "extractor" not in self._fid:
            self._fid["extractor"] = build_feature_extractor(self.hparams.fid_extractor, self.hparams.fid_weights_path)
        return self._fid["extractor"].to(self.device)

    def fid_reference(self) -> tuple[np.ndarray, np.ndarray]:
        """Reference mean and covariance: `fid_ref_stats` as is, else the data set's split, cached on disk."""
        hp = self.hparams
        if "reference" in self._fid:
            return self._fid["reference"]
        if hp.fid_ref_stats:
            mu, sigma, _ = evaluation.load_statistics(hp.fid_ref_stats)
        else:
            datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
            if datamodule is None or not hasattr(datamodule, "dataset"):
                raise ConfigError("FID needs reference statistics: pass --model.fid_ref_stats FILE.npz or a datamodule")
            if hasattr(datamodule, "reference_images"):  # ImageDataModule: a built-in split or a folder's cache
                images, name = datamodule.reference_images(hp.fid_ref_split)
            else:
                from src.data import load_dataset

                name = datamodule.dataset
                images = load_dataset(name, hp.fid_ref_split, datamodule.data_dir)[0]
            extractor = self.fid_extractor()
            key = evaluation.reference_key(
                name, hp.fid_ref_split, extractor_id(extractor), images.shape[-1], len(images)
            )
            rank, world = evaluation._dist_info()

            def compute() -> tuple[np.ndarray, np.ndarray]:
                mine = evaluation.shard_indices(len(images), rank, world)
                batches = (images[chunk] for chunk in mine.split(hp.fid_batch_size))
                stats = evaluation.accumulate(extractor, batches, self.device, len(mine), "FID reference",
                                              progress=rank == 0)  # fmt: skip
                return stats.compute()

            mu, sigma, path, computed = evaluation.cached_statistics(key, compute, hp.fid_cache_dir, self.device)
            rank_zero_info(f"FID reference statistics {'computed and saved to' if computed else 'loaded from'} {path}")
        self._fid["reference"] = (mu, sigma)
        return mu, sigma

    @torch.no_grad()
    def compute_fid(self, num_samples: int, stage: str = "val") -> dict[str, float]:
        """FID of `num_samples` EMA samples (sample i from `initial_noise([i])`, sharded over processes) against
        the reference statistics; {"val/fid" or "val/fid_standin": value}. Every process must call it."""
        extractor = self.fid_extractor()
        ref_mu, ref_sigma = self.fid_reference()

        def sample_fn(indices: Tensor) -> Tensor:
            return to_uint8(self.sample_indices(indices))

        stats, seconds_per_1k = evaluation.sample_statistics(
            sample_fn, extractor, num_samples, self.hparams.fid_batch_size, self.device, progress=True
        )
        value = evaluation.fid_from_statistics(stats, ref_mu, ref_sigma)
        name = evaluation.metric_name(extractor.name, "fid", stage)
        label = {"inception": "", "classifier": f" (features of {getattr(extractor, 'path', '')}: NOT an FID)"}.get(
            extractor.name, " (stand-in features: NOT an FID, not comparable to papers)"
        )
        rank_zero_info(
            f"{name} = {value:.4f} from {num_samples} samples{label}; {seconds_per_1k:.1f} s per 1,000 samples"
        )
        return {name: value}

    # ------------------------------------------------------------------ sampling
    def initial_noise(self, indices: Tensor, seed: int | None = None) -> Tensor:
        """x_T for sample indices: sample i's noise depends only on (seed, i), never on batching or the
        number of processes (the first draw of sample i's own generator, `src.seeding.sample_generators`)."""
        seed = self.hparams.sample_seed if seed is None else seed
        return self._noise_from(sample_generators(seed, indices))

    def _noise_from(self, generators: list[torch.Generator]) -> Tensor:
        return torch.stack([torch.randn(self.image_shape, generator=g) for g in generators]).to(self.device)

    @torch.no_grad()
    def sample_indices(self, indices: Tensor, seed: int | None = None, progress: bool = False, **overrides) -> Tensor:
        """Samples number `indices` (images in [-1, 1]): everything random about sample i (x_T, then every noise a
        stochastic sampler adds) comes from its own generator seeded by (seed, i), and its label (conditional
        nets, classifier guidance) from `labels_for(i)`, so sample i is the same whatever batch or process
        computes it. `seed` defaults to --model.sample_seed; `overrides` as in `sample`."""
        generators = sample_generators(self.hparams.sample_seed if seed is None else seed, indices)
        x_T = self._noise_from(generators)
        return self.sample(x_T, generator=generators, labels=self.labels_for(indices), progress=progress, **overrides)

    @property
    def conditional(self) -> bool:
        """Whether the net is class-conditional (takes labels y; classifier-free guidance applies)."""
        return bool(getattr(self.net, "num_classes", None))

    def guidance_classifier(self) -> nn.Module | None:
        """The noise-conditioned classifier of `classifier_path` (loaded once, frozen), or None without one."""
        if not self.hparams.classifier_path:
            return None
        model = self._guidance_classifier.get("model")
        if model is None or next(model.parameters()).device != self.device:
            from src.models.classifier import NoisyClassifier

            # Loaded and moved outside inference mode (Lightning's predict / validate / test run in it): weights
            # made there are inference tensors, which the guidance gradient cannot use.
            with torch.inference_mode(False):
                model = model or NoisyClassifier.load(self.hparams.classifier_path).requires_grad_(False)
                self._guidance_classifier["model"] = model.to(self.device)
        return self._guidance_classifier["model"]

    def labels_for(self, indices: Tensor) -> Tensor | None:
        """The class label of each sample index: `sample_labels[i % len]`, or i % num_classes; None when neither
        the net is conditional nor classifier guidance is on. Like the noise, it depends only on the index."""
        if self.conditional:
            num_classes = self.net.num_classes
        elif self.hparams.classifier_scale != 0.0:
            num_classes = self.guidance_classifier().num_classes
        else:
            return None
        choices = self.hparams.sample_labels or list(range(num_classes))
        return torch.as_tensor(choices, dtype=torch.int64)[indices.cpu().long() % len(choices)].to(self.device)

    def eps_model(self, labels: Tensor | None = None, guidance_scale: float | None = None, keep_variance=False):
        """The EMA net as the plain eps-predictor `model(x_t, t)` that samplers take: its `prediction` converted to
        eps (parameterization.py), class-conditional nets guided towards `labels` (default: labels_for(0..B-1))
        with classifier-free guidance scale s = 1 + w (guidance.py), the learned-variance channels dropped unless
        `keep_variance` (the "learned" DDPM variance reads them), and with `classifier_scale` != 0 classifier
        guidance on top (guidance.py's ClassifierGuidance)."""
        hp = self.hparams
        model = self.ema if hp.prediction == "eps" else EpsPredictor(self.ema, self.schedule, hp.prediction)
        channels = self.net.in_channels if self.learned_variance and not keep_variance else None
        use_classifier = hp.classifier_scale != 0.0
        if not self.conditional and channels is None and not use_classifier:
            return model
        scale = hp.guidance_scale if guidance_scale is None else guidance_scale

        def denoiser(x_t: Tensor, t: Tensor) -> Tensor:
            y = labels if labels is not None else self.labels_for(torch.arange(x_t.shape[0]))
            guided = classifier_free_guidance(model, y, scale, self.net.num_classes) if self.conditional else model
            if use_classifier:
                guided = ClassifierGuidance(guided, self.guidance_classifier(), y, hp.classifier_scale, self.schedule)
            out = guided(x_t, t)
            return out if channels is None else out[:, :channels]

        return denoiser

    @torch.no_grad()
    def sample(
        self,
        x_T: Tensor,
        progress: bool = False,
        generator: torch.Generator | list[torch.Generator] | None = None,
        labels: Tensor | None = None,
        guidance_scale: float | None = None,
        **overrides: object,
    ) -> Tensor:
        """Images in [-1, 1] from noise x_T with the EMA weights and the configured sampler; keyword
        overrides (sampler, steps, eta, skip, variance, clip_x0) replace the configured options. Conditional
        nets: `labels` (B,) (default: all classes in turn, `labels_for(0..B-1)`) and `guidance_scale`
        s = 1 + w (default: --model.guidance_scale)."""
        hp = self.hparams
        options = dict(
            sampler=hp.sampler,
            steps=hp.sampling_steps,
            eta=hp.eta,
            skip=hp.skip,
            variance=hp.ddpm_variance,
            clip_x0=hp.clip_denoised,
        )
        options.update(overrides)
        if options["sampler"] in CONTINUOUS_SAMPLERS:
            options = {**(hp.get("sampler_options") or {}), **options}
        schedule = self.schedule if self.schedule.betas.device == self.device else self.schedule.to(self.device)
        keep_variance = options["variance"] == "learned" and options["sampler"] in ("ddpm", "ddpm_respaced")
        model = self.eps_model(labels, guidance_scale, keep_variance)
        return sample(model, x_T.to(self.device), schedule, generator=generator, progress=progress, **options)

    def predict_step(self, batch: Tensor, batch_idx: int) -> dict[str, Tensor]:
        """`batch` holds sample indices; returns them with the images in [-1, 1]."""
        indices = batch[0] if isinstance(batch, (list, tuple)) else batch
        labels = self.labels_for(indices)
        images = self.sample_indices(indices)
        if labels is None:
            return {"index": indices, "images": images}
        return {"index": indices, "images": images, "labels": labels}  # PNGWriter names files <label>_<index>.png
