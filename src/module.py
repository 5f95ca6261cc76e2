"""DiffusionModule: Lightning wiring that trains a DiffusionModel.

The math lives in `src/diffusion/` (schedule, losses, samplers), the network in `src/models/unet.py`, and sampling in
the plain `src/models/diffusion.py: DiffusionModel` (the EMA weights, schedule, prediction target and sampler
settings), which this module holds as `model`. What is left here: the training step (DDPM Algorithm 1), the
optimizer and its warm-up, the EMA update, and the loss and likelihood logged by validate and test.
"""

from __future__ import annotations

import contextvars
import copy
import dataclasses
import os

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from src.data.latent_cache import CachedLatents
from src.diffusion.guidance import drop_labels
from src.diffusion.likelihood import nll_bits_per_dim
from src.diffusion.losses import (
    TIMESTEP_SAMPLINGS,
    TimestepDistribution,
    l_hybrid,
    l_simple,
    l_vlb,
    objective_function,
    sample_timesteps,
)
from src.diffusion.losses import loss_weighting as resolve_loss_weighting
from src.diffusion.ode_likelihood import ode_nll_bits_per_dim
from src.diffusion.process import DiffusionProcess, DiscreteProcess
from src.diffusion.sampler_settings import SamplerSettings
from src.diffusion.schedule import NoiseSchedule
from src.diffusion.score import sliced_score_matching
from src.diffusion.vdm import process_ends, unit_times, vdm_bits_per_dim, vdm_loss, vdm_times
from src.errors import ConfigError, read_checkpoint
from src.metrics.estimate import MeanStandardError
from src.models.diffusion import DiffusionModel, build_net, net_spec, schedule_recipe, upgrade_state_dict
from src.models.ema import ema_decay, update_ema
from src.models.first_stage import FirstStage
from src.optim import AdamW, LinearWarmup
from src.options import (
    GROUPS,
    RENAMED,
    Evaluation,
    Guidance,
    Sampling,
    Schedule,
    Training,
    flat_options,
    grouped_options,
)
from src.options import group as option_group

# True while `DiffusionModule.load_from_checkpoint` builds a module from a checkpoint's recorded options.
_FROM_CHECKPOINT = contextvars.ContextVar("from_checkpoint", default=False)


