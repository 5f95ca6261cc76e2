"""Every shell command and Python snippet of README.md, docs/*.md and notebooks/README.md runs here, so that a
renamed flag, config, folder or function fails a test instead of a user.

Each command is checked as deeply as is cheap (the whole file takes well under a minute of CPU):

- `python -m src.main ...`, `python -m src.classifier_main ...` and `python -m src.autoencoder_main ...`: parsed in
  this process with `--print_config`
  appended: LightningCLI's full parse, every `--config` file read and every option and value validated;
- `make TARGET VAR=value ...`: every variable given must be one the Makefile reads, and `make -n` (which prints the
  recipe and runs nothing) must succeed; each `python -m ...` line it prints is then checked like the above, so
  `ARGS`, `CONFIG`, `CKPT` ... really reach the command line;
- `python -m src.export ...`: run for real, on the tiny checkpoint below;
- any other `python -m MODULE ...` or `python SCRIPT.py ...`: run until its argparse parser has parsed the
  arguments, then stopped (a renamed or misspelt flag fails; nothing heavy runs); a script without a parser is
  byte-compiled;
- `bash SCRIPT.sh CONFIG ...` and `sbatch SCRIPT.sh CONFIG ...` (the SLURM and torchrun jobs): `bash -n`, and the
  `python -m src.main fit --config CONFIG ...` they run is parsed as above;
- `python -m pytest FILES`: the files exist;
- each ```python block: executed, a document's blocks in order in one namespace, as a reader runs them in one
  session.

Everything runs in a sandbox folder that looks like a checkout after `make train`: links to the repository's
folders and a tiny `runs/fashion_mnist_cond/version_0/checkpoints/last.ckpt` trained for 2 steps (with its post-hoc
EMA snapshots, for the docs' autoguidance commands), plus a small
folder of images (`my_images/`), a folder of samples, an autoguidance guide (`runs/guides/`) and a diffusers-format
folder (`ddpm-cifar10-32/`, a tiny UNet standing in for the published one), so the documents' own paths resolve. Placeholders in capitals stand for
such files: CKPT (a checkpoint), DIR (a folder of images), SAMPLES (a folder of samples).

A block that cannot run here (it installs packages, needs a network or a GPU) starts with the line
`# not run: <why>`; `test_opt_outs_stay_few` keeps those few. Any other command this file does not know how to
check fails `test_shell_command`: teach it here, or mark the block.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import py_compile
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from src.data import DATASETS

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "notebooks" / "README.md"]
OPT_OUT = re.compile(r"^# not run: (\S.*)$")
MAX_OPT_OUTS = 3

# Placeholders (a capitalised word, not a Make variable assignment) -> what stands for them in the sandbox.
PLACEHOLDERS = {
    "CKPT": "runs/fashion_mnist_cond/version_0/checkpoints/last.ckpt",
    "DIR": "my_images",
    "SAMPLES": "samples_dir",
}
PLACEHOLDER = re.compile(rf"\b({'|'.join(PLACEHOLDERS)})\b(?!=)")

# Commands that rely on interfaces other branches of issue 22 deliver (the Makefile's MINUTES, predict's --grid_path,
# configs/folder32.yaml). Strict: once those branches are merged these commands pass, the XPASS fails, and the entry
# is to be deleted here.
PENDING_MERGE = {}

needs_fashion_mnist = pytest.mark.skipif(
    not any(Path(d).is_dir() for d in DATASETS["fashion_mnist"].system_dirs),
    reason="Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)",
)
pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ the documents
@dataclass
class Block:
    document: str  # path relative to the repository
    line: int  # line of the opening fence
    language: str
    text: str

    @property
    def opt_out(self) -> str | None:
        first = self.text.lstrip("\n").split("\n", 1)[0].strip()
        match = OPT_OUT.match(first)
        return match[1] if match else None


def code_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a markdown file, indentation (inside list items) removed."""
    blocks, current, body = [], None, []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fence = re.match(r"^(\s*)```(\w*)\s*$", line)
        if current is None and fence:
            current, body = (number, fence[1], fence[2]), []
        elif current is not None and re.match(r"^\s*```\s*$", line):
            start, indent, language = current
            text = "\n".join(b[len(indent) :] if b.startswith(indent) else b.lstrip() for b in body)
            blocks.append(Block(str(path.relative_to(REPO)), start, language, text + "\n"))
            current = None
        elif current is not None:
            body.append(line)
    assert current is None, f"{path.name}: a code block opened at line {current[0]} is never closed"
    return blocks


