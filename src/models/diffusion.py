"""DiffusionModel: a trained denoiser and everything needed to sample from it, as a plain `nn.Module`.

    model = DiffusionModel.load("runs/fashion_mnist/version_0/checkpoints/last.ckpt")   # or an export / diffusers folder
    images = model.sample_indices(torch.arange(64))                                   # [-1, 1], sample i fixed by (seed, i)

It holds the network whose weights sample (the EMA copy, for a model being trained), the noise schedule, what the
network predicts (eps, x0, v or edm) and the sampler settings, plus the sampling-time options of conditional models
(classifier-free guidance scale, labels) and of classifier guidance. It needs torch only, never Lightning:
`src/module.py`'s DiffusionModule trains one, and `export.py` writes one as a small folder.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from src.diffusion.conditioning import build_condition, condition_spec
from src.diffusion.guidance import AutoGuidance, ClassifierGuidance, classifier_free_guidance
from src.diffusion.parameterization import PREDICTIONS, EpsPredictor
from src.diffusion.process import DiffusionProcess, DiscreteProcess, as_process
from src.diffusion.sampler_settings import SamplerSettings
from src.diffusion.samplers import is_continuous, sample
from src.diffusion.schedule import NoiseSchedule, schedule_recipe  # noqa: F401  (schedule_recipe: re-exported)
from src.errors import ConfigError
from src.models.posthoc_ema import parse_early_ema
from src.options import flat_options
from src.seeding import sample_generators

EXPORT_FORMAT = "ddim-lightning-export"
# 3: "process" and "first_stage" specs (and their weights files) where a model has a learned process or a first
# stage; 2: "net" holds {"class_path", "init_args"}; version 1 wrote "unet" (UNet arguments) instead.
EXPORT_VERSION = 3
PROCESS_WEIGHTS_NAME = "process.safetensors"
FIRST_STAGE_WEIGHTS_NAME = "first_stage.safetensors"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# The sampling (EMA) weights in a DiffusionModule checkpoint's state dict, and those of a learned process (EMA) and
# of a first stage (frozen).
CHECKPOINT_EMA_PREFIX = "model.net."
CHECKPOINT_PROCESS_PREFIX = "model.process."
CHECKPOINT_FIRST_STAGE_PREFIX = "model.first_stage."
# State-dict keys renamed since a checkpoint format: old prefix -> new prefix (checkpoints written before
# DiffusionModel held the EMA weights as "ema.model.*").
RENAMED_STATE_KEYS = {"ema.model.": "model.net."}


def upgrade_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A checkpoint's state dict with the keys of older formats renamed (`RENAMED_STATE_KEYS`)."""
    renamed = {}
    for key, value in state_dict.items():
        for old, new in RENAMED_STATE_KEYS.items():
            if key.startswith(old):
                key = new + key[len(old) :]
        renamed[key] = value
    return renamed


def build_net(spec: dict) -> nn.Module:
    """The network of a {"class_path": "pkg.mod.Class", "init_args": {...}} spec (configs and checkpoints record it).

    Lightning's `instantiate_class` does the same for the CLI; this model layer must not import Lightning (an exported
    model samples with torch alone), so it has this three-line equivalent."""
    module_name, _, class_name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)(**(spec.get("init_args") or {}))


def net_spec(net: nn.Module) -> dict | None:
    """{"class_path", "init_args"} of a network that records its constructor arguments in `config`, else None."""
    if not hasattr(net, "config"):
        return None
    cls = type(net)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(net.config)}


