"""Errors that mean "the input is wrong", not "the code is wrong": the command line prints them as one line.

Each message names what is wrong and the option or file to change. `src.main` catches `UserError` (and the few
standard errors listed in `ONE_LINE_ERRORS`) and prints `error: <message>` instead of a traceback; set
`DIFFUSION_TRACEBACK=1` to see the traceback anyway.
"""

from __future__ import annotations

import difflib
import os
import re

import torch
from lightning.pytorch.cli import LightningArgumentParser


class UserError(Exception):
    """Base of the errors caused by a setting, a file or a folder the user gave."""


class ConfigError(UserError, ValueError):
    """An option value that cannot work (a ValueError, so callers that catch ValueError still do)."""


class ShapeMismatchError(ConfigError):
    """The data's images and the network disagree on channels or size."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is corrupt or that does not fit the configured model."""


class NonFiniteLossError(UserError, FloatingPointError):
    """Training produced a non-finite loss or gradient more often than allowed."""


def did_you_mean(message: str, known: list[str]) -> str:
    """`message` plus "did you mean --x?" for each unknown option or config key it names that resembles a known one."""
    quoted = re.findall(r"(?:key|option) ['\"]([\w.]+)['\"]", message)
    unknown = re.findall(r"(--[\w.]+)", message) + [f"--{k}" for k in quoted]
    hints = []
    for name in dict.fromkeys(unknown):
        if name in known:
            continue
        # Compare the last part among the options of the same group (--model.emma_decay -> --model.ema_decay):
        # whole names share their prefix, which makes unrelated options of a group look alike.
        group, _, leaf = name.rpartition(".")
        siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == group}
        close = [siblings[m] for m in difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)]
        close = close or difflib.get_close_matches(name, known, n=1, cutoff=0.85)
        if close:
            hints.append(f"{name}: did you mean {close[0]}?")
    return message + (" (" + "; ".join(hints) + ")" if hints else "")


class SuggestingArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, whose "unrecognized arguments" / unknown-key errors suggest the closest option, and
    which takes no abbreviations: argparse would otherwise run `--trainer.max_step 3` as `--trainer.max_steps 3`."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):  # type: ignore[override]
        return super().error(did_you_mean(message, _option_names(self)), ex)


def _option_names(parser) -> list[str]:
    """Every --option of a parser and of its subcommands' parsers (config-file keys are reported by the root)."""
    names = [s for action in parser._actions for s in action.option_strings if s.startswith("--")]
    for action in parser._actions:
        for sub in (getattr(action, "choices", None) or {}).values():
            if hasattr(sub, "_actions"):
                names += _option_names(sub)
    return names


def check_image_shape(data_shape: tuple[int, ...], net: object, dataset: str) -> None:
    """ShapeMismatchError (one line, naming both shapes and the options) unless the net takes the data's images."""
    in_channels, image_size = getattr(net, "in_channels", None), getattr(net, "image_size", None)
    if in_channels is None or image_size is None:
        return  # a network that does not declare its input shape: nothing to compare
    net_shape = (in_channels, image_size, image_size)
    if tuple(data_shape) != net_shape:
        raise ShapeMismatchError(
            f"--data.dataset {dataset} gives images of shape {tuple(data_shape)} (C, H, W) but the network takes "
            f"{net_shape}: set --model.net.init_args.in_channels {data_shape[0]} and "
            f"--model.net.init_args.image_size {data_shape[-1]}, or choose a matching data set"
        )


def read_checkpoint(path: str | os.PathLike) -> dict:
    """torch.load a checkpoint (memory-mapped: the tensors stay on disk), or raise CheckpointError in one line."""
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"--ckpt_path {path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # truncated zip, pickle garbage, not a torch file at all
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"--ckpt_path {path} is corrupt or not a checkpoint ({reason}); use another one, e.g. an earlier "
            "checkpoint of the same run"
        ) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"--ckpt_path {path} holds no 'state_dict': not a checkpoint of this template")
    return checkpoint


def check_checkpoint(path: str | os.PathLike, model: torch.nn.Module, most: int = 4) -> None:
    """Raise CheckpointError (one line) when `path` cannot be read as a checkpoint, or when its state_dict does not
    fit `model`: the missing and unexpected keys and the shape differences, the first `most` of each."""
    state = read_checkpoint(path)["state_dict"]
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    found = {key: tuple(value.shape) for key, value in state.items()}

    def listed(keys: list[str]) -> str:
        return ", ".join(keys[:most]) + (f" and {len(keys) - most} more" if len(keys) > most else "")

    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    reshaped = [
        f"{k} {found[k]} vs {expected[k]}" for k in sorted(expected.keys() & found.keys()) if found[k] != expected[k]
    ]
    parts = [
        f"missing {listed(missing)}" if missing else "",
        f"unexpected {listed(unexpected)}" if unexpected else "",
        f"shapes differ (checkpoint vs model): {listed(reshaped)}" if reshaped else "",
    ]
    if any(parts):
        raise CheckpointError(
            f"--ckpt_path {path} does not fit the configured model: {'; '.join(p for p in parts if p)}. "
            "Use the config the checkpoint was trained with"
        )