def shell_commands(block: Block) -> list[tuple[int, str]]:
    """(line, command) of a bash block: backslash continuations joined, comments and blank lines dropped."""
    commands, pending, first = [], "", None
    for offset, line in enumerate(block.text.splitlines(), start=1):
        if first is None:
            first = block.line + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        command, pending = (pending + line).strip(), ""
        if command and not command.startswith("#"):
            commands.append((first, command))
        first = None
    return commands


ALL_BLOCKS = [block for path in DOCUMENTS for block in code_blocks(path)]
RUN_BLOCKS = [block for block in ALL_BLOCKS if block.opt_out is None]


def _marks(command: str) -> list:
    return [pytest.mark.xfail(strict=True, reason=f"waits for {why}") for key, why in PENDING_MERGE.items()
            if key in command]  # fmt: skip


SHELL_CASES = [
    pytest.param(command, id=f"{block.document}:{line}", marks=_marks(command))
    for block in RUN_BLOCKS
    if block.language == "bash"
    for line, command in shell_commands(block)
]
PYTHON_DOCUMENTS = sorted({block.document for block in RUN_BLOCKS if block.language == "python"})


# ------------------------------------------------------------------------------------------------ the sandbox
# The tiny run saves its checkpoint only (no sample grid: it would take longer than the training).
CHECKPOINT_ONLY = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                   "init_args": {"save_last": True, "save_top_k": 0}}  # fmt: skip


# Its post-hoc EMA snapshots, from which the docs' autoguidance commands make their guide (posthoc_ema@0.25).
POSTHOC_EVERY_STEP = {"class_path": "src.callbacks.posthoc_ema.PostHocEMA", "init_args": {"every_n_steps": 1}}


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder that looks like a checkout after `make train` (see the module docstring)."""
    import torch

    from src.diffusion.schedule import NoiseSchedule
    from src.main import cli_main
    from src.models.convert import save_diffusers_unet
    from src.models.unet import UNet

    root = tmp_path_factory.mktemp("docs_sandbox")
    for name in ("src", "configs", "scripts", "benchmarks", "tests", "notebooks", "docs", "Makefile",
                 "pyproject.toml", "README.md"):  # fmt: skip
        (root / name).symlink_to(REPO / name)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        cli_main(["fit", "--config", "configs/fashion_mnist_cond.yaml", "--trainer.default_root_dir", "runs",
                  "--model.net.init_args.base_channels", "8", "--model.net.init_args.norm_groups", "4",
                  "--model.sampling.steps", "3", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
                  "--data.batch_size", "8", "--logger_backend", "csv", "--trainer.enable_progress_bar", "false",
                  "--trainer.enable_model_summary", "false",
                  "--trainer.callbacks", json.dumps([CHECKPOINT_ONLY, POSTHOC_EVERY_STEP])])  # fmt: skip
    finally:
        os.chdir(cwd)
    assert (root / PLACEHOLDERS["CKPT"]).is_file()
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):  # a folder of images with two classes
        (root / "my_images" / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(
                root / "my_images" / cls / f"{i}.png"
            )
    (root / "samples_dir").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(root / "samples_dir" / f"{i}_{i}.png")
    torch.manual_seed(0)  # a stand-in for google/ddpm-cifar10-32: the same files, a tiny network
    save_diffusers_unet(UNet(in_channels=3, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                             attn_resolutions=(), image_size=8, norm_groups=4), root / "ddpm-cifar10-32")  # fmt: skip
    schedule = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                "beta_schedule": "linear"}  # fmt: skip
    (root / "ddpm-cifar10-32" / "scheduler_config.json").write_text(json.dumps(schedule))
    # A tiny stand-in for what `python -m src.autoencoder_main fit` writes, which configs/fashion_mnist_latent.yaml reads
    # (its shapes: 28x28x1 images to 7x7x4 latents).
    from src.models.autoencoder import AutoencoderKL, save_autoencoder

    save_autoencoder(AutoencoderKL(1, 1, (8, 8, 8), 1, 4, 4, False),
                     root / "runs" / "fashion_mnist_autoencoder" / "version_0" / "autoencoder.pt")  # fmt: skip
    NoiseSchedule.from_diffusers(root / "ddpm-cifar10-32")
    # What `python -m src.posthoc_ema RUN --step N --format ckpt --out_dir runs/guides` writes (an autoguidance guide
    # for the run): a checkpoint of the same network.
    (root / "runs" / "guides").mkdir()
    shutil.copy(root / PLACEHOLDERS["CKPT"], root / "runs" / "guides" / "sigma_rel_0.050.ckpt")
    return root


# ------------------------------------------------------------------------------------------------ the checkers
class _Parsed(Exception):
    """Raised once a program's argparse parser has parsed its arguments: they are valid, stop there."""


