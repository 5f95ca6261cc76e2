"""Command line: python -m src.main fit|validate|test|predict --config configs/<x>.yaml [--option value ...].

A LightningCLI over DiffusionModule and ImageDataModule. On top of Lightning's options it adds:
  --output_dir DIR     predict: folder for the PNG files (default: <run dir>/predictions)
  --overwrite BOOL     predict: allow writing into a folder that already holds files (or over --grid_path)
  --grid_path FILE     predict: also one PNG grid of all samples (one column per class for a conditional model)
  --allow_untrained BOOL  predict: sample without --ckpt_path, from the untrained network (else an error)
  --logger_backend     auto | wandb | wandb_offline | tensorboard | csv (used when --trainer.logger is unset)
  --run_name NAME      folder/project name of the run under --trainer.default_root_dir
  --image_size S       the resolution: the net's image_size (so a folder's images) with its attention moved along
  --fid.*              FID of EMA samples in validate (--fid.num_samples N) and during fit (--fid.every_n_steps K)
and gives one of Lightning's a new meaning where the config lists a TimeBudget (src/callbacks/time_budget.py):
  --trainer.max_time   the TimeBudget's duration, the run's TOTAL training time (DD:HH:MM:SS); with --ckpt_path last
                       a larger one continues a finished run up to it
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import traceback
import warnings
from pathlib import Path

import lightning as L
import torch
from jsonargparse import Namespace
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar, Timer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only

from src.callbacks.faults import NonFiniteGuard, SignalCheckpoint
from src.callbacks.fid import FIDCallback
from src.callbacks.progress import BudgetProgressBar
from src.callbacks.rng_state import RNGStateCallback
from src.callbacks.sampling import PNGWriter, grid_columns
from src.callbacks.time_budget import TimeBudget, spent_budget_error
from src.checkpoint_io import AtomicCheckpointIO
from src.data import DatasetNotFoundError, ImageDataModule
from src.errors import (
    ConfigError,
    RunNotFoundError,
    UserError,
    check_checkpoint,
    check_image_shape,
    did_you_mean,
    first_line,
    names_a_given_path,
    one_line,
    read_checkpoint,
)
from src.lightning_compat import quiet_lightning_banner
from src.loggers import Backend, DiscardUnusedLogFolder, auto_logger
from src.models.diffusion import build_net
from src.models.unet import feature_resolutions
from src.module import DiffusionModule
from src.options import grouped_options, moved_flags, translate_arguments
from src.posthoc_ema import early_ema_guide, parse_early_ema
from src.signals import exit_after_signals, exit_on_second_signal, register_children

# The EMA copy is kept in eval mode on purpose (no dropout in the averaged weights).
# "Seed set to N" on every start adds nothing to config.yaml (which records the seed), and would stand before a
# bad option's one-line error.
logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
# Lightning's "GPU available: False", "TPU available: False" and product tips, which stood before every one-line error.
quiet_lightning_banner()

# Networks above this many parameters get a warning when they train on the CPU: the CPU recipes have 1-2M
# (configs/folder32.yaml, configs/fashion_mnist.yaml), the GPU recipes 36M and more (cifar10, folder64, folder256).
CPU_PARAMETER_LIMIT = 10_000_000

# What a checkpoint fixes when it is passed with --ckpt_path: the trained function (network and schedule).
# Everything else (sampler, steps, eta, seeds, ...) stays what the config and the command line say.
CHECKPOINT_MODEL_KEYS = ("net", "schedule", "prediction", "process", "first_stage")


class SuggestingArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, whose "unrecognized arguments" / unknown-key errors suggest the closest option, and
    which takes no abbreviations: argparse would otherwise run `--trainer.max_step 3` as `--trainer.max_steps 3`."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):  # type: ignore[override]
        """The error in one line and a pointer to --help, without argparse's usage (a hundred lines here, which
        pushed the error itself off the screen)."""
        message = did_you_mean(one_line(message), _option_names(self), moved_flags())
        if not self.exit_on_error or "JSONARGPARSE_DEBUG" in os.environ:  # it raises the ArgumentError instead
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        self.logger.error(message)
        sys.stderr.write(f"error: {message}\nsee `{_command(parser.prog)} --help` for every option\n")
        self.exit(2)


def _command(prog: str) -> str:
    """The command line that reaches a parser: "main.py [options] fit" -> "python -m src.main fit" under `-m`."""
    words = prog.replace(" [options]", "").split()
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and words and spec.name.rpartition(".")[2] == os.path.splitext(words[0])[0]:
        words[0] = f"python -m {spec.name}"
    return " ".join(words)


def _option_names(parser) -> list[str]:
    """Every --option of a parser and of its subcommands' parsers (config-file keys are reported by the root)."""
    names = [s for action in parser._actions for s in action.option_strings if s.startswith("--")]
    for action in parser._actions:
        for sub in (getattr(action, "choices", None) or {}).values():
            if hasattr(sub, "_actions"):
                names += _option_names(sub)
    return names


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def config_of_run(run_name: str) -> str | None:
    """The shipped config (configs/*.yaml) whose `run_name` is `run_name`, if any."""
    for path in sorted(CONFIGS.glob("*.yaml")):
        if re.search(rf"^run_name:\s*['\"]?{re.escape(run_name)}['\"]?\s*(#.*)?$", path.read_text(), re.MULTILINE):
            return f"configs/{path.name}"
    return None


