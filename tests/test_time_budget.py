"""TimeBudget: a run sized by time (the quickstart's), its learning-rate decay and its resume."""

from __future__ import annotations

import logging
import math
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Timer
from test_faults import write_fake_fashion_mnist
from test_resume import SyntheticData

from src.callbacks.checkpoint import ModelCheckpoint
from src.callbacks.progress import BudgetProgressBar
from src.callbacks.time_budget import TimeBudget, format_duration, lr_decay_factor
from src.errors import ConfigError
from src.main import cli_main, run

REPO = Path(__file__).resolve().parents[1]

torch.set_num_threads(1)


def test_lr_decay_factor_is_sgdr_cosine_and_linear() -> None:
    p = np.linspace(0, 1, 11)
    # SGDR (Loshchilov & Hutter 2017) eq. 5 with eta_max = 1, eta_min = final, T_cur / T_i = p.
    for final in (0.0, 0.1):
        expected = final + 0.5 * (1 - final) * (1 + np.cos(np.pi * p))
        got = [lr_decay_factor(x, "cosine", final) for x in p]
        np.testing.assert_allclose(got, expected, rtol=1e-12)
    np.testing.assert_allclose([lr_decay_factor(x, "linear", 0.0) for x in p], 1 - p, atol=1e-12)
    assert lr_decay_factor(1.7, "cosine") == lr_decay_factor(1.0, "cosine") == 0.0  # clipped past the budget
    assert lr_decay_factor(0.5, "none") == 1.0
    with pytest.raises(ValueError, match="unknown lr decay"):
        lr_decay_factor(0.5, "step")


class RecordLR(L.Callback):
    def __init__(self) -> None:
        self.lrs: dict[int, float] = {}
        self.progress: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs[trainer.global_step] = optimizer.param_groups[0]["lr"]
        budget = next(c for c in trainer.callbacks if isinstance(c, TimeBudget))
        self.progress[trainer.global_step] = budget.progress