_PARSERS: dict = {}


def _setup_parser_once(original):
    """LightningCLI.setup_parser, building each CLI's parser once per session: most of a parse's 0.3 s CPU is building
    the parser (Trainer, model and data signatures, four subcommands); parsing itself, and everything the CLI class
    does around it (its own parse_arguments included), still runs for every command."""

    def setup_parser(self, *args, **kwargs) -> None:
        key = (type(self), self.model_class, self.datamodule_class)
        if key not in _PARSERS:
            original(self, *args, **kwargs)
            _PARSERS[key] = (
                self.parser,
                getattr(self, "_subcommand_method_arguments", None),
                getattr(self, "_subcommand_parsers", None),
            )
        self.parser, methods, subcommand_parsers = _PARSERS[key]
        if methods is not None:
            self._subcommand_method_arguments = methods
        if subcommand_parsers is not None:
            self._subcommand_parsers = subcommand_parsers

    return setup_parser


def _check_cli(args: list[str], module: str, capsys: pytest.CaptureFixture) -> None:
    """`python -m src.main|src.classifier_main|src.autoencoder_main ARGS`, parsed with --print_config in this process."""
    from lightning.pytorch.cli import LightningCLI

    from src.main import cli_main

    kwargs = {}
    if module == "src.classifier_main":
        from src.classifier_module import ClassifierModule

        kwargs["model_class"] = ClassifierModule
    if module == "src.autoencoder_main":
        from src.autoencoder_module import AutoencoderModule

        kwargs["model_class"] = AutoencoderModule
    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit) as exit_info:
        patch.setattr(LightningCLI, "setup_parser", _setup_parser_once(LightningCLI.setup_parser))
        patch.setattr(sys, "argv", [f"python -m {module}"])  # LightningCLI warns when both sys.argv and args are set
        cli_main([*args, *([] if "--print_config" in args else ["--print_config"])], **kwargs)
    captured = capsys.readouterr()
    assert exit_info.value.code in (0, None), f"python -m {module} {shlex.join(args)}:\n{captured.err[-2000:]}"
    assert "model:" in captured.out or "trainer:" in captured.out, captured.out[-500:]
    if module == "src.main" and "--print_config" not in args and not GPU_ONLY.search(shlex.join(args)):
        _build_cli(args, capsys)


# Options a CPU cannot instantiate: such commands are parsed only.
GPU_ONLY = re.compile(r"--trainer\.(devices [2-9]|devices -1|accelerator (gpu|cuda)|num_nodes|strategy)")


def _build_cli(args: list[str], capsys: pytest.CaptureFixture) -> None:
    """The command's model, data module and trainer built and its `before_<subcommand>` checks run (sampler options,
    shapes, data folder, checkpoint), everything a parse does not reach, but not the subcommand itself."""
    from lightning.pytorch.cli import LightningCLI

    from src.data import DatasetNotFoundError
    from src.errors import ConfigError, RunNotFoundError
    from src.main import cli_main

    def checks_only(self, subcommand: str) -> None:
        getattr(self, f"before_{subcommand}", lambda: None)()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LightningCLI, "setup_parser", _setup_parser_once(LightningCLI.setup_parser))
        patch.setattr(LightningCLI, "_run_subcommand", checks_only)
        patch.setattr(sys, "argv", ["python -m src.main"])
        patch.setattr("src.main.exit_after_signals", lambda *a, **k: None)  # no signal handlers left behind
        patch.setattr("src.main.register_children", lambda *a, **k: None)
        try:
            cli_main(args)
        except SystemExit as error:
            captured = capsys.readouterr()
            pytest.fail(f"python -m src.main {shlex.join(args)}: exit {error.code}\n{captured.err[-2000:]}")
        except (DatasetNotFoundError, RunNotFoundError):
            pass  # files a reader has and the sandbox does not (CIFAR-10, a run of another config): the parse checked it
        except ConfigError as error:
            if "cannot import" not in str(error):  # a reader's own module (my_project.samplers) may be absent here
                pytest.fail(f"python -m src.main {shlex.join(args)}: {error}")


