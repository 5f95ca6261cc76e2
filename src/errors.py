"""Errors that mean "the input is wrong", not "the code is wrong": the command line prints them as one line.

Each message names what is wrong and the option or file to change. `src.main` catches `UserError` (and the few
standard errors listed in `ONE_LINE_ERRORS`) and prints `error: <message>` instead of a traceback; set
`DIFFUSION_TRACEBACK=1` to see the traceback anyway.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

import torch


class UserError(Exception):
    """Base of the errors caused by a setting, a file or a folder the user gave."""


class ConfigError(UserError, ValueError):
    """An option value that cannot work (a ValueError, so callers that catch ValueError still do)."""


class ShapeMismatchError(ConfigError):
    """The data's images and the network disagree on channels or size."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is corrupt or that does not fit the configured model."""


class RunNotFoundError(UserError, FileNotFoundError):
    """`--ckpt_path last` found no checkpoint of the configured run."""


class NonFiniteLossError(UserError, FloatingPointError):
    """Training produced a non-finite loss or gradient more often than allowed."""


# Options that moved to another group: a saved config.yaml or an old command line names the new one in its hint.
MOVED_OPTIONS = {
    "--model.num_fid_samples": "--fid.num_samples",
    "--model.fid_extractor": "--fid.extractor",
    "--model.fid_weights_path": "--fid.weights_path",
    "--model.fid_ref_stats": "--fid.ref_stats",
    "--model.fid_ref_split": "--fid.ref_split",
    "--model.fid_cache_dir": "--fid.cache_dir",
    "--model.fid_batch_size": "--fid.batch_size",
    # The optimizer and its schedule became parts of their own (OptimizerCallable / LRSchedulerCallable; src/optim.py).
    "--model.lr": "--model.optimizer.lr",
    "--model.weight_decay": "--model.optimizer.weight_decay",
    "--model.adam_betas": "--model.optimizer.betas",
    "--model.fused_optimizer": "--model.optimizer.fused",
    "--model.warmup_steps": "--model.lr_scheduler.warmup_steps",
}


def did_you_mean(message: str, known: list[str], moved: dict[str, str] | None = None) -> str:
    """`message` plus "did you mean --x?" for each unknown option or config key it names that resembles a known one,
    or "moved to --y" for one that `MOVED_OPTIONS` or `moved` (old flag -> new flag) names."""
    # A config file's unknown key: "Group 'model' does not accept option 'lr'" names --model.lr.
    grouped = [
        f"--{g}.{k}" for g, k in re.findall(r"Group ['\"]([\w.]+)['\"] does not accept option ['\"]([\w.]+)", message)
    ]
    quoted = re.findall(r"(?:key|option) ['\"]([\w.]+)['\"]", message)
    unknown = (
        re.findall(r"(--[\w.]+)", message)
        + grouped
        + [f"--{k}" for k in quoted if not any(g.endswith(f".{k}") for g in grouped)]
    )
    moved = MOVED_OPTIONS | (moved or {})
    hints = []
    for name in dict.fromkeys(unknown):
        if name in known:
            continue
        if name in moved:
            hints.append(f"{name} moved to {moved[name]}")
            continue
        # Compare the last part among the options of the same group (--model.emma_decay -> --model.training.ema_decay):
        # whole names share their prefix, which makes unrelated options of a group look alike.
        group, _, leaf = name.rpartition(".")
        siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == group}
        close = [siblings[m] for m in difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)]
        if not close:  # an option one group further down (--model.emma_decay -> --model.training.ema_decay)
            nested = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0].rpartition(".")[0] == group}
            close = [nested[m] for m in difflib.get_close_matches(leaf, list(nested), n=1, cutoff=0.6)]
        close = close or difflib.get_close_matches(name, known, n=1, cutoff=0.85)
        if close:
            hints.append(f"{name}: did you mean {close[0]}?")
    return message + (" (" + "; ".join(hints) + ")" if hints else "")