def fit(
    make_module: Callable[[], L.LightningModule],
    root: Path,
    budget: TimeBudget,
    max_steps: int = -1,
    ckpt_path: str | None = None,
) -> tuple[L.Trainer, RecordLR]:
    L.seed_everything(0)
    record = RecordLR()
    checkpoints = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, save_top_k=0, every_n_train_steps=3)
    trainer = L.Trainer(default_root_dir=root, max_steps=max_steps, accelerator="cpu", logger=False,
                        callbacks=[budget, checkpoints, record], limit_val_batches=0, num_sanity_val_steps=0,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(make_module(), datamodule=SyntheticData(batch_size=8, val_size=8, num_workers=0))
    return trainer, record


def test_with_max_steps_the_schedule_follows_steps_and_resumes_exactly(tmp_path: Path, tiny_module_28) -> None:
    # tiny_module_28: lr 1e-3 with 5 warm-up steps (src.optim.LinearWarmup), then the budget's cosine over 10 steps.
    _, record = fit(tiny_module_28, tmp_path / "a", TimeBudget("00:01:00:00"), max_steps=10)
    expected = {k: 1e-3 * min(1.0, (k + 1) / 5) * 0.5 * (1 + math.cos(math.pi * k / 10)) for k in range(10)}
    assert record.lrs.keys() == expected.keys()
    for k in expected:
        assert record.lrs[k] == pytest.approx(expected[k], rel=1e-6), k

    # Stopped at 6 (a checkpoint), then continued to 10: the same learning rates from step 6 on.
    fit(tiny_module_28, tmp_path / "b", TimeBudget("00:01:00:00"), max_steps=6)
    L.seed_everything(0)
    record_b = RecordLR()
    trainer = L.Trainer(default_root_dir=tmp_path / "b", max_steps=10, accelerator="cpu", logger=False,
                        callbacks=[TimeBudget("00:01:00:00"), record_b], limit_val_batches=0,
                        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(tiny_module_28(), datamodule=SyntheticData(batch_size=8, val_size=8, num_workers=0),
                ckpt_path=str(tmp_path / "b" / "checkpoints" / "last.ckpt"))  # fmt: skip
    assert sorted(record_b.lrs) == [6, 7, 8, 9]
    for k in record_b.lrs:
        assert record_b.lrs[k] == pytest.approx(expected[k], rel=1e-6), k


@pytest.mark.slow
def test_a_time_sized_run_ends_at_its_budget_and_resume_continues_its_clock(tmp_path: Path, tiny_module_28) -> None:
    trainer, record = fit(tiny_module_28, tmp_path, TimeBudget("00:00:00:03"))
    steps = trainer.global_step
    assert steps > 2 and trainer.should_stop
    # The learning rate decayed with the time spent, monotonically once warm-up is over (5 steps).
    progress = [record.progress[k] for k in sorted(record.progress)]
    assert progress == sorted(progress) and 0.0 <= progress[0] < progress[-1] <= 1.0
    # The Timer stops at the end of the step in which the budget ran out, so every step before the last started
    # inside the budget; the last one may start just after it (time passes between a step's end and the next start).
    assert max(progress[:-1]) < 1.0
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    assert saved["global_step"] == steps
    assert saved["callbacks"]["TimeBudget"]["time_elapsed"]["train"] >= 3.0

    # Resumed with half the budget spent: the schedule continues from there (progress >= 0.5 at its first step).
    saved["callbacks"]["TimeBudget"]["time_elapsed"]["train"] = 1.5
    half = tmp_path / "half.ckpt"
    torch.save(saved, half)
    L.seed_everything(0)
    resumed = RecordLR()
    trainer = L.Trainer(default_root_dir=tmp_path / "r", max_steps=-1, accelerator="cpu", logger=False,
                        callbacks=[TimeBudget("00:00:00:03"), resumed], limit_val_batches=0,
                        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    module = tiny_module_28()
    trainer.fit(module, datamodule=SyntheticData(batch_size=8, val_size=8, num_workers=0), ckpt_path=str(half))
    first = min(resumed.progress)
    assert first == steps and 0.5 <= resumed.progress[first] < 1.0
    assert resumed.lrs[first] <= 1e-3 * lr_decay_factor(0.5) * (1 + 1e-6)

    # A finished budget is an error before any step (not Lightning's Timer's silent stop, which exits 0).
    L.seed_everything(0)
    done = RecordLR()
    trainer = L.Trainer(default_root_dir=tmp_path / "d", max_steps=-1, accelerator="cpu", logger=False,
                        callbacks=[TimeBudget("00:00:00:03"), done], limit_val_batches=0,
                        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    module = tiny_module_28()
    with pytest.raises(ConfigError, match="has spent its time budget.*--trainer.max_time 00:00:00:0"):
        trainer.fit(module, datamodule=SyntheticData(batch_size=8, val_size=8, num_workers=0), ckpt_path=str(ckpt))
    assert done.lrs == {}


# Through the command line, on the quickstart's config (`make train`), with a tiny net and fake Fashion-MNIST files.
QUICKSTART = [
    "--config", str(REPO / "configs" / "fashion_mnist_cond.yaml"),
    "--model.net.init_args.base_channels", "8",
    "--model.net.init_args.norm_groups", "4",
    "--model.sampling.steps", "2",
    "--logger_backend", "csv",
    "--trainer.enable_model_summary", "false",
    "--trainer.limit_val_batches", "0",
    "--data.batch_size", "8",
    "--data.val_size", "8",
    "--data.num_workers", "0",
]  # fmt: skip


class LogLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def saved_state(root: Path) -> dict:
    (ckpt,) = root.glob("*/version_0/checkpoints/last.ckpt")
    return torch.load(ckpt, weights_only=False, map_location="cpu")


def test_max_time_sets_the_budget_and_a_finished_run_continues_to_a_larger_total(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    args = ["fit", *QUICKSTART, "--data.data_dir", str(write_fake_fashion_mnist(tmp_path / "data")),
            "--trainer.default_root_dir", str(tmp_path / "runs")]  # fmt: skip
    lines = LogLines()
    logging.getLogger("lightning.pytorch").addHandler(lines)
    try:
        cli = cli_main([*args, "--trainer.max_time", "00:00:00:02", "--trainer.enable_progress_bar", "true"])
    finally:
        logging.getLogger("lightning.pytorch").removeHandler(lines)
    # --trainer.max_time is the TimeBudget's duration (the config says 15 minutes), not a second, ignored Timer.
    (budget,) = [c for c in cli.trainer.callbacks if isinstance(c, Timer)]
    assert isinstance(budget, TimeBudget) and budget.duration == 2.0
    assert not [line for line in lines.lines if "already contains a Timer" in line], lines.lines
    first = saved_state(tmp_path / "runs")
    assert first["global_step"] > 0 and first["callbacks"]["TimeBudget"]["time_elapsed"]["train"] >= 2.0
    # The progress bar counts the budget, not the epoch (of 6 batches here).
    assert isinstance(cli.trainer.progress_bar_callback, BudgetProgressBar)
    bar = capsys.readouterr().out
    assert "Epoch 0:" in bar and "Epoch 1:" in bar and "100%|" in bar and "00:02 budget, 00:00 left [step" in bar

    # Continued with a larger total: trains on until 4 s in all, the decay restarted from p = elapsed / 4 s.
    logging.getLogger("lightning.pytorch").addHandler(lines)
    try:
        cli = cli_main([*args, "--ckpt_path", "last", "--trainer.max_time", "00:00:00:04",
                        "--trainer.enable_progress_bar", "false"])  # fmt: skip
    finally:
        logging.getLogger("lightning.pytorch").removeHandler(lines)
    (restart,) = [line for line in lines.lines if line.startswith("TimeBudget: resuming at progress")]
    elapsed = first["callbacks"]["TimeBudget"]["time_elapsed"]["train"]
    assert float(restart.split()[4]) == pytest.approx(elapsed / 4.0, abs=2e-3), restart  # not 1: the lr rises again
    more = saved_state(tmp_path / "runs")
    assert more["global_step"] > first["global_step"]
    assert more["callbacks"]["TimeBudget"]["time_elapsed"]["train"] >= 4.0

    # Continued again with the spent total, with or without more steps: one line naming the flags, nothing trained.
    with pytest.raises(ConfigError, match=r"--trainer.max_steps 1000 does not extend it.*--trainer.max_time 00:00:00"):
        cli_main([*args, "--ckpt_path", "last", "--trainer.max_time", "00:00:00:04", "--trainer.max_steps", "1000"])
    # `python -m src.main` (its run()) without the process-wide second-signal watcher, which a subprocess would
    # install: it prints the error as one line and exits non-zero.
    monkeypatch.setattr("src.main.exit_on_second_signal", lambda: True)
    monkeypatch.setattr(sys, "argv", ["main.py", *args, "--ckpt_path", "last", "--trainer.max_time", "00:00:00:04"])
    with pytest.raises(SystemExit) as exit:
        run()
    message = exit.value.code
    assert isinstance(message, str) and "\n" not in message and message.startswith("error: --ckpt_path "), message
    assert "has spent its time budget" in message and "--trainer.max_time 00:00:00:08" in message
    assert 'make train MINUTES=1 ARGS="--ckpt_path last"' in message
    assert saved_state(tmp_path / "runs")["global_step"] == more["global_step"]


@pytest.mark.parametrize(
    ("value", "seconds"), [("00:01:30:00", 5400.0), ('{"minutes": 90}', 5400.0), ("01:00:00:05", 86405.0)]
)
def test_max_time_in_lightnings_forms_sets_the_budget(value: str, seconds: float, tmp_path: Path) -> None:
    cli = cli_main([*QUICKSTART, "--trainer.default_root_dir", str(tmp_path), "--trainer.max_time", value], run=False)
    (budget,) = [c for c in cli.trainer.callbacks if isinstance(c, Timer)]
    assert isinstance(budget, TimeBudget) and budget.duration == seconds


@pytest.mark.parametrize("value", ["90 minutes", "00:00:00:00"])
def test_a_bad_max_time_is_one_line(value: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^--trainer.max_time .* e.g. 00:00:30:00 for 30 minutes"):
        cli_main([*QUICKSTART, "--trainer.default_root_dir", str(tmp_path), "--trainer.max_time", value], run=False)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_train_minutes_is_the_total_budget() -> None:
    def command(*variables: str) -> str:
        result = subprocess.run(["make", "-n", "train", *variables], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        (line,) = [line for line in result.stdout.splitlines() if "src.main fit" in line]
        return line

    assert "max_time" not in command()  # the config's budget
    assert command("MINUTES=90").strip().endswith("--trainer.max_time 00:01:30:00")
    assert "--trainer.max_time 00:00:07:30 --ckpt_path last" in command("MINUTES=7.5", "ARGS=--ckpt_path last")
    assert "--trainer.max_time 01:09:20:00" in command("MINUTES=2000")
    bad = subprocess.run(["make", "-n", "train", "MINUTES=half"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode != 0 and "MINUTES=half is not a positive number of minutes" in bad.stderr


def test_format_duration_is_what_max_time_takes() -> None:
    assert format_duration(90 * 60) == "00:01:30:00"
    assert format_duration(2 * 86400 + 3 * 3600 + 4 * 60 + 5.4) == "02:03:04:05"