class DiffusionModel(nn.Module):
    """A denoiser `net` with its diffusion process, prediction target and sampler settings (and optionally a first
    stage); samples with `sample` or `sample_indices`.

    Args:
        net: the network, `net(x_t, t) -> output` or `net(x_t, t, y)` for a class-conditional one (`num_classes`).
        schedule: the noise schedule it was trained with, or its process (`src.diffusion.process`: a learned
            schedule); a `NoiseSchedule` is held as its `DiscreteProcess`.
        prediction: what `net` outputs: "eps" (DDPM), "x0", "v" (Salimans & Ho 2022) or "edm" (EDM's F); sampling
            converts to eps.
        settings: the sampler and its options (`SamplerSettings`).
        schedule_recipe: the `NoiseSchedule.from_name` arguments of `schedule`, written by `save` (None: the betas).
        guidance_scale: classifier-free guidance scale s = 1 + w of conditional nets (1: the conditional model).
        guidance_interval: (sigma_lo, sigma_hi): classifier-free guidance only where the noise level
            sigma_t = sqrt((1 - a_t) / a_t) is in (sigma_lo, sigma_hi], the conditional model alone (one network
            evaluation) elsewhere (Kynkäänniemi et al. 2024); None: at every noise level.
        sample_labels: conditional nets: labels of the samples in turn (None: all classes in turn).
        classifier_path: a NoisyClassifier file for classifier guidance (Dhariwal & Nichol 2021).
        classifier_scale: its scale s (0: off).
        guidance_model: a weaker model of the same task (a checkpoint or export folder `DiffusionModel.load` reads:
            a smaller net, or the same one trained for less time) for autoguidance (Karras et al. 2024,
            guidance.py's `AutoGuidance`): D_guide + a (D - D_guide) at every step, with `autoguidance_scale` a,
            for conditional and unconditional nets; on a conditional net D is the classifier-free guided model when
            `guidance_scale` is not 1 too. It must share this model's schedule, prediction target, latent shape and
            classes. Loaded on first use and kept out of the state dict, like the classifier.
        autoguidance_scale: a of autoguidance (1: off, the model alone; 0: the guide alone).
        sample_seed: the default seed of `sample_indices`.
        first_stage: an encoder/decoder around the diffusion (`src.models.first_stage.FirstStage`: `encode`,
            `decode`); the net then works on its latents, and `sample` decodes them. None: pixel space. It is
            frozen and kept in eval mode.
        condition: for a net that concatenates a spatially aligned condition (`UNet(conditioning="concat")`), the
            function of a clean image that makes it (`src.diffusion.conditioning.build_condition`'s spec, e.g.
            {"name": "low_resolution", "factor": 4}: super-resolution). Sample i is conditioned on
            `condition_images[i % N]` (set them before `sample_indices`), or `sample` takes y itself.
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: NoiseSchedule | DiffusionProcess,
        prediction: str = "eps",
        settings: SamplerSettings | None = None,
        schedule_recipe: dict | None = None,
        guidance_scale: float = 1.0,
        guidance_interval: tuple[float, float] | None = None,
        sample_labels: list[int] | None = None,
        classifier_path: str | None = None,
        classifier_scale: float = 0.0,
        sample_seed: int = 0,
        first_stage: nn.Module | None = None,
        guidance_model: str | None = None,
        autoguidance_scale: float = 1.0,
        condition: dict | None = None,
    ) -> None:
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ConfigError(f"--model.prediction {prediction!r} is unknown; choose one of {', '.join(PREDICTIONS)}")
        if classifier_scale != 0.0 and not classifier_path:
            raise ConfigError(
                "--model.guidance.classifier_scale needs --model.guidance.classifier_path (a NoisyClassifier file)"
            )
        self.net = net
        self.process = as_process(schedule, schedule_recipe)
        self.first_stage = None if first_stage is None else first_stage.eval().requires_grad_(False)
        self.prediction = prediction
        self.settings = settings or SamplerSettings()
        self.settings.check_steps(schedule.num_timesteps)
        if self.settings.variance == "learned" and not self.learned_variance:
            raise ConfigError(
                "--model.sampling.variance learned needs a net with 2 x in_channels outputs "
                "(--model.net.init_args.out_channels)"
            )
        if self.settings.clip_x0 and first_stage is not None and first_stage.latent_range != (-1.0, 1.0):
            raise ConfigError(
                f"--model.sampling.clip_denoised bounds x_0 to [-1, 1], but {type(first_stage).__name__}'s latents lie "
                f"in {first_stage.latent_range} (None: unbounded); set --model.sampling.clip_denoised false"
            )
        num_classes = getattr(net, "num_classes", None)
        if sample_labels is not None and (not num_classes or not all(0 <= y < num_classes for y in sample_labels)):
            raise ConfigError(f"--model.sampling.labels needs a conditional net and labels in [0, {num_classes})")
        self.guidance_scale = guidance_scale
        self.guidance_interval = None if guidance_interval is None else _check_guidance_interval(guidance_interval)
        self.sample_labels = sample_labels
        self.classifier_path = classifier_path
        self.classifier_scale = classifier_scale
        self.sample_seed = sample_seed
        self.guidance_model = guidance_model
        self.autoguidance_scale = autoguidance_scale
        try:
            self.condition = build_condition(condition)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if bool(self.condition) != self.concat:
            raise ConfigError(
                "--model.condition and a net with conditioning 'concat' go together: the net concatenates "
                f"{getattr(net, 'cond_channels', 0) or 'no'} condition channels, --model.condition is {condition}"
            )
        if self.concat and classifier_scale != 0.0:
            raise ConfigError(
                "--model.guidance.classifier_scale guides towards class labels; this net is conditioned on images"
            )
        # The clean images (uint8 or [-1, 1], (N, C, H, W)) that sample i is conditioned on, i % N; set by the caller
        # (DiffusionModule: --model.sampling.condition_split of the data), never saved.
        self.condition_images: Tensor | None = None
        # The guidance classifier and the autoguidance model are loaded on first use and kept out of the state dict
        # (they are not part of the model's weights, and a checkpoint must load without their files): a plain dict
        # is not registered.
        self._classifier: dict[str, nn.Module] = {}
        self._guide: dict[str, DiffusionModel] = {}

    # ------------------------------------------------------------------ what the net is
    @property
    def schedule(self) -> NoiseSchedule:
        """The discrete schedule the samplers index (the process's own tables, or a learned process at t = 0..T-1)."""
        return self.process.schedule

    @property
    def schedule_recipe(self) -> dict | None:
        """The `NoiseSchedule.from_name` arguments of a fixed named schedule (None: given betas or a learned one)."""
        return getattr(self.process, "recipe", None)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """The shape the net diffuses (the images' own without a first stage): (in_channels, size, size)."""
        return (self.net.in_channels, self.net.image_size, self.net.image_size)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The shape of the images `sample` returns (the first stage's decoding of `latent_shape`)."""
        if self.first_stage is None:
            return self.latent_shape
        return tuple(self.first_stage.image_shape(self.latent_shape))

    def encode(self, images: Tensor) -> Tensor:
        """What the net diffuses: the first stage's encoding of images in [-1, 1] (the images without one)."""
        return images if self.first_stage is None else self.first_stage.encode(images)

    def decode(self, latents: Tensor) -> Tensor:
        """Images from what the net diffuses (the first stage's decoding; the latents themselves without one)."""
        return latents if self.first_stage is None else self.first_stage.decode(latents)

    @property
    def conditional(self) -> bool:
        """Whether the net is class-conditional (takes labels y; classifier-free guidance applies)."""
        return bool(getattr(self.net, "num_classes", None))

    @property
    def concat(self) -> bool:
        """Whether the net concatenates a spatially aligned condition y to its input (`condition` makes y)."""
        return bool(getattr(self.net, "cond_channels", 0))

    def condition_input(self, images: Tensor) -> Tensor:
        """The net's y for clean images in [-1, 1] (B, C, H, W): `condition` of them at the size the net diffuses."""
        return self.condition(images.to(self.device, torch.float32), self.latent_shape[-2:])

    def conditions_for(self, indices: Tensor) -> Tensor | None:
        """y of each sample index: the condition of `condition_images[i % N]`; None for nets without a condition.
        Like the noise and the labels, it depends only on the index."""
        if self.condition is None:
            return None
        return self.condition_input(self.source_images(indices))

    def source_images(self, indices: Tensor) -> Tensor:
        """`condition_images[i % N]` of each sample index, float in [-1, 1]."""
        if self.condition_images is None:
            raise ConfigError(
                "this model is conditioned on images (--model.condition): set its condition_images (the CLI takes them "
                "from --model.sampling.condition_split of --data)"
            )
        images = self.condition_images[indices.cpu().long() % len(self.condition_images)]
        return images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images.float()

    def labels_or_conditions(self, indices: Tensor) -> Tensor | None:
        """The net's y of each sample index: its condition (concat nets), else its label (`labels_for`)."""
        return self.conditions_for(indices) if self.concat else self.labels_for(indices)

    @property
    def learned_variance(self) -> bool:
        """Improved DDPM: a net with twice the image channels predicts (eps-or-x0-or-v, v_variance)."""
        return getattr(self.net, "out_channels", None) == 2 * getattr(self.net, "in_channels", -1)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """The net's output, in its `prediction` target; `y`: labels of a conditional net."""
        return self.net(x_t, t) if y is None else self.net(x_t, t, y)

    # ------------------------------------------------------------------ guidance and labels
    def guidance_classifier(self) -> nn.Module | None:
        """The noise-conditioned classifier of `classifier_path` (loaded once, frozen), or None without one."""
        if not self.classifier_path:
            return None
        model = self._classifier.get("model")
        if model is None or next(model.parameters()).device != self.device:
            from src.models.classifier import NoisyClassifier

            # Loaded and moved outside inference mode (Lightning's predict / validate / test run in it): weights
            # made there are inference tensors, which the guidance gradient cannot use.
            with torch.inference_mode(False):
                model = model or NoisyClassifier.load(self.classifier_path).requires_grad_(False)
                self._classifier["model"] = model.to(self.device)
        return self._classifier["model"]

    def guide(self) -> DiffusionModel | None:
        """The autoguidance model of `guidance_model` (loaded once, frozen, on this model's device), or None."""
        if not self.guidance_model:
            return None
        model = self._guide.get("model")
        if model is None and parse_early_ema(self.guidance_model) is not None:
            raise ConfigError(
                f"--model.guidance.model {self.guidance_model} names a run's early EMA, made from its snapshots by the "
                "command line; in Python, pass it with set_guide(src.posthoc_ema.early_ema_guide(ckpt, fraction)[0])"
            )
        if model is None:
            model = DiffusionModel.load(self.guidance_model).requires_grad_(False)
            self._check_guide(model)
        if model.device != self.device:
            model = model.to(self.device)
        self._guide["model"] = model
        return model

    def set_guide(self, guide: DiffusionModel) -> None:
        """Use `guide` as the autoguidance model (checked like a loaded one), e.g. one made in memory from the run's
        own post-hoc EMA snapshots (`src.posthoc_ema.early_ema_guide`, which the CLI resolves
        `--model.guidance.model posthoc_ema@<fraction>` with)."""
        self._check_guide(guide)
        self._guide["model"] = guide.eval().requires_grad_(False)

    def _check_guide(self, guide: DiffusionModel) -> None:
        """A ConfigError in one line unless `guide` predicts the same target of the same noise on the same classes."""
        flag = f"--model.guidance.model {self.guidance_model}"
        mine, its = self.schedule.alphas_cumprod, guide.schedule.alphas_cumprod
        differences = [
            f"{what}: {a} here, {b} there"
            for what, a, b in (
                ("latent shape", self.latent_shape, guide.latent_shape),
                ("prediction", self.prediction, guide.prediction),
                ("classes", getattr(self.net, "num_classes", None), getattr(guide.net, "num_classes", None)),
                ("condition", condition_spec(self.condition), condition_spec(guide.condition)),
                ("timesteps", mine.numel(), its.numel()),
            )
            if a != b
        ]
        if not differences and not torch.allclose(mine.cpu(), its.cpu(), rtol=0.0, atol=1e-9):
            differences.append("noise schedule: the alphas_cumprod differ")
        if differences:
            raise ConfigError(f"{flag} cannot guide this model: its {'; '.join(differences)}")

    def label_choices(self) -> list[int] | None:
        """The labels samples take in turn (sample i gets `choices[i % len(choices)]`): `sample_labels`, or every
        class; None when neither the net is conditional nor classifier guidance is on. A grid with one column per
        choice shows one label per column."""
        if self.conditional:
            num_classes = self.net.num_classes
        elif self.classifier_scale != 0.0:
            num_classes = self.guidance_classifier().num_classes
        else:
            return None
        return list(self.sample_labels or range(num_classes))

    def labels_for(self, indices: Tensor) -> Tensor | None:
        """The class label of each sample index: `sample_labels[i % len]`, or i % num_classes; None when neither
        the net is conditional nor classifier guidance is on. Like the noise, it depends only on the index."""
        choices = self.label_choices()
        if choices is None:
            return None
        return torch.as_tensor(choices, dtype=torch.int64)[indices.cpu().long() % len(choices)].to(self.device)

    def eps_model(self, labels: Tensor | None = None, guidance_scale: float | None = None, keep_variance: bool = False):
        """The net as the plain eps-predictor `model(x_t, t)` that samplers take: its `prediction` converted to eps
        (parameterization.py), class-conditional nets guided towards `labels` (default: labels_for(0..B-1)) with
        classifier-free guidance scale s = 1 + w (guidance.py; only in `guidance_interval` where one is set), the
        learned-variance channels dropped unless `keep_variance` (the "learned" DDPM variance reads them), and with
        `classifier_scale` != 0 classifier guidance on top (guidance.py's ClassifierGuidance)."""
        return self._guided(self._as_eps, labels, guidance_scale, keep_variance, self.classifier_scale != 0.0)

    def _as_eps(self, net: nn.Module):
        return net if self.prediction == "eps" else EpsPredictor(net, self.schedule, self.prediction)

    def output_model(self, labels: Tensor | None = None, guidance_scale: float | None = None):
        """Like `eps_model` but the net's own output (eps, x0, v or edm: `prediction`), guided, without classifier
        guidance. For samplers that convert the output themselves at the exact, fractional noise level (the SDE / ODE
        samplers' `continuous.DiscreteVPDenoiser`), which converts it with the continuous sigma itself. The guided
        combination u + s (c - u) is affine, so guiding the output guides the eps it converts to."""
        return self._guided(lambda net: net, labels, guidance_scale, False, False)

    def _guided(self, wrap: Callable[[nn.Module], Callable], labels: Tensor | None, guidance_scale: float | None,
                keep_variance: bool, use_classifier: bool):  # fmt: skip
        """The net, wrapped by `wrap` (to eps, or as it is), guided: classifier-free guidance (conditional nets), then
        autoguidance away from the guide (wrapped the same way), then classifier guidance, each where it is on."""
        model = wrap(self.net)
        channels = self.net.in_channels if self.learned_variance and not keep_variance else None
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        autoguided = self.guidance_model and self.autoguidance_scale != 1.0
        guide = wrap(self.guide().net) if autoguided else None
        if self.concat and labels is None:
            raise ValueError("this net is conditioned on images: pass its y (labels=model.condition_input(images))")
        takes_y = self.conditional or self.concat  # labels, or a concatenated condition
        if not takes_y and channels is None and not use_classifier and guide is None:
            return model

        def denoiser(x_t: Tensor, t: Tensor) -> Tensor:
            y = labels if labels is not None else self.labels_for(torch.arange(x_t.shape[0]))
            guided = model
            if self.concat:  # the condition is part of the input, for the net and its guide alike
                guided = lambda x, t_, *_: model(x, t_, y)  # noqa: E731
            if self.conditional:
                guided = classifier_free_guidance(model, y, scale, self.net.num_classes,
                                                  interval=self.guidance_interval, schedule=self.schedule)  # fmt: skip
            if guide is not None:
                # AutoGuidance evaluates its model on the whole batch with these labels: the guided one fits.
                positive = guided if takes_y else model
                guided = AutoGuidance(lambda x, t_, *_: positive(x, t_), guide, y if takes_y else None,
                                      self.autoguidance_scale)  # fmt: skip
            if use_classifier:
                guided = ClassifierGuidance(guided, self.guidance_classifier(), y, self.classifier_scale, self.schedule)
            out = guided(x_t, t)
            return out if channels is None else out[:, :channels]

        return denoiser

    # ------------------------------------------------------------------ sampling
    def initial_noise(self, indices: Tensor, seed: int | None = None) -> Tensor:
        """x_T for sample indices: sample i's noise depends only on (seed, i), never on batching or the
        number of processes (the first draw of sample i's own generator, `src.seeding.sample_generators`)."""
        return self._noise_from(sample_generators(self.sample_seed if seed is None else seed, indices))

    def _noise_from(self, generators: list[torch.Generator]) -> Tensor:
        return torch.stack([torch.randn(self.latent_shape, generator=g) for g in generators]).to(self.device)

    @torch.no_grad()
    def sample_indices(self, indices: Tensor, seed: int | None = None, progress: bool = False, **overrides) -> Tensor:
        """Samples number `indices` (images in [-1, 1]): everything random about sample i (x_T, then every noise a
        stochastic sampler adds) comes from its own generator seeded by (seed, i), and its label (conditional
        nets, classifier guidance) from `labels_for(i)`, so sample i is the same whatever batch or process
        computes it. `seed` defaults to `sample_seed`; `overrides` as in `sample`."""
        indices = torch.as_tensor(indices)
        generators = sample_generators(self.sample_seed if seed is None else seed, indices)
        x_T = self._noise_from(generators)
        y = self.labels_or_conditions(indices)
        return self.sample(x_T, generator=generators, labels=y, progress=progress, **overrides)

    @torch.no_grad()
    def sample(
        self,
        x_T: Tensor,
        progress: bool = False,
        generator: torch.Generator | list[torch.Generator] | None = None,
        labels: Tensor | None = None,
        guidance_scale: float | None = None,
        callback: Callable[[dict], None] | None = None,
        **overrides: object,
    ) -> Tensor:
        """Images in [-1, 1] from noise x_T (of `latent_shape`; decoded by the first stage where there is one) with
        the configured sampler; keyword `overrides` replace settings
        (SamplerSettings fields: sampler, steps, eta, skip, variance, clip_x0 (False, True or a
        `parameterization.DynamicThreshold`), options). Conditional nets: `labels`
        (B,) (default: all classes in turn, `labels_for(0..B-1)`) and `guidance_scale` s = 1 + w; nets with a
        `condition`: `labels` is their y, `condition_input(images)` (required). `callback(dict)`
        sees every step of the sampler (`samplers.sample`), in the space the net diffuses."""
        settings = self.settings.replace(**overrides) if overrides else self.settings
        kwargs = settings.kwargs()
        if is_continuous(settings.sampler) and self.classifier_scale == 0.0:
            # The SDE / ODE samplers step through continuous noise levels and call the net at their fractional
            # timesteps (unless the `quantize` option is set); they get its own output and convert it at each exact
            # level. With classifier guidance they get the eps-model below, whose conversion and guidance read the
            # schedule at fractional t too (`NoiseSchedule.alpha_sigma`).
            model = self.output_model(labels, guidance_scale)
            kwargs = {**kwargs, "prediction": self.prediction}
        else:
            keep_variance = settings.variance == "learned" and settings.sampler in ("ddpm", "ddpm_respaced")
            model = self.eps_model(labels, guidance_scale, keep_variance)
        latents = sample(model, x_T.to(self.device), self.schedule, generator=generator, progress=progress,
                         callback=callback, **kwargs)  # fmt: skip
        return self.decode(latents)

    def train(self, mode: bool = True) -> DiffusionModel:
        super().train(mode)
        if self.first_stage is not None:  # frozen: never dropout or batch statistics of its own
            self.first_stage.eval()
        return self

    # ------------------------------------------------------------------ files
    def save(self, folder: str | os.PathLike, overwrite: bool = False, source: dict | None = None) -> Path:
        """Write `folder/model.safetensors` (the net's weights, float32) and `folder/config.json` (network spec,
        schedule, prediction, sampler settings), which `DiffusionModel.load` reads with torch alone. A learned
        process and a first stage add their spec to config.json and their weights as `process.safetensors` and
        `first_stage.safetensors`."""
        from safetensors.torch import save_file

        out = Path(folder)
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace its files")
        spec = net_spec(self.net)
        if spec is None:
            raise ValueError(f"{type(self.net).__name__} records no constructor arguments (`config`); cannot export it")
        recipe = self.schedule_recipe or {"betas": self.schedule.betas.cpu().tolist()}
        meta = {
            **({"condition": condition_spec(self.condition)} if self.condition is not None else {}),
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "net": spec,
            "schedule": recipe,
            "prediction": self.prediction,
            "sampler": self.settings.to_dict(),
            "source": source or {},
        }
        # Parts beyond net and schedule: their spec here, their weights (in their own dtypes) in a file each.
        # A process of its own (learned, or a continuous one such as GeometricVE): its spec, not only its tables.
        own_process = self.schedule_recipe is None and not isinstance(self.process, DiscreteProcess)
        parts = {"process": self.process} if own_process else {}
        parts |= {"first_stage": self.first_stage} if self.first_stage is not None else {}
        for name, part in parts.items():
            meta[name] = net_spec(part)
            if meta[name] is None:
                raise ValueError(f"{type(part).__name__} records no constructor arguments (`config`); cannot export it")
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, out / WEIGHTS_NAME)
        for name, part in parts.items():
            part_state = {k: v.detach().contiguous() for k, v in part.state_dict().items()}
            save_file(part_state, out / PART_WEIGHTS[name])
        (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        return out

    @classmethod
    def load(
        cls, path: str | os.PathLike, device: torch.device | str = "cpu", config: str | os.PathLike | None = None
    ) -> DiffusionModel:
        """The model of any of: a DiffusionModule checkpoint (.ckpt: its EMA weights and sampler options), a folder
        written by `save` / `python -m src.export`, or a diffusers folder (UNet2DModel config.json + weights, and
        scheduler_config.json beside it or in `scheduler/`, as google/ddpm-cifar10-32 is published; without one,
        DDPM's linear 1e-4..0.02 schedule over 1000 steps). In eval mode, on `device`. `config`: the training
        YAML for old checkpoints whose network arguments are neither inside nor in the run folder's config.yaml."""
        path = Path(path)
        if path.is_file():
            model = _from_checkpoint(path, config)
        elif (path / CONFIG_NAME).is_file() and json.loads((path / CONFIG_NAME).read_text()).get(
            "format"
        ) == EXPORT_FORMAT:
            model = _from_export(path)
        elif path.is_dir():
            from src.models.convert import load_diffusers_unet

            try:
                schedule = NoiseSchedule.from_diffusers(path)
            except FileNotFoundError:
                schedule = NoiseSchedule.linear(1000, 1e-4, 0.02)
            model = cls(load_diffusers_unet(path), schedule)
        else:
            raise FileNotFoundError(f"{path}: no checkpoint file, export folder or diffusers folder here")
        return model.to(device).eval()


def _check_guidance_interval(interval: object) -> tuple[float, float]:
    """(sigma_lo, sigma_hi) of `--model.guidance.interval`; a one-line ConfigError unless 0 <= sigma_lo < sigma_hi."""
    flag = "--model.guidance.interval"
    try:
        lo, hi = (float(v) for v in interval)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ConfigError(
            f"{flag} is [sigma_lo, sigma_hi] (two noise levels, e.g. [0.3, 5.0]), got {interval!r}"
        ) from None
    if not 0.0 <= lo < hi:
        raise ConfigError(
            f"{flag} [{lo}, {hi}] must have 0 <= sigma_lo < sigma_hi (guidance where sigma_lo < sigma_t <= sigma_hi; "
            "null: everywhere)"
        )
    return lo, hi


def _from_export(folder: Path) -> DiffusionModel:
    from safetensors.torch import load_file

    meta = json.loads((folder / CONFIG_NAME).read_text())
    if meta.get("version", 0) > EXPORT_VERSION:
        raise ValueError(f"{folder}: export version {meta['version']} is newer than this code ({EXPORT_VERSION})")
    spec = meta.get("net") or {"class_path": "src.models.unet.UNet", "init_args": meta["unet"]}  # version 1: "unet"
    net = build_net(spec)
    net.load_state_dict(load_file(folder / WEIGHTS_NAME))
    recipe = dict(meta["schedule"])
    schedule = NoiseSchedule(recipe["betas"]) if "betas" in recipe else NoiseSchedule.from_name(**recipe)
    parts = {
        name: _load_part(meta[name], load_file(folder / PART_WEIGHTS[name])) for name in PART_WEIGHTS if name in meta
    }
    sampler = dict(meta.get("sampler", {}))
    prediction = meta.get("prediction") or sampler.pop("prediction", "eps")  # version 1 kept it with the sampler
    sampler.pop("prediction", None)
    settings = SamplerSettings.stored(**sampler)  # what its sampler does not read: the defaults (changes nothing)
    return DiffusionModel(
        net,
        parts.get("process", schedule),
        prediction,
        settings,
        None if "betas" in recipe else recipe,
        first_stage=parts.get("first_stage"),
        condition=meta.get("condition"),
    )


# The weights file of each optional part of an export.
PART_WEIGHTS = {"process": PROCESS_WEIGHTS_NAME, "first_stage": FIRST_STAGE_WEIGHTS_NAME}


def _load_part(spec: dict, state: dict[str, Tensor]) -> nn.Module:
    """A learned process or a first stage from its {"class_path", "init_args"} spec and its state dict (strict)."""
    part = build_net(spec)
    part.load_state_dict(state)
    return part


def _from_checkpoint(path: Path, config: str | os.PathLike | None = None) -> DiffusionModel:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    # Options by their flat names, grouped (src/options.py) or recorded flat before the groups.
    hparams = flat_options(checkpoint.get("hyper_parameters", {}))
    state_dict = upgrade_state_dict(checkpoint.get("state_dict", {}))
    prefix = CHECKPOINT_EMA_PREFIX
    state = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{path}: no EMA weights ({prefix}* or an older name) in its state_dict")
    spec = network_spec(checkpoint, path, config)
    net = build_net(spec)
    # A wrong config fails here, with torch's list of differing keys.
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(
            f"{path}: the EMA weights do not fit {spec['class_path']}({spec.get('init_args')}):\n{e}"
        ) from e
    options = {"name": hparams.get("schedule", "linear")}
    options |= {k: hparams[k] for k in ("timesteps", "beta_start", "beta_end") if hparams.get(k) is not None}
    recipe = schedule_recipe(**options)
    parts = {}
    for name, prefix in (("process", CHECKPOINT_PROCESS_PREFIX), ("first_stage", CHECKPOINT_FIRST_STAGE_PREFIX)):
        if hparams.get(name):
            parts[name] = _load_part(
                hparams[name], {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
            )
    return DiffusionModel(
        net,
        parts.get("process", NoiseSchedule.from_name(**recipe)),
        hparams.get("prediction", "eps"),
        SamplerSettings.from_options(hparams, stored=True),
        recipe,
        guidance_scale=hparams.get("guidance_scale", 1.0),
        guidance_interval=hparams.get("guidance_interval"),
        sample_labels=hparams.get("sample_labels"),
        sample_seed=hparams.get("sample_seed", 0),
        first_stage=parts.get("first_stage"),
        guidance_model=hparams.get("guidance_model"),
        autoguidance_scale=hparams.get("autoguidance_scale", 1.0),
        condition=hparams.get("condition"),
    )


def _net_from_config_file(path: Path) -> dict | None:
    """`model.net` of a LightningCLI config YAML ({"class_path": ..., "init_args": {...}}), or None."""
    import yaml  # a jsonargparse dependency; only old checkpoints need it

    config = yaml.safe_load(path.read_text()) or {}
    for section in (config, config.get("fit", {}), config.get("predict", {})):
        net = (section.get("model") or {}).get("net") if isinstance(section, dict) else None
        if net:
            return net
    return None


def network_spec(checkpoint: dict, ckpt_path: Path, config: str | os.PathLike | None = None) -> dict:
    """{"class_path", "init_args"} of a checkpoint's network: from `hyper_parameters["net"]` (DiffusionModule records
    it), else from `config`, else from the `config.yaml` the CLI writes in the run folder (beside `checkpoints/`)."""
    hparams = checkpoint.get("hyper_parameters", {})
    candidates: list[tuple[str, object]] = [("hyper_parameters['net']", lambda: hparams.get("net"))]
    if config is not None:
        candidates.append((str(config), lambda: _net_from_config_file(Path(config))))
    run_config = ckpt_path.resolve().parent.parent / "config.yaml"
    candidates.append((str(run_config), lambda: _net_from_config_file(run_config) if run_config.is_file() else None))
    for source, read in candidates:
        net = read()
        if not net:
            continue
        if isinstance(net, dict) and "class_path" in net:
            return {"class_path": net["class_path"], "init_args": dict(net.get("init_args") or {})}
        if isinstance(net, dict):  # bare UNet arguments
            return {"class_path": "src.models.unet.UNet", "init_args": dict(net)}
        raise ValueError(f"{source}: cannot read network arguments from {type(net).__name__}")
    raise ValueError(
        f"{ckpt_path}: no network arguments found (not in hyper_parameters, no {run_config}); pass --config with "
        "the YAML the model was trained with"
    )