def one_line(message: str) -> str:
    """jsonargparse's multi-line type errors as one line: "--key VALUE: expected TYPE", plus a hint for a list or
    dict the shell split at a space (`--model.sampling.labels [3, 7]` gives the value "[3,")."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    key = re.fullmatch(r'Parser key "([^"]+)":?', lines[0]) if lines else None
    if len(lines) < 2 or key is None:
        return " ".join(lines)
    rest = "\n".join(lines[1:])
    literal = re.search(r"Expected an? (?:typing\.)?Literal\[(.*)\]\. Got value: (.*)$", rest)
    if literal:  # a value outside an option's choices: name them, and the closest
        choices = re.findall(r"'([^']*)'", literal[1])
        close = difflib.get_close_matches(literal[2], choices, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"--{key[1]} {literal[2]}: choose one of {', '.join(choices)}{hint}"
    given = re.search(r"^Given value: (.*)$", rest, flags=re.MULTILINE) or re.search(r"Got value: (.*)$", rest)
    expected = re.search(r"^Subtypes: \[(.*)\]$", rest, flags=re.MULTILINE) or re.search(r"Expected an? (.*?)\.", rest)
    if given is None or expected is None:
        return f"--{key[1]}: " + " ".join(lines[1:])
    types = re.sub(r"<class '(?:\w+\.)*(\w+)'>", r"\1", expected[1]).replace("typing.", "").replace("NoneType", "None")
    types = f"one of {types}" if expected.re.pattern.startswith("^Subtypes") else types
    value = given[1]
    hint = ""
    if value.count("[") > value.count("]") or value.count("{") > value.count("}"):
        hint = " (the shell split the value at a space: quote the whole value, '[3, 7]', or drop the spaces, [3,7])"
    return f"--{key[1]} {value}: expected {types}{hint}"


def given_paths(args: list[str]) -> set[str]:
    """The path-like strings of a command line and of the config files it names (where a user's path comes from)."""
    import yaml

    values: list[object] = []
    for i, arg in enumerate(args):
        name, equals, value = arg.partition("=")
        values.append(value if arg.startswith("--") and equals else arg)
        following = args[i + 1] if arg in ("--config", "-c") and i + 1 < len(args) else None
        config = value if name == "--config" and equals else following
        if config and os.path.isfile(config):
            try:
                values.append(yaml.safe_load(Path(config).read_text()))
            except yaml.YAMLError:
                pass
    found: set[str] = set()
    while values:
        value = values.pop()
        if isinstance(value, dict):
            values.extend(value.values())
        elif isinstance(value, list):
            values.extend(value)
        elif isinstance(value, str) and ("/" in value or "." in value) and not value.startswith("-"):
            try:
                float(value)  # a number such as 0.5 is no path
            except ValueError:
                found.add(value)
    return found


def names_a_given_path(error: FileNotFoundError, args: list[str]) -> bool:
    """Whether a FileNotFoundError is about a path from the command line or a config file (a user's mistake, not a
    bug): its file name, or its message, contains one of those strings."""
    text = f"{error.filename or ''} {error}"
    return any(value in text for value in given_paths(args))


def check_image_shape(data_shape: tuple[int, ...], net: object, dataset: str, first_stage: object = None) -> None:
    """ShapeMismatchError (one line, naming both shapes and the options) unless the net takes the data's images
    (their encoding, with a first stage)."""
    in_channels, image_size = getattr(net, "in_channels", None), getattr(net, "image_size", None)
    if in_channels is None or image_size is None:
        return  # a network that does not declare its input shape: nothing to compare
    net_shape = (in_channels, image_size, image_size)
    if first_stage is not None:
        latent = tuple(first_stage.latent_shape(tuple(data_shape)))
        if latent != net_shape:
            raise ShapeMismatchError(
                f"--data.dataset {dataset} gives images of shape {tuple(data_shape)} (C, H, W), which "
                f"{type(first_stage).__name__} encodes to {latent}, but the network takes {net_shape}: set "
                f"--model.net.init_args.in_channels {latent[0]} and --image_size {latent[-1]}"
            )
        return
    if tuple(data_shape) != net_shape:
        raise ShapeMismatchError(
            f"--data.dataset {dataset} gives images of shape {tuple(data_shape)} (C, H, W) but the network takes "
            f"{net_shape}: set --model.net.init_args.in_channels {data_shape[0]} and --image_size {data_shape[-1]}, "
            "or choose a matching data set"
        )


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when the message is empty), for one-line errors that
    wrap another."""
    message = str(error).strip()
    return message.splitlines()[0] if message else type(error).__name__


def read_checkpoint(path: str | os.PathLike) -> dict:
    """torch.load a checkpoint (memory-mapped: the tensors stay on disk), or raise CheckpointError in one line."""
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"--ckpt_path {path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # truncated zip, pickle garbage, not a torch file at all
        raise CheckpointError(
            f"--ckpt_path {path} is corrupt or not a checkpoint ({first_line(error)}); use another one, e.g. an earlier "
            "checkpoint of the same run"
        ) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"--ckpt_path {path} holds no 'state_dict': not a checkpoint of this template")
    return checkpoint


def check_checkpoint(path: str | os.PathLike, model: torch.nn.Module, most: int = 4) -> None:
    """Raise CheckpointError (one line) when `path` cannot be read as a checkpoint, or when its state_dict does not
    fit `model`: the missing and unexpected keys and the shape differences, the first `most` of each."""
    state = read_checkpoint(path)["state_dict"]
    if hasattr(model, "upgrade_state_dict"):  # keys renamed since older checkpoints (DiffusionModule)
        state = model.upgrade_state_dict(state)
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
