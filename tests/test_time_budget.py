"""TimeBudget: a run sized by time (the quickstart's), its learning-rate decay and its resume."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from test_resume import SyntheticData

from src.callbacks.checkpoint import ModelCheckpoint
from src.callbacks.time_budget import TimeBudget, lr_decay_factor

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
    # tiny_module_28: lr 1e-3 with 5 warm-up steps (src.module.linear_warmup), then the budget's cosine over 10 steps.
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

    # A finished budget resumes into no step at all.
    L.seed_everything(0)
    done = RecordLR()
    trainer = L.Trainer(default_root_dir=tmp_path / "d", max_steps=-1, accelerator="cpu", logger=False,
                        callbacks=[TimeBudget("00:00:00:03"), done], limit_val_batches=0,
                        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    module = tiny_module_28()
    trainer.fit(module, datamodule=SyntheticData(batch_size=8, val_size=8, num_workers=0), ckpt_path=str(ckpt))
    assert done.lrs == {} and trainer.global_step == steps