class DiffusionModule(L.LightningModule):
    """Trains `net` (and a learned process) with the configured objective and samples from the EMA copy, `model`.

    Args:
        net: the noise-prediction network, `net(x_t, t) -> eps` (e.g. `src.models.unet.UNet`).
        process: a diffusion process of its own (`src.diffusion.process.DiffusionProcess`, e.g. a learned schedule,
            as class_path / init_args); its parameters train with the net and are averaged into the sampling copy.
            None: the fixed schedule of `schedule`. Fixed by a checkpoint.
        schedule: the fixed noise schedule (`src.options.Schedule`: name, timesteps, beta_start, beta_end).
        prediction: what the network predicts, "eps" (DDPM), "x0", "v" (Salimans & Ho 2022) or "edm" (EDM's
            preconditioned F, sigma_data 0.5, Karras et al. 2022); the loss regresses that target and sampling converts
            it to eps (src/diffusion/parameterization.py). Fixed by a checkpoint.
        first_stage: an encoder/decoder the diffusion runs inside (`src.models.first_stage.FirstStage`, as
            class_path / init_args): training diffuses its encoding of the images, sampling decodes; frozen, out of
            the optimizer. The net then takes the latent's shape, and the data keeps the images' shape. None:
            pixel space. Fixed by a checkpoint.
        condition: for a net with conditioning "concat": the function of the clean images that makes the condition it
            reads beside x_t (`src/diffusion/conditioning.py`; {name: low_resolution, factor: 4}: super-resolution,
            learning p(x | x reduced 4x)). Training makes it from each batch; samples are conditioned on the images
            of `sampling.condition_split`, sample i on image i (mod their number).
        timestep_distribution: where the training timesteps fall (`losses.TimestepDistribution`, as class_path /
            init_args, e.g. `src.diffusion.losses.LogNormal`, EDM's training noise levels); each example's u of
            `training.timestep_sampling` is mapped through it. None: uniform over the T steps (DDPM). Not with the
            vdm objectives.
        optimizer: the optimizer of the trained parameters, a callable `optimizer(params)` (LightningCLI's
            OptimizerCallable: class_path / init_args in a config, e.g. torch.optim.AdamW with its lr); default
            `src.optim.AdamW`, DDPM's Adam(W) at lr 2e-4 without weight decay, fused on CUDA and CPU.
        lr_scheduler: the learning-rate schedule, `lr_scheduler(optimizer)` (LRSchedulerCallable), stepped once per
            optimizer step and logged as train/lr; default `src.optim.LinearWarmup`, DDPM's linear warm-up over
            5,000 steps (`init_args: {warmup_steps: N}`). The time budget's decay multiplies it
            (src/callbacks/time_budget.py).
        training: the objective, its weighting and timesteps, EMA, layout and compilation (`src.options.Training`).
        sampling: the sampler of grids, FID and predict, its options, seed and labels (`src.options.Sampling`).
        guidance: classifier-free, classifier and autoguidance at sampling time (`src.options.Guidance`).
        evaluation: the likelihoods `test` logs (`src.options.Evaluation`).

    Each group is a dataclass or a dict of its fields (a checkpoint's record); the command line sets one field as
    `--model.<group>.<field>` (src/options.py lists them, and the flat names of earlier versions).
    """

    def __init__(
        self,
        net: nn.Module,
        process: DiffusionProcess | None = None,
        schedule: Schedule = Schedule(),
        prediction: str = "eps",
        first_stage: FirstStage | None = None,
        condition: dict | None = None,
        timestep_distribution: TimestepDistribution | None = None,
        optimizer: OptimizerCallable = AdamW,
        lr_scheduler: LRSchedulerCallable = LinearWarmup,
        training: Training = Training(),
        sampling: Sampling = Sampling(),
        guidance: Guidance = Guidance(),
        evaluation: Evaluation = Evaluation(),
    ) -> None:
        super().__init__()
        # The parts are modules or callables, not hyperparameters: the networks' specs are recorded below, and the
        # optimizer's in the CLI's config.yaml.
        self.save_hyperparameters(
            ignore=["net", "process", "first_stage", "optimizer", "lr_scheduler", "timestep_distribution"]
        )
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        # Each group as its dataclass (load_from_checkpoint passes the recorded dicts), recorded as a plain dict.
        groups = {"schedule": schedule, "training": training, "sampling": sampling, "guidance": guidance,
                  "evaluation": evaluation}  # fmt: skip
        for name, value in groups.items():
            groups[name] = option_group(GROUPS[name], value)
            self.hparams[name] = dataclasses.asdict(groups[name])
        schedule, training, sampling, guidance, evaluation = groups.values()
        self.training_options, self.sampling_options, self.evaluation_options = training, sampling, evaluation
        if not 0.0 <= training.p_uncond <= 1.0:
            raise ConfigError(f"--model.training.p_uncond must be in [0, 1], got {training.p_uncond}")
        if sampling.condition_split not in ("train", "test"):
            raise ConfigError(f"--model.sampling.condition_split is train or test, got {sampling.condition_split!r}")
        if training.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ConfigError(
                f"--model.training.timestep_sampling {training.timestep_sampling!r} is unknown; choose one of "
                f"{', '.join(TIMESTEP_SAMPLINGS)}"
            )
        # load_from_checkpoint passes the recorded {"class_path", "init_args"} of each part.
        net, process, first_stage, timestep_distribution = (
            build_net(p) if isinstance(p, dict) else p for p in (net, process, first_stage, timestep_distribution)
        )
        parts = {
            "net": net,
            "process": process,
            "first_stage": first_stage,
            "timestep_distribution": timestep_distribution,
        }
        for name, part in parts.items():
            if part is not None and net_spec(part) is not None:
                # Record each part's class and constructor arguments, so that a checkpoint alone rebuilds the model
                # (`--ckpt_path` in the CLI, `DiffusionModule.load_from_checkpoint`); the modules are no hparams.
                self.hparams[name] = net_spec(part)
        self.net = net
        self.loss_weight = resolve_loss_weighting(training.loss_weighting, training.min_snr_gamma)
        self.timestep_distribution = timestep_distribution
        recipe = schedule_recipe(schedule.name, schedule.timesteps, schedule.beta_start, schedule.beta_end)
        # The process training reads (its parameters, if any, are optimized); the sampling model holds its average.
        self.process = process if process is not None else DiscreteProcess.from_name(**recipe)
        # A checkpoint's recorded sampler options may hold some its sampler never read (accepted before they were
        # refused): those are reset to their defaults, which changes nothing; options given now must fit the sampler.
        from_checkpoint = _FROM_CHECKPOINT.get()
        settings = SamplerSettings.from_options(flat_options(self.hparams), stored=from_checkpoint)
        # The sampling model holds the EMA copy of `net`: its weights are averaged, never optimized.
        self.model = DiffusionModel(
            copy.deepcopy(net).eval().requires_grad_(False),
            copy.deepcopy(self.process).requires_grad_(False),
            prediction,
            settings,
            recipe,
            guidance_scale=guidance.scale,
            guidance_interval=guidance.interval,
            sample_labels=sampling.labels,
            classifier_path=guidance.classifier_path,
            classifier_scale=guidance.classifier_scale,
            guidance_model=guidance.model,
            autoguidance_scale=guidance.autoguidance_scale,
            sample_seed=sampling.seed,
            first_stage=first_stage,
            condition=condition,
        )
        self.objective = self._check_objective(training.objective, training.loss_weighting, from_checkpoint)
        self.objective_fn = objective_function(self.objective)
        if not from_checkpoint:  # after DiffusionModel's own checks (a learned variance needs the net's channels)
            bound = self.objective == "vlb" or (evaluation.bpd_timesteps != 0 and not self.vdm)
            settings.check_variance(bound=bound)
        # test/bpd's mean and standard error over the test set (a Monte-Carlo estimate); no state in checkpoints.
        self.test_bpd = MeanStandardError()

    @property
    def vdm(self) -> bool:
        """Whether the objective is VDM's bound (continuous or T - 1 steps), which also sets what test/bpd is."""
        return self.objective in ("vdm", "vdm_discrete")

    def _check_objective(self, objective: str, loss_weighting: str, from_checkpoint: bool) -> str:
        """The objective, checked against the net and the process: one line naming the fix where they do not fit."""
        learned = self.model.learned_variance
        if objective == "simple" and learned:
            if from_checkpoint:  # recorded before the objective was an option, when a learned variance meant L_hybrid
                return "hybrid"
            raise ConfigError(
                "--model.training.objective simple does not train the learned variance of a net with 2 x in_channels "
                "outputs: set --model.training.objective hybrid (Improved DDPM) or vlb, or "
                "--model.net.init_args.out_channels null"
            )
        if objective == "hybrid" and not learned:
            raise ConfigError(
                "--model.training.objective hybrid trains a learned variance, and the net has in_channels outputs: set "
                "--model.net.init_args.out_channels to 2 x in_channels, or --model.training.objective simple"
            )
        if objective == "ssm" and learned:
            raise ConfigError(
                "--model.training.objective ssm matches the score, and the net has 2 x in_channels outputs (a learned "
                "variance): set --model.net.init_args.out_channels null"
            )
        if objective in ("vdm", "vdm_discrete"):
            if learned:
                raise ConfigError(
                    f"--model.training.objective {objective} bounds the likelihood with the process's own variances, "
                    "and the net has 2 x in_channels outputs (a learned variance): set "
                    "--model.net.init_args.out_channels null"
                )
            if self.model.first_stage is not None:
                raise ConfigError(
                    f"--model.training.objective {objective} is a likelihood of 8-bit pixels (its decoder is a "
                    "categorical over the 256 values): drop --model.first_stage, or use "
                    "--model.training.objective simple"
                )
        if objective in ("vdm", "vdm_discrete") and self.timestep_distribution is not None:
            raise ConfigError(
                f"--model.training.objective {objective} draws its own continuous t (an unbiased bound needs it "
                "uniform): drop --model.timestep_distribution, or use --model.training.objective simple"
            )
        if objective in ("hybrid", "vlb") and self.process.has_parameters():
            raise ConfigError(
                f"--model.training.objective {objective} reads a fixed schedule's posterior tables, not a learned "
                "process: use --model.training.objective simple (or one of your own) with --model.process"
            )
        if objective != "simple" and loss_weighting != "none" and not from_checkpoint:
            raise ConfigError(
                f"--model.training.loss_weighting {loss_weighting} weights L_simple, and --model.training.objective "
                f"is {objective}: pass --model.training.loss_weighting none, or --model.training.objective simple"
            )
        return objective

    upgrade_state_dict = staticmethod(upgrade_state_dict)

    @classmethod
    def load_from_checkpoint(cls, *args: object, **kwargs: object) -> DiffusionModule:  # type: ignore[override]
        """Lightning's `load_from_checkpoint`; recorded sampler options that the sampler does not read are reset to
        their defaults (`SamplerSettings.stored`) instead of refused, and the flat options of checkpoints written
        before the groups (`src.options.RENAMED`) are read into them, so older checkpoints keep loading."""
        path = args[0] if args else kwargs.get("checkpoint_path")
        if isinstance(path, (str, os.PathLike)):
            recorded = read_checkpoint(path).get("hyper_parameters", {})
            if any(name in recorded and name not in GROUPS for name in RENAMED):
                # Lightning drops recorded names the constructor does not take; given as arguments, they count.
                upgraded = grouped_options(recorded)
                kwargs = {**{name: upgraded[name] for name in GROUPS if name in upgraded}, **kwargs}
        token = _FROM_CHECKPOINT.set(True)
        try:
            return super().load_from_checkpoint(*args, **kwargs)
        finally:
            _FROM_CHECKPOINT.reset(token)

    @property
    def schedule(self) -> NoiseSchedule:
        return self.model.schedule

    @property
    def conditional(self) -> bool:
        return self.model.conditional

    def train(self, mode: bool = True) -> DiffusionModule:
        # The averaged copy is always in eval mode (no dropout in the weights that sample), whatever the owner's mode.
        super().train(mode)
        self.model.eval()
        return self

    def setup(self, stage: str) -> None:
        if self.model.concat and self.model.condition_images is None:
            # The images samples are conditioned on (sample i on image i % N): grids, FID and predict alike.
            datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
            if not hasattr(datamodule, "reference_images"):
                raise ConfigError("a model with --model.condition takes the images it is conditioned on from --data")
            split = self.sampling_options.condition_split
            self.model.condition_images = datamodule.reference_images(split)[0]
            y = self.model.conditions_for(torch.arange(1))
            if y.shape[1] != self.net.cond_channels:
                raise ConfigError(
                    f"--model.condition makes {y.shape[1]}-channel conditions of these images; the net concatenates "
                    f"{self.net.cond_channels} (--model.net.init_args.cond_channels)"
                )

    def net_y(self, batch: tuple) -> Tensor | None:
        """The net's y for a batch of clean images: their condition (concat nets), their labels (class-conditional
        nets), else None."""
        if self.model.concat:
            if isinstance(batch[0], CachedLatents):
                raise ConfigError("--model.condition is made from the images; --data.latent_cache holds latents only")
            return self.model.condition_input(batch[0])
        return batch[1] if self.conditional and len(batch) > 1 else None

    def on_fit_start(self) -> None:
        if self.training_options.channels_last:
            self.net.to(memory_format=torch.channels_last)
            self.model.to(memory_format=torch.channels_last)
        if self.training_options.compile and "_compiled_net" not in self.__dict__:
            # Stored past nn.Module's registry: a registered OptimizedModule would add "_orig_mod." copies of every
            # key to the state dict. It shares its parameters with self.net.
            self.__dict__["_compiled_net"] = torch.compile(self.net)

    @property
    def train_net(self) -> nn.Module:
        """The network the training step calls: `net`, or its compiled wrapper with `compile`."""
        return self.__dict__.get("_compiled_net", self.net)

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """The EMA net's output (what sampling uses), in its `prediction` target; `y`: labels of a conditional net."""
        return self.model(x_t, t, y)

    def training_latents(self, x: Tensor | CachedLatents) -> Tensor:
        """x_0 of a training batch: the images themselves (no first stage), their encoding, or, from the latent cache
        (--data.latent_cache), z = mean + std * eps from the cached posterior moments, normalised.

        A first stage that normalises its latents by measured statistics (`LatentFirstStage`, LDM's scale_by_std)
        measures them on the first training batch's latents, every process's together, and logs them; a
        checkpoint keeps them, so a resumed run never measures again."""
        first_stage = self.model.first_stage
        if isinstance(x, CachedLatents):
            if not hasattr(first_stage, "latents_from_moments"):
                raise ConfigError("a latent-cache batch needs --model.first_stage LatentFirstStage")
            z = first_stage.latents_from_moments(x.moments)
        elif not hasattr(first_stage, "calibrate_latents"):
            return self.model.encode(x)
        else:
            z = first_stage.raw_latents(x)
        if not first_stage.calibrated:
            reduce = lambda moments: self.trainer.strategy.reduce(moments, reduce_op="sum")  # noqa: E731
            std = first_stage.calibrate_latents(z, reduce)
            rank_zero_info(f"First-stage latents measured on the first batch: std {[round(float(s), 4) for s in std]}")
        # The same on every process: 1 / the mean of the channels' stds (LDM's scale_factor for "std").
        self.log("train/latent_scale", 1.0 / first_stage.latent_std.mean().float(), batch_size=len(z))
        return first_stage.normalize(z)

    # ------------------------------------------------------------------ training (Algorithm 1)
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        with torch.no_grad():  # the first stage is frozen: x_0 is the encoding of the images (the images without one)
            images = self.training_latents(batch[0])
        if self.training_options.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        # t is drawn here (as l_simple would, same RNG order) and kept so that a non-finite loss can be reported
        # with the t values that produced it (src/callbacks/faults.py).
        T, method = self.process.num_timesteps, self.training_options.timestep_sampling
        if self.vdm:  # continuous t in [0, T - 1] (vdm), or the grid's t = 1..T-1 (vdm_discrete)
            self.last_t = vdm_times(unit_times(images.shape[0], method, images.device), T, self.vdm_steps)
        elif self.timestep_distribution is not None:  # e.g. EDM's log-normal noise levels
            u = unit_times(images.shape[0], method, images.device)
            self.last_t = self.timestep_distribution(u, self.process.schedule)
        else:
            self.last_t = sample_timesteps(images.shape[0], T, images.device, method=method)
        kwargs = {}
        if self.conditional:
            # Classifier-free guidance training: the null label with probability p_uncond (Ho & Salimans, Alg. 1).
            kwargs["y"] = drop_labels(batch[1], self.training_options.p_uncond, self.net.num_classes)
        elif self.model.concat:  # the condition of the clean images (p_uncond drops labels only)
            kwargs["y"] = self.net_y(batch)
        prediction = self.model.prediction
        if self.objective == "simple":
            loss = l_simple(self.train_net, images, self.process, t=self.last_t, prediction=prediction,
                            weighting=self.loss_weight, **kwargs).mean()  # fmt: skip
        else:
            if self.objective == "hybrid":
                terms = l_hybrid(self.train_net, images, self.process.schedule, t=self.last_t, prediction=prediction,
                                 vlb_weight=self.training_options.vlb_weight, **kwargs)  # fmt: skip
            elif self.vdm:
                terms = vdm_loss(self.train_net, images, self.process, t=self.last_t, prediction=prediction,
                                 steps=self.vdm_steps, **kwargs)  # fmt: skip
            elif self.objective == "ssm":
                terms = sliced_score_matching(self.train_net, images, self.process, self.last_t, prediction=prediction,
                                              **kwargs)  # fmt: skip
            elif self.objective == "vlb":
                variance = "learned" if self.model.learned_variance else self.model.settings.variance
                terms = l_vlb(self.train_net, images, self.process.schedule, t=self.last_t, prediction=prediction,
                              variance=variance, **kwargs)  # fmt: skip
            else:  # one's own (losses.Objective)
                terms = self.objective_fn(self.train_net, images, self.process, self.last_t, None, prediction, **kwargs)
            self.log_dict({f"train/{name}": value.mean() for name, value in terms.items() if name != "loss"})
            loss = terms["loss"].mean()
        if self.process.has_parameters():  # a learned schedule's ends, gamma = -log SNR at t = 0 and T - 1
            gamma_0, gamma_1 = process_ends(self.process, images.device)
            self.log_dict({"train/gamma_0": gamma_0.detach().float(), "train/gamma_1": gamma_1.detach().float()})
        self.last_loss = loss.detach()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    @property
    def vdm_steps(self) -> int:
        """The number of steps of VDM's bound: 0 (continuous time, "vdm") or T - 1 ("vdm_discrete": the grid)."""
        return self.process.num_timesteps - 1 if self.objective == "vdm_discrete" else 0

    # ------------------------------------------------------------------ checkpoints (RNG states: src/callbacks/rng_state.py)
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = upgrade_state_dict(checkpoint["state_dict"])
        if self._trainer is not None and self._trainer.state.fn != "fit":
            # validate, test and predict use the network only; the callbacks' states (time budget spent, RNG streams,
            # checkpoint bookkeeping) concern continuing the training, and Lightning would warn that the training
            # callbacks are missing and that the checkpoint folder changed.
            checkpoint.pop("callbacks", None)

    # ------------------------------------------------------------------ optimization
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Norm before clipping, so a clipped run still shows how large its gradients were.
        # Not Lightning's `grad_norm`: it builds the total with torch.tensor(list of per-parameter norms), which copies
        # every norm to the host (one sync per parameter per step on a GPU), and it took 2.7-2.9x as long as this on
        # the quickstart net (166 tensors; 5.0 vs 1.8 ms per step, 2-core AMD EPYC), where the norms stay on the device.
        grads = [p.grad for p in self.trained_parameters() if p.grad is not None]
        if grads:
            norms = torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
            self.log("train/grad_norm", torch.linalg.vector_norm(norms))

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # One EMA update per optimizer step (not per micro-batch under gradient accumulation).
        training = self.training_options
        decay = ema_decay(self.trainer.global_step, training.ema_decay, training.ema_warmup)
        update_ema(self.model.net, self.net, decay)
        if self.process.has_parameters():  # a learned schedule samples with its average too
            update_ema(self.model.process, self.process, decay)

    def trained_parameters(self) -> list[nn.Parameter]:
        """What the optimizer trains: the net's parameters and a learned process's (never the EMA copy's or the
        frozen first stage's)."""
        return [*self.net.parameters(), *self.process.parameters()]

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
        # Only the trained parameters: the EMA copy is updated by averaging, never by the optimizer.
        optimizer = self.optimizer_factory(self.trained_parameters())
        scheduler = self.lr_scheduler_factory(optimizer)
        # Stepped per optimizer step; LearningRateMonitor logs it as `train/lr` (its `name`).
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"},
        }

    # ------------------------------------------------------------------ evaluation: EMA loss on fixed noise
    def _fixed_noise_loss(self, images: Tensor, batch_idx: int, y: Tensor | None = None) -> Tensor:
        # The same t and noise for the same batch at every evaluation, so successive values are comparable.
        images = self.model.encode(images)
        generator = torch.Generator().manual_seed(10_000 + batch_idx)
        t = torch.randint(0, self.schedule.num_timesteps, (images.shape[0],), generator=generator)
        noise = torch.randn(images.shape, generator=generator, dtype=images.dtype)
        # Conditional nets are evaluated with the true labels or conditions (the conditional model's loss).
        kwargs = {"y": y} if y is not None else {}
        return l_simple(self.model.net, images, self.model.process, t.to(self.device), noise.to(self.device),
                        prediction=self.model.prediction, **kwargs).mean()  # fmt: skip

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        loss = self._fixed_noise_loss(batch[0], batch_idx, self.net_y(batch))
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        labels = self.net_y(batch)  # labels, or a concat net's conditions
        self.log("test/loss", self._fixed_noise_loss(batch[0], batch_idx, labels), sync_dist=True)
        hp = self.evaluation_options
        if self.model.first_stage is not None and (hp.bpd_timesteps != 0 or hp.ode_bpd_batches):
            # The bound of the latents is no likelihood of the images unless the first stage were a volume-preserving
            # bijection; rather than trust that of any first stage, neither bound is reported.
            rank_zero_info("test/bpd and test/ode_bpd skipped: with a first stage they would bound the latents")
            return
        if self.vdm and hp.bpd_timesteps != 0:
            # VDM's own bound (prior, categorical decoder, diffusion term at bpd_timesteps stratified times).
            kwargs = {"y": labels} if labels is not None else {}
            generator = torch.Generator().manual_seed(20_000 + batch_idx)
            terms = vdm_bits_per_dim(self.model.net, batch[0], self.model.process, hp.bpd_timesteps,
                                     self.model.prediction, self.vdm_steps, generator, **kwargs)  # fmt: skip
            self._log_bpd(terms, batch[0].shape[0])
            return
        # Conditional nets: the likelihood of the conditional model given the true labels (no guidance).
        guide = {"labels": labels, "guidance_scale": 1.0} if labels is not None else {}
        eps_model = self.model.eps_model(**guide)
        if hp.bpd_timesteps != 0:
            # A learned variance's bound reads the net's variance channels too (likelihood.vb_terms).
            learned = self.model.settings.variance == "learned"
            bound_model = self.model.eps_model(**guide, keep_variance=True) if learned else eps_model
            generator = torch.Generator().manual_seed(20_000 + batch_idx)
            terms = nll_bits_per_dim(bound_model, batch[0], self.schedule, hp.bpd_timesteps,
                                     self.model.settings.variance, self.model.settings.clip_x0, generator)  # fmt: skip
            self._log_bpd(terms, batch[0].shape[0])
        if batch_idx < hp.ode_bpd_batches:
            generator = torch.Generator().manual_seed(30_000 + batch_idx)
            ode = ode_nll_bits_per_dim(eps_model, batch[0], self.schedule, generator=generator)
            self.log("test/ode_bpd", ode["bpd"].mean().float(), sync_dist=True, batch_size=batch[0].shape[0])

    def _log_bpd(self, terms: dict[str, Tensor], batch_size: int) -> None:
        """test/bpd and its terms (batch means, averaged over the test set), and the per-example values into the
        standard error that `on_test_epoch_end` logs."""
        for name, value in terms.items():
            self.log(f"test/{name}", value.mean().float(), sync_dist=True, batch_size=batch_size)
        self.test_bpd.update(terms["bpd"])

    def on_test_epoch_end(self) -> None:
        if self.test_bpd.update_count:
            self.log("test/bpd_se", self.test_bpd.compute()[1].float())
            self.test_bpd.reset()

    # ------------------------------------------------------------------ predict (sampling: src/models/diffusion.py)
    def predict_step(self, batch: Tensor, batch_idx: int) -> dict[str, Tensor]:
        """`batch` holds sample indices; returns them with the images in [-1, 1] (and the labels of a conditional
        model, which PNGWriter puts in the file names, <label>_<index>.png)."""
        indices = batch[0] if isinstance(batch, (list, tuple)) else batch
        out = {"index": indices, "images": self.model.sample_indices(indices)}
        labels = self.model.labels_for(indices)
        return out if labels is None else {**out, "labels": labels}