def _parse_only(target: str, args: list[str], is_module: bool, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Run a program until argparse has parsed `args` (see _Parsed); byte-compile one that has no parser."""
    source = Path(find_spec(target).origin if is_module else target)
    if is_module and source.name == "__init__.py":
        source = source.parent / "__main__.py"
    assert source.is_file(), f"{target}: no such {'module' if is_module else 'file'}"
    if "parse_args" not in source.read_text():
        py_compile.compile(str(source), doraise=True)
        return
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, *a, **k):
        raise _Parsed(original(self, *a, **k))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [str(source), *args])
    if not is_module:  # python puts a script's folder first on sys.path (benchmarks import their common.py)
        monkeypatch.syspath_prepend(str(source.parent))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: "found in sys.modules" for an imported module
        try:
            runpy.run_module(target, run_name="__main__") if is_module else runpy.run_path(target, run_name="__main__")
        except _Parsed:
            return
        except SystemExit as exit_info:  # --help exits 0; a bad argument exits 2 after printing the error
            assert exit_info.code in (0, None), f"{target} {shlex.join(args)}:\n{capsys.readouterr().err[-2000:]}"
            return
    pytest.fail(f"{target} {shlex.join(args)} finished without parsing any arguments")


def _check_python(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """`python [-m MODULE | SCRIPT] ARGS` (the interpreter already removed)."""
    if args[0] == "-m":
        module, rest = args[1], args[2:]
        if module in ("src.main", "src.classifier_main", "src.autoencoder_main"):
            _check_cli(rest, module, capsys)
        elif module == "src.export":
            from src.export import main

            main(rest)
            assert Path(rest[1], "config.json").is_file()
        elif module == "pytest":
            paths = [a.split("::")[0] for a in rest if not a.startswith("-")] or ["tests"]
            assert all(Path(p).exists() for p in paths), f"pytest {rest}: no such test files"
        else:
            _parse_only(module, rest, True, monkeypatch, capsys)
    else:
        assert args[0].endswith(".py"), f"python {args[0]}: expected -m MODULE or a .py script"
        _parse_only(args[0], args[1:], False, monkeypatch, capsys)


MAKE_PYTHON = re.compile(r"(?:^|/)python3?$")


def _check_make(args: list[str], monkeypatch, capsys) -> None:
    """`make TARGETS VAR=value ...`: the variables exist in the Makefile, `make -n` succeeds, and the python commands
    it would run are checked."""
    makefile = (REPO / "Makefile").read_text()
    for assignment in (a for a in args if "=" in a and not a.startswith("-")):
        name = assignment.split("=", 1)[0]
        assert re.search(rf"\$\({name}\b", makefile), f"make {name}=...: the Makefile does not read {name}"
    result = subprocess.run(["make", "-n", "--no-print-directory", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"make -n {shlex.join(args)}:\n{result.stderr[-2000:]}"
    printed = result.stdout.replace("\\\n", " ").splitlines()
    checked = 0
    for line in printed:
        words = shlex.split(line)
        if len(words) > 1 and MAKE_PYTHON.search(words[0]) and words[1:3] not in (["-m", "pip"], ["-m", "venv"]):
            _check_python(words[1:], monkeypatch, capsys)
            checked += 1
    if {"train", "sample", "test", "benchmark"} & set(args):
        assert checked, f"make -n {shlex.join(args)} printed no python command:\n{result.stdout[-2000:]}"


def _check_job_script(args: list[str], capsys) -> None:
    """`bash|sbatch scripts/X.sh CONFIG [options]`: the script's syntax, and its `src.main fit` command line."""
    script, rest = args[0], args[1:]
    assert Path(script).is_file(), f"{script}: no such script"
    result = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    if rest:  # both job scripts run `python -m src.main fit --config "$1" ... "${@:2}"`
        _check_cli(["fit", "--config", rest[0], *rest[1:]], "src.main", capsys)


# ------------------------------------------------------------------------------------------------ the tests
def test_the_documents_have_commands_and_snippets() -> None:
    assert len(SHELL_CASES) >= 40 and PYTHON_DOCUMENTS, (len(SHELL_CASES), PYTHON_DOCUMENTS)
    # Shell commands go in ```bash blocks, so that they are checked here.
    others = [f"{b.document}:{b.line}" for b in ALL_BLOCKS if b.language in ("sh", "shell", "console", "zsh")]
    assert others == [], f"use ```bash for shell commands: {others}"


def test_opt_outs_stay_few() -> None:
    opted = [f"{b.document}:{b.line} ({b.opt_out})" for b in ALL_BLOCKS if b.opt_out]
    assert len(opted) <= MAX_OPT_OUTS, f"more code blocks that no test runs than {MAX_OPT_OUTS}: {opted}"


@needs_fashion_mnist  # the sandbox trains a tiny model on it
@pytest.mark.parametrize("command", SHELL_CASES)
def test_shell_command(command: str, sandbox: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(sandbox)
    words = [PLACEHOLDER.sub(lambda m: PLACEHOLDERS[m[1]], word) for word in shlex.split(command, comments=True)]
    operators = {"&&", "||", "|", ";", "<<", ">", "&"} & set(words)
    assert not operators, f"one plain command per line, so that each is checked: {sorted(operators)} in {command!r}"
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value before the program: environment
        name, value = words.pop(0).split("=", 1)
        monkeypatch.setenv(name, value)
    words = [w for word in words for w in (sorted(glob.glob(word)) or [word] if "*" in word else [word])]
    program, args = words[0], words[1:]
    if program == "make":
        _check_make(args, monkeypatch, capsys)
    elif program in ("python", "python3", ".venv/bin/python"):
        _check_python(args, monkeypatch, capsys)
    elif program in ("bash", "sbatch"):
        _check_job_script(args, capsys)
    else:
        pytest.fail(f"no check for {program!r}: teach tests/test_docs_commands.py or mark the block '# not run: why'")


@needs_fashion_mnist  # the sandbox trains a tiny model on it
@pytest.mark.parametrize("document", PYTHON_DOCUMENTS)
def test_python_snippets(document: str, sandbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(sandbox)
    namespace: dict = {"__name__": "__docs__"}
    for block in (b for b in RUN_BLOCKS if b.document == document and b.language == "python"):
        exec(compile(block.text, f"{document}:{block.line}", "exec"), namespace)  # noqa: S102


@needs_fashion_mnist  # the sandbox trains a tiny model on it
def test_the_checks_catch_what_they_are_for(sandbox: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """A misspelt flag, a missing config, a Make variable the Makefile does not read and a script's unknown flag all
    fail their check: the checks above are not vacuous."""
    monkeypatch.chdir(sandbox)
    bad = [
        lambda: _check_cli(["fit", "--config", "configs/fashion_mnist_cond.yaml", "--trainer.max_step", "3"],
                           "src.main", capsys),
        lambda: _check_cli(["fit", "--config", "configs/no_such.yaml"], "src.main", capsys),
        # Parses, but the model refuses it when built: the quickstart's skip: logsnr is not read by heun.
        lambda: _check_cli(["predict", "--config", "configs/fashion_mnist_cond.yaml", "--ckpt_path", "last",
                            "--model.sampling.sampler", "heun"], "src.main", capsys),  # fmt: skip
        lambda: _check_make(["train", "NO_SUCH_VARIABLE=1"], monkeypatch, capsys),
        lambda: _check_make(["train", "ARGS=--model.no_such_option 1"], monkeypatch, capsys),
        lambda: _check_python(["-m", "src.evaluate", "--samples", "x", "--ref", "y", "--no_such_flag"], monkeypatch,
                              capsys),
        lambda: _check_python(["benchmarks/no_such.py"], monkeypatch, capsys),
    ]  # fmt: skip
    for number, check in enumerate(bad):
        with pytest.raises((AssertionError, pytest.fail.Exception)):
            check()
        capsys.readouterr()