def checkpoint_file(options: Namespace) -> str | Path | None:
    """A subcommand's --ckpt_path with `last` resolved to the configured run's newest last.ckpt (what
    instantiate_trainer resolves); None without one. `latest_checkpoint`'s RunNotFoundError when there is none."""
    ckpt_path = options.get("ckpt_path")
    if ckpt_path == "last":
        return latest_checkpoint(options.get("trainer.default_root_dir") or "runs", options["run_name"])
    return ckpt_path


def latest_checkpoint(root: str, run_name: str) -> Path:
    """The newest `<root>/<run_name>/<version>/checkpoints/last.ckpt`, for `--ckpt_path last`; a RunNotFoundError
    (one line, naming the runs under `root` that have one and their configs) when there is none."""
    candidates = sorted(Path(root, run_name).glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if candidates:
        return candidates[-1]
    message = f"--ckpt_path last: no last.ckpt under {Path(root, run_name)}/*/checkpoints (--run_name {run_name})"
    others = sorted({p.parents[2].name for p in Path(root).glob("*/*/checkpoints/last.ckpt")})
    if others:
        # The usual cause: the config of another run than the one trained (`make train` trains
        # configs/fashion_mnist_cond.yaml, whose run is fashion_mnist_cond).
        runs = []
        for name in others:
            config = config_of_run(name)
            runs.append(f"{name} (--config {config})" if config else f"{name} (--run_name {name})")
        message += (
            f"; {root} holds the checkpoints of: {', '.join(runs)}. Pass the run's --config or --run_name, "
            "or the checkpoint's path as --ckpt_path"
        )
    else:
        message += (
            f"; {root} holds no run with a checkpoint. Train first, or point --trainer.default_root_dir at the "
            "folder holding the runs, or pass the checkpoint's path as --ckpt_path"
        )
    raise RunNotFoundError(message)


# The option the data's image size follows (`--data.image_size`, to which a folder's images are converted).
IMAGE_SIZE_OPTION = "model.net.init_args.image_size"


def apply_image_size(config: Namespace) -> None:
    """`--image_size S`: the network's input size set to S (and through the link the data's, which a folder's
    images are converted to), with its attention moved to the same levels of the network (configs/folder32.yaml's
    attention at its lowest level, 8 x 8 at 32, becomes 12 x 12 at 48). Nothing when --image_size is not given."""
    size = config.get("image_size")
    net = config.get("model.net.init_args")
    if size is not None and size < 1:
        raise ConfigError(f"--image_size must be positive, got {size}")
    if size is not None and (net is None or net.get("image_size") is None) and config.get("model.image_size"):
        config.model.image_size = size  # a network sized by its module (the autoencoder's)
        if config.get("data") is not None and "image_size" in config.data:
            config.data.image_size = size
        return
    if size is None or net is None or net.get("image_size") is None:
        return
    attn, levels = net.get("attn_resolutions"), net.get("channel_mult")
    if attn is not None and levels is not None:
        old, new = feature_resolutions(net.image_size, len(levels)), feature_resolutions(size, len(levels))
        net.attn_resolutions = [new[old.index(r)] if r in old else r for r in attn]
    net.image_size = size
    if config.get("data") is not None and "image_size" in config.data:
        config.data.image_size = size  # the link from the net's image_size was applied when the options were parsed


def apply_first_stage_shape(config: Namespace) -> None:
    """With `--model.first_stage`, the data's images take the shape the first stage decodes the net's input to
    (the links set them to the net's own, which is the latent's); nothing without one."""
    spec, net = config.get("model.first_stage"), config.get("model.net.init_args")
    if spec is None or net is None or net.get("in_channels") is None or net.get("image_size") is None:
        return
    spec = spec.as_dict() if hasattr(spec, "as_dict") else dict(spec)
    channels, height, width = build_net(spec).image_shape((net.in_channels, net.image_size, net.image_size))
    if height != width:
        raise ConfigError(f"--model.first_stage decodes to {height} x {width} images; the data sets are square")
    if config.get("data") is not None:
        for key, value in (("image_size", height), ("num_channels", channels)):
            if key in config.data:
                config.data[key] = value


def check_attention_resolutions(config: Namespace) -> None:
    """ConfigError (one line) when an `attn_resolutions` size is no feature map of the network: the UNet would
    silently leave that attention out (e.g. a 32-pixel recipe's [8] after --model.net.init_args.image_size 48)."""
    net = config.get("model.net.init_args")
    attn = net.get("attn_resolutions") if net is not None else None
    size, levels = (net.get("image_size"), net.get("channel_mult")) if net is not None else (None, None)
    if not attn or size is None or levels is None:
        return
    sizes = feature_resolutions(size, len(levels))
    missing = [r for r in attn if r not in sizes]
    if missing:
        raise ConfigError(
            f"--model.net.init_args.attn_resolutions {list(attn)}: at image_size {size} this network's feature maps "
            f"are {sizes} pixels wide, so attention at {missing} would never run; pick sizes from that list, e.g. "
            f"--model.net.init_args.attn_resolutions [{sizes[-1]}] (the lowest), or change the resolution with "
            "--image_size instead, which moves the attention along"
        )


@rank_zero_only
def warn_if_gpu_sized_on_cpu(trainer: L.Trainer, net: torch.nn.Module) -> None:
    """One line when a network meant for GPUs is about to train on the CPU (configs/folder64.yaml on a laptop would
    take weeks), naming the recipes sized for a CPU. Small nets, the CPU recipes' among them, stay quiet. Logged
    through Lightning's logger, as its own notices are: a Python warning would add its file, line and source."""
    if not isinstance(trainer.accelerator, CPUAccelerator):
        return
    count = sum(p.numel() for p in net.parameters())
    if count > CPU_PARAMETER_LIMIT:
        logging.getLogger("lightning.pytorch").warning(
            f"warning: training a {count / 1e6:.0f}M-parameter network on the CPU: a GPU-sized recipe "
            "(configs/folder64.yaml trained 0.08 images/s on 2 CPU cores, ~100x slower than configs/folder32.yaml); "
            "on a CPU use configs/folder32.yaml (a folder of images) or configs/fashion_mnist.yaml, or a GPU"
        )


def fit_callbacks(configured: list, max_nonfinite_skips: int, has_logger: bool) -> list:
    """SignalCheckpoint, NonFiniteGuard, RNGStateCallback (exact resume) and, with a logger, LearningRateMonitor for
    every fit run, unless the config already lists them."""
    have = {type(c) for c in configured}
    wanted = [SignalCheckpoint(), NonFiniteGuard(max_skips=max_nonfinite_skips), RNGStateCallback()]
    if has_logger:  # the learning rate as `train/lr`, the name configure_optimizers gives the scheduler
        wanted.append(LearningRateMonitor(logging_interval="step"))
    return [callback for callback in wanted if type(callback) not in have]


def apply_max_time(config: dict, kwargs: dict) -> None:
    """`--trainer.max_time` sets the duration of a TimeBudget the config lists (its total training time), instead
    of Lightning ignoring it behind an info line ("callbacks list already contains a Timer")."""
    max_time = config.get("max_time")
    budgets = [c for c in config.get("callbacks") or [] if isinstance(c, TimeBudget)]
    if max_time is None or not budgets:
        return
    for budget in budgets:
        budget.set_duration(max_time)
    kwargs["max_time"] = None  # the TimeBudget is the run's Timer; a second one would stop it on its own clock


def budget_progress_bar(configured: list, enable_progress_bar: bool | None) -> list:
    """A BudgetProgressBar (the bar shows the time budget, not the epoch) for a run with a TimeBudget, unless the
    config lists a progress bar or turns it off."""
    wanted = enable_progress_bar is not False and any(isinstance(c, TimeBudget) for c in configured)
    return [BudgetProgressBar()] if wanted and not any(isinstance(c, ProgressBar) for c in configured) else []


class DiffusionCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--output_dir",
            type=str | None,
            default=None,
            help="predict: folder for one PNG per sample (default: <run dir>/predictions/<time>)",
        )
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="predict: allow writing into an --output_dir that already holds files, and over --grid_path",
        )
        parser.add_argument(
            "--grid_path",
            type=str | None,
            default=None,
            help="predict: also write one PNG grid of all samples, in index order, to this file (a class-"
            "conditional model: one column per class); default: no grid",
        )
        parser.add_argument(
            "--allow_untrained",
            type=bool,
            default=False,
            help="predict: sample without --ckpt_path, i.e. from the untrained (random) network, on purpose",
        )
        parser.add_argument(
            "--logger_backend",
            type=Backend,
            default="auto",
            help="used when --trainer.logger is not set (auto: wandb if logged in, else TensorBoard; never prompts)",
        )
        parser.add_argument("--run_name", type=str, default="ddpm", help="name of the run's log folder")
        parser.add_argument(
            "--image_size",
            type=int | None,
            default=None,
            help="the resolution in one flag: sets --model.net.init_args.image_size (and so the size a folder's "
            "images are converted to) and moves the net's attn_resolutions to the same levels of the network "
            "(null: the config's size)",
        )
        parser.add_argument(
            "--max_nonfinite_skips",
            type=int,
            default=0,
            help="fit: skip up to this many steps with a non-finite loss or gradient, then stop (0: stop at "
            "the first); see src/callbacks/faults.py",
        )
        if issubclass(self.model_class, DiffusionModule):  # a model that samples (not the guidance classifier's CLI)
            # FID as a callback with its own option group: --fid.num_samples, --fid.extractor, ... in --help and
            # config.yaml; LightningCLI appends the instance to the trainer's callbacks in every subcommand.
            parser.add_lightning_class_args(FIDCallback, "fid")
        parser.set_defaults({"trainer.default_root_dir": "runs"})
        # One source of truth for the image shape: a folder of images is converted to the network's input.
        # A model whose network is sized by the module (the fully convolutional autoencoder) names its own option.
        parser.link_arguments(getattr(self.model_class, "image_size_option", IMAGE_SIZE_OPTION), "data.image_size")
        parser.link_arguments("model.net.init_args.in_channels", "data.num_channels")

    def _option(self, key: str, default: object = None) -> object:
        """A top-level option of the parsed command line, for the running subcommand (or without one)."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        return config.get(key, default)

    def _parse_ckpt_path(self) -> None:  # overrides a private LightningCLI step: see src/lightning_compat.py
        # Lightning's own version replaces *every* model option with the checkpoint's, which would silently
        # ignore `predict --model.sampling.steps 10`; we take only the architecture from the checkpoint.
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        try:
            # `--ckpt_path last` resolved, so that `make sample` and `--ckpt_path last` take the architecture from the
            # checkpoint as an explicit path does.
            ckpt_path = checkpoint_file(self.config[subcommand])
        except FileNotFoundError:
            return  # reported by instantiate_trainer
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        # Checkpoints written before the options were grouped recorded the schedule's as flat names.
        hparams = grouped_options(read_checkpoint(ckpt_path).get("hyper_parameters", {}))
        architecture = {key: hparams[key] for key in CHECKPOINT_MODEL_KEYS if key in hparams}
        if architecture:
            self.config = self.parser.parse_object({subcommand: {"model": architecture}}, self.config)

    def instantiate_classes(self) -> None:
        """A network, first stage or autoencoder whose constructor refuses its arguments (a ValueError raised in the
        model layer, e.g. num_heads not dividing a width, an unknown conditioning) is bad input: a ConfigError, so
        the command line prints it as one line. So is a part's own ConfigError that jsonargparse wrapped while
        instantiating a typed option (e.g. `--model.timestep_distribution.std 0`). Other errors pass unchanged."""
        try:
            super().instantiate_classes()
        except ValueError as error:
            cause = error.__cause__
            while cause is not None and not isinstance(cause, UserError):
                cause = cause.__cause__
            if cause is not None and not isinstance(error, UserError):
                raise cause from error
            frames = traceback.extract_tb(error.__traceback__)
            raised_in_models = bool(frames) and f"{os.sep}src{os.sep}models{os.sep}" in frames[-1].filename
            if isinstance(error, UserError) or not raised_in_models:
                raise
            raise ConfigError(f"--model: {error}") from error

    def before_instantiate_classes(self) -> None:
        self._check_untrained_predict()
        config = self.config[self.subcommand] if self.subcommand else self.config
        apply_image_size(config)
        apply_first_stage_shape(config)
        if self.subcommand == "fit" and not config.get("ckpt_path"):  # a checkpoint's net is what it was trained as
            check_attention_resolutions(config)

    def _check_shapes(self) -> None:
        data = self.datamodule
        if data is not None and hasattr(data, "image_shape"):
            first_stage = getattr(getattr(self.model, "model", None), "first_stage", None)  # none in the classifier CLI
            check_image_shape(data.image_shape, self.model.net, getattr(data, "dataset", "?"), first_stage)

    def _check_checkpoint(self) -> None:
        """A --ckpt_path that is corrupt or does not fit the model fails here, in one line, before anything runs."""
        path = self._option("ckpt_path")
        if not path or path in ("last", "best", "hpc", "registry") or "://" in str(path):
            return  # names Lightning resolves itself, and remote files
        check_checkpoint(path, self.model)

    def _check_guidance(self) -> None:
        """Classifier-free guidance needs a class-conditional net; on an unconditional one the scale would be
        ignored, so a guidance_scale other than 1 fails in one line instead. So does a guidance interval with no
        guidance to limit (a scale of 1), and half an autoguidance (a guide without a scale, or a scale without a
        guide). The guide is loaded here, so that a missing or unfit file fails at once."""
        if not isinstance(self.model, DiffusionModule):
            return
        guidance = self.model.hparams["guidance"]
        scale, interval = guidance["scale"], guidance["interval"]
        guidance_model, autoguidance_scale = guidance["model"], guidance["autoguidance_scale"]
        if interval is not None and scale == 1.0:
            raise ConfigError(
                f"--model.guidance.interval {list(interval)} limits classifier-free guidance, which is off "
                "(--model.guidance.scale 1): for no guidance add --model.guidance.interval null (the config may set "
                "one), else pass a --model.guidance.scale s above 1 (e.g. 3.0)"
            )
        if autoguidance_scale != 1.0 and not guidance_model:
            raise ConfigError(
                f"--model.guidance.autoguidance_scale {autoguidance_scale} needs the weaker model to guide with: "
                "--model.guidance.model PATH (a checkpoint or export; python -m src.posthoc_ema RUN --step N makes one)"
            )
        if guidance_model:
            if autoguidance_scale == 1.0:
                raise ConfigError(
                    f"--model.guidance.model {guidance_model} is the weaker model of autoguidance, which is off "
                    "(--model.guidance.autoguidance_scale 1): pass a --model.guidance.autoguidance_scale a above 1 "
                    "(e.g. 2.0), or drop it"
                )
            early_ema = parse_early_ema(guidance_model)
            if early_ema is not None:
                self._resolve_early_ema_guide(guidance_model, *early_ema)
            elif not Path(guidance_model).exists():
                raise ConfigError(
                    f"--model.guidance.model {guidance_model}: no such checkpoint or export folder (make one with "
                    "python -m src.posthoc_ema RUN --step N, or python -m src.export)"
                )
            try:
                self.model.model.guide()
            except ConfigError:
                raise
            except (ValueError, OSError, RuntimeError) as e:
                raise ConfigError(f"--model.guidance.model {guidance_model}: {first_line(e)}") from e
        if self.model.conditional:
            return
        if scale != 1.0:
            ckpt_path = self._option("ckpt_path")
            source = f"the network of --ckpt_path {ckpt_path}" if ckpt_path else "the network"
            raise ConfigError(
                f"--model.guidance.scale {scale}: classifier-free guidance needs a class-conditional net, and "
                f"{source} is unconditional; leave --model.guidance.scale at 1, train a conditional net "
                "(--model.net.init_args.num_classes K, e.g. configs/fashion_mnist_cond.yaml), or guide it by a "
                "weaker model (autoguidance: --model.guidance.model PATH --model.guidance.autoguidance_scale 2)"
            )

    def _before_run(self) -> None:
        # Before any data is loaded or a step runs: a network that cannot take the images, a mistyped data folder or
        # checkpoint fail at once, in one line.
        check_data_dir = getattr(self.datamodule, "check_data_dir", None)
        if check_data_dir is not None:
            check_data_dir()
        self._check_shapes()
        self._check_guidance()
        self._check_checkpoint()
        if hasattr(self.datamodule, "check_num_classes"):  # a folder's classes, before it is decoded
            self.datamodule.check_num_classes(getattr(getattr(self.model, "net", None), "num_classes", None))

    def _resolve_early_ema_guide(self, spec: str, fraction: float, sigma_rel: float) -> None:
        """`--model.guidance.model posthoc_ema@<fraction>[,<sigma_rel>]`: the guide is reconstructed from the snapshots
        of the run of --ckpt_path, at `fraction` of its steps (src.posthoc_ema.early_ema_guide), and handed to the
        model, which then never looks for a file of that name."""
        if self.subcommand == "fit":
            raise ConfigError(
                f"--model.guidance.model {spec} guides a trained run's sampling (predict, validate or test with "
                "--ckpt_path); for fit, name a guide file or leave autoguidance off"
            )
        ckpt = checkpoint_file(self.config[self.subcommand])
        if not ckpt or not Path(ckpt).is_file():
            raise ConfigError(f"--model.guidance.model {spec} is made from the run of --ckpt_path: pass a checkpoint")
        guide, summary = early_ema_guide(ckpt, fraction, sigma_rel)
        self.model.model.set_guide(guide)
        rank_zero_info(
            f"Autoguidance: the guide is this run's EMA (sigma_rel {sigma_rel}) at step {summary['step']} of "
            f"{summary['of_steps']}, from {summary['snapshots']} post-hoc EMA snapshots (profile error "
            f"{summary['profile_error']:.1%})"
        )

    def _check_time_left(self) -> None:
        """Continuing a run whose time budget is spent fails here in one line, before config.yaml or a log is
        written (TimeBudget.on_fit_start would raise the same inside fit, after both)."""
        path = self._option("ckpt_path")
        timers = [c for c in self.trainer.callbacks if isinstance(c, Timer) and c._duration]
        if not path or not timers or not Path(path).is_file():
            return
        saved = read_checkpoint(path).get("callbacks") or {}
        for timer in timers:
            elapsed = (saved.get(timer.state_key) or {}).get("time_elapsed", {}).get("train", 0.0)
            error = spent_budget_error(
                elapsed, timer._duration, self.trainer.max_steps, f"--ckpt_path {path}", isinstance(timer, TimeBudget)
            )
            if error is not None:
                raise error

    def before_fit(self) -> None:
        self._before_run()
        self._check_time_left()
        warn_if_gpu_sized_on_cpu(self.trainer, getattr(self.model, "net", self.model))

    before_validate = before_test = _before_run

    def before_predict(self) -> None:
        self._check_guidance()
        self._check_checkpoint()

    def _check_untrained_predict(self) -> None:
        # Sampling random weights writes plausible-looking files and a success message: only on request. Checked
        # on the parsed options, before the model or the trainer is built.
        options = self.config.get(self.subcommand) if self.subcommand == "predict" else None
        if options is not None and not options.get("ckpt_path") and not options.get("allow_untrained"):
            raise ConfigError(
                "predict needs trained weights: pass --ckpt_path CKPT (a checkpoint file) or --ckpt_path last (the "
                "newest last.ckpt of --run_name under --trainer.default_root_dir), or --allow_untrained true to "
                "sample the untrained network"
            )

    def instantiate_trainer(self, **kwargs):
        config = self._option("trainer", default={})
        root = config.get("default_root_dir") or "runs"
        run_name = self._option("run_name")
        version = None
        if self._option("ckpt_path") == "last":
            # Lightning resolves "last" inside the *new* run's folder, which is empty; resume the newest run.
            ckpt = latest_checkpoint(root, run_name)
            (self.config_init[self.subcommand] if self.subcommand else self.config_init)["ckpt_path"] = str(ckpt)
            version = ckpt.parent.parent.name if self.subcommand == "fit" else None
        if self.subcommand == "predict":
            # Predict writes PNG files only: no config.yaml dropped into the root folder, no empty log folders.
            self.save_config_callback = None
        if self.subcommand == "predict" and config.get("logger") in (None, True):
            kwargs["logger"] = False
        elif config.get("logger") in (None, True):
            kwargs["logger"] = auto_logger(root, run_name, self._option("logger_backend"), version)
        if not config.get("plugins"):
            kwargs["plugins"] = [AtomicCheckpointIO()]
        apply_max_time(config, kwargs)
        configured = list(config.get("callbacks") or [])  # kwargs["callbacks"] replaces the config's list
        if self.subcommand in ("fit", None):  # None: run=False, the caller may still fit
            max_skips = self._option("max_nonfinite_skips")
            has_logger = kwargs.get("logger", config.get("logger")) not in (None, False)
            kwargs["callbacks"] = configured + fit_callbacks(configured, max_skips, has_logger)
            kwargs["callbacks"] += budget_progress_bar(configured, config.get("enable_progress_bar"))
        if self.subcommand != "predict" and "logger" in kwargs:
            # A run that fails before its first step leaves no empty version_N behind (the next run takes its number).
            kwargs["callbacks"] = kwargs.get("callbacks", configured) + [DiscardUnusedLogFolder(root, run_name)]
        trainer = super().instantiate_trainer(**kwargs)
        if sum(isinstance(callback, FIDCallback) for callback in trainer.callbacks) > 1:
            # LightningCLI always adds the `fid` section's instance; a second one would compute FID twice.
            raise ConfigError(
                "FIDCallback is listed under trainer.callbacks and is also the `fid` section: remove it from "
                "trainer.callbacks and set its options with --fid.* (docs/evaluation.md)"
            )
        # A forced exit on a second signal (the first, outside fit) takes the DDP ranks this process launched with it.
        register_children(trainer, lambda trainer: getattr(trainer.strategy.launcher, "procs", None) or [])
        exit_after_signals(2 if self.subcommand in ("fit", None) else 1)
        if self.subcommand == "predict":
            output_dir = self._option("output_dir") or os.path.join(root, "predictions", time.strftime("%Y%m%d-%H%M%S"))
            grid_path = self._option("grid_path")
            columns = grid_columns(self.model) if grid_path else None
            trainer.callbacks.append(
                PNGWriter(Path(output_dir), self._option("overwrite"), grid_path=grid_path, grid_columns=columns)
            )
        return trainer


def warn_options_before_config(args: list[str]) -> None:
    """One line on stderr naming the options given before the first --config: jsonargparse applies the arguments
    in order, so the config file replaces any of them it sets, without a word."""
    first = next((i for i, a in enumerate(args) if a in ("--config", "-c") or a.startswith("--config=")), None)
    if first is None:
        return
    early = [a.split("=")[0] for a in args[:first] if a.startswith("--") and a.split("=")[0] not in NOT_OVERRIDDEN]
    if early:
        *rest, last = dict.fromkeys(early)
        names, one = (f"{', '.join(rest)} and {last}" if rest else last), not rest
        sys.stderr.write(
            f"warning: {names} come{'s' if one else ''} before --config, which is applied after {'it' if one else 'them'}"
            " and replaces any value its file sets: put options after --config\n"
        )


NOT_OVERRIDDEN = ("--help", "--print_config")  # actions, not values a config file could replace


def cli_main(args: list[str] | None = None, run: bool = True, model_class: type = DiffusionModule) -> DiffusionCLI:
    if issubclass(model_class, DiffusionModule):  # the flat options of earlier versions: renamed, or one line
        if args is None:  # LightningCLI reads sys.argv itself (and warns when it is also given as args)
            sys.argv[1:] = translate_arguments(sys.argv[1:])
        else:
            args = translate_arguments(list(args))
    warn_options_before_config(sys.argv[1:] if args is None else list(args))
    return DiffusionCLI(
        model_class,
        ImageDataModule,
        args=args,
        run=run,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_class=SuggestingArgumentParser,  # unknown options get a did-you-mean hint
    )


def run(model_class: type = DiffusionModule) -> None:
    """The command-line entry point, for `model_class` (also used by `python -m src.classifier_main`)."""
    exit_on_second_signal()
    try:
        cli_main(model_class=model_class)
    except (UserError, DatasetNotFoundError, FileExistsError, FileNotFoundError) as error:
        # Bad input, not a bug: one line instead of a traceback (DIFFUSION_TRACEBACK=1 shows it). A missing file
        # counts when the command line or a config file named it.
        user_error = not isinstance(error, FileNotFoundError) or isinstance(error, UserError)
        if os.environ.get("DIFFUSION_TRACEBACK") or not (user_error or names_a_given_path(error, sys.argv[1:])):
            raise
        sys.exit(f"error: {one_line(str(error))}")


if __name__ == "__main__":
    run()
