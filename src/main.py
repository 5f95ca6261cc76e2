"""Command line: python -m src.main fit|validate|test|predict --config configs/<x>.yaml [--option value ...].

A LightningCLI over DiffusionModule and ImageDataModule. On top of Lightning's options it adds:
  --output_dir DIR     predict: folder for the PNG files (default: <run dir>/predictions)
  --overwrite BOOL     predict: allow writing into a folder that already holds files
  --logger_backend     auto | wandb | wandb_offline | tensorboard | csv (used when --trainer.logger is unset)
  --run_name NAME      folder/project name of the run under --trainer.default_root_dir
  --image_size S       the resolution: the net's image_size (so a folder's images) with its attention moved along
  --fid.*              FID of EMA samples in validate (--fid.num_samples N) and during fit (--fid.every_n_steps K)
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from jsonargparse import Namespace
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from src.callbacks.faults import NonFiniteGuard, SignalCheckpoint
from src.callbacks.fid import FIDCallback
from src.callbacks.rng_state import RNGStateCallback
from src.callbacks.sampling import PNGWriter
from src.checkpoint_io import AtomicCheckpointIO
from src.data import DatasetNotFoundError, ImageDataModule
from src.errors import (
    ConfigError,
    UserError,
    check_checkpoint,
    check_image_shape,
    did_you_mean,
    one_line,
    read_checkpoint,
)
from src.loggers import auto_logger
from src.models.unet import feature_resolutions
from src.module import DiffusionModule
from src.signals import exit_after_signals, exit_on_second_signal, register_children

# The EMA copy is kept in eval mode on purpose (no dropout in the averaged weights).
# "Seed set to N" on every start adds nothing to config.yaml (which records the seed), and would stand before a
# bad option's one-line error.
logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")

# Networks above this many parameters get a warning when they train on the CPU: the CPU recipes have 1-2M
# (configs/folder32.yaml, configs/fashion_mnist.yaml), the GPU recipes 36M and more (cifar10, folder64, folder256).
CPU_PARAMETER_LIMIT = 10_000_000

# What a checkpoint fixes when it is passed with --ckpt_path: the trained function (network and schedule).
# Everything else (sampler, steps, eta, seeds, ...) stays what the config and the command line say.
CHECKPOINT_MODEL_KEYS = ("net", "schedule", "timesteps", "beta_start", "beta_end", "prediction")


class SuggestingArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, whose "unrecognized arguments" / unknown-key errors suggest the closest option, and
    which takes no abbreviations: argparse would otherwise run `--trainer.max_step 3` as `--trainer.max_steps 3`."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):  # type: ignore[override]
        """The error in one line and a pointer to --help, without argparse's usage (a hundred lines here, which
        pushed the error itself off the screen)."""
        message = did_you_mean(one_line(message), _option_names(self))
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


def latest_checkpoint(root: str, run_name: str) -> Path:
    """The newest `<root>/<run_name>/<version>/checkpoints/last.ckpt`, for `--ckpt_path last`."""
    candidates = sorted(Path(root, run_name).glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(
            f"--ckpt_path last: no last.ckpt under {Path(root, run_name)}/*/checkpoints; train first "
            "(same --run_name and --trainer.default_root_dir) or pass the checkpoint's path"
        )
    return candidates[-1]


def apply_image_size(config: Namespace) -> None:
    """`--image_size S`: the network's input size set to S (and through the link the data's, which a folder's
    images are converted to), with its attention moved to the same levels of the network (configs/folder32.yaml's
    attention at its lowest level, 8 x 8 at 32, becomes 12 x 12 at 48). Nothing when --image_size is not given."""
    size = config.get("image_size")
    net = config.get("model.net.init_args")
    if size is None or net is None or net.get("image_size") is None:
        return
    if size < 1:
        raise ConfigError(f"--image_size must be positive, got {size}")
    attn, levels = net.get("attn_resolutions"), net.get("channel_mult")
    if attn is not None and levels is not None:
        old, new = feature_resolutions(net.image_size, len(levels)), feature_resolutions(size, len(levels))
        net.attn_resolutions = [new[old.index(r)] if r in old else r for r in attn]
    net.image_size = size
    if config.get("data") is not None and "image_size" in config.data:
        config.data.image_size = size  # the link from the net's image_size was applied when the options were parsed


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
            help="predict: allow writing into an --output_dir that already holds files",
        )
        parser.add_argument(
            "--logger_backend",
            type=str,
            default="auto",
            help="auto | wandb | wandb_offline | tensorboard | csv; used when --trainer.logger "
            "is not set (auto: wandb if logged in, else TensorBoard; never prompts)",
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
        parser.link_arguments("model.net.init_args.image_size", "data.image_size")
        parser.link_arguments("model.net.init_args.in_channels", "data.num_channels")

    def _option(self, key: str, default: object = None) -> object:
        """A top-level option of the parsed command line, for the running subcommand (or without one)."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        return config.get(key, default)

    def _parse_ckpt_path(self) -> None:  # overrides a private LightningCLI step: see src/lightning_compat.py
        # Lightning's own version replaces *every* model option with the checkpoint's, which would silently
        # ignore `predict --model.sampling_steps 10`; we take only the architecture from the checkpoint.
        subcommand = self.config.get("subcommand")
        ckpt_path = subcommand and self.config[subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        hparams = read_checkpoint(ckpt_path).get("hyper_parameters", {})
        architecture = {key: hparams[key] for key in CHECKPOINT_MODEL_KEYS if key in hparams}
        if architecture:
            self.config = self.parser.parse_object({subcommand: {"model": architecture}}, self.config)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        apply_image_size(config)
        if self.subcommand == "fit" and not config.get("ckpt_path"):  # a checkpoint's net is what it was trained as
            check_attention_resolutions(config)

    def _check_shapes(self) -> None:
        data = self.datamodule
        if data is not None and hasattr(data, "image_shape"):
            check_image_shape(data.image_shape, self.model.net, getattr(data, "dataset", "?"))

    def _check_checkpoint(self) -> None:
        """A --ckpt_path that is corrupt or does not fit the model fails here, in one line, before anything runs."""
        path = self._option("ckpt_path")
        if not path or path in ("last", "best", "hpc", "registry") or "://" in str(path):
            return  # names Lightning resolves itself, and remote files
        check_checkpoint(path, self.model)

    def _before_run(self) -> None:
        # Before any data is loaded or a step runs: a network that cannot take the images fails at once, in one line.
        self._check_shapes()
        self._check_checkpoint()
        if hasattr(self.datamodule, "check_num_classes"):  # a folder's classes, before it is decoded
            self.datamodule.check_num_classes(getattr(getattr(self.model, "net", None), "num_classes", None))

    def before_fit(self) -> None:
        self._before_run()
        warn_if_gpu_sized_on_cpu(self.trainer, getattr(self.model, "net", self.model))

    before_validate = before_test = _before_run
    before_predict = _check_checkpoint

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
        if self.subcommand in ("fit", None):  # None: run=False, the caller may still fit
            configured = list(config.get("callbacks") or [])  # kwargs["callbacks"] replaces the config's list
            max_skips = self._option("max_nonfinite_skips")
            has_logger = kwargs.get("logger", config.get("logger")) not in (None, False)
            kwargs["callbacks"] = configured + fit_callbacks(configured, max_skips, has_logger)
        trainer = super().instantiate_trainer(**kwargs)
        if sum(isinstance(callback, FIDCallback) for callback in trainer.callbacks) > 1:
            # LightningCLI always adds the `fid` section's instance; a second one would compute FID twice.
            raise ConfigError(
                "FIDCallback is listed under trainer.callbacks and is also the `fid` section: remove it from "
                'trainer.callbacks and set its options with --fid.* (README "Evaluation")'
            )
        # A forced exit on a second signal (the first, outside fit) takes the DDP ranks this process launched with it.
        register_children(lambda: getattr(trainer.strategy.launcher, "procs", None) or [])
        exit_after_signals(2 if self.subcommand in ("fit", None) else 1)
        if self.subcommand == "predict":
            output_dir = self._option("output_dir") or os.path.join(root, "predictions", time.strftime("%Y%m%d-%H%M%S"))
            trainer.callbacks.append(PNGWriter(Path(output_dir), overwrite=self._option("overwrite")))
        return trainer


def cli_main(args: list[str] | None = None, run: bool = True, model_class: type = DiffusionModule) -> DiffusionCLI:
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
    except (UserError, DatasetNotFoundError, FileExistsError) as error:
        # Bad input, not a bug: one line instead of a traceback (DIFFUSION_TRACEBACK=1 shows it).
        if os.environ.get("DIFFUSION_TRACEBACK"):
            raise
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    run()
