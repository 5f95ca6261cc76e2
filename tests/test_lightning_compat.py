"""The private Lightning API of src/lightning_compat.py (and the CLI override it names) against the installed
Lightning: an upgrade that moves any of it fails here first, with the name of what moved."""

from __future__ import annotations

import inspect
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader

from src.lightning_compat import (
    epoch_finished,
    last_saved_step,
    quiet_lightning_banner,
    request_stop_after_step,
    reset_epoch_counters,
    save_last_checkpoint,
)


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trainer(root: Path, callbacks: list, max_steps: int = 6) -> L.Trainer:
    return L.Trainer(default_root_dir=root, max_steps=max_steps, accelerator="cpu", logger=False, callbacks=callbacks,
                     enable_progress_bar=False, enable_model_summary=False)  # fmt: skip


def loader() -> DataLoader:
    return DataLoader(torch.randn(8, 2), batch_size=2)  # 4 batches per epoch


def test_request_stop_after_step_stops_the_fit_loop_after_that_step(tmp_path: Path) -> None:
    class StopAt2(L.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == 2:
                request_stop_after_step(trainer)

    fit = trainer(tmp_path, [StopAt2()], max_steps=100)
    with pytest.raises(SystemExit):  # Lightning's SIGTERMException
        fit.fit(Tiny(), loader())
    assert fit.global_step == 2 and fit.received_sigterm


def test_epoch_counters_are_where_epoch_finished_and_reset_epoch_counters_look(tmp_path: Path) -> None:
    seen = {}

    class AtEpochEnd(L.Callback):
        def on_train_epoch_start(self, trainer, *args) -> None:
            seen.setdefault("start", epoch_finished(trainer))

    fit = trainer(tmp_path, [AtEpochEnd()], max_steps=4)
    fit.fit(Tiny(), loader())
    assert seen["start"] is False  # an epoch under way is not finished
    assert epoch_finished(fit)  # 4 steps = one whole epoch, counted as completed
    batches = fit.fit_loop.epoch_loop.batch_progress
    assert batches.current.completed == 4
    reset_epoch_counters(fit)
    assert batches.current.completed == 0 and batches.total.completed == 4  # per-epoch counters only


def test_save_last_checkpoint_uses_modelcheckpoints_own_bookkeeping(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    assert isinstance(last_saved_step(checkpoint), int)
    fit = trainer(tmp_path, [checkpoint], max_steps=1)
    fit.fit(Tiny(), loader())
    (tmp_path / "last.ckpt").unlink()
    save_last_checkpoint(checkpoint, fit)
    assert (tmp_path / "last.ckpt").is_file() and last_saved_step(checkpoint) == fit.global_step


def test_the_cli_still_has_the_step_src_main_overrides() -> None:
    # DiffusionCLI._parse_ckpt_path replaces LightningCLI's, which must still exist and still be called.
    assert callable(getattr(LightningCLI, "_parse_ckpt_path", None))
    assert "self._parse_ckpt_path()" in inspect.getsource(LightningCLI)


def test_quiet_lightning_banner_drops_the_banner_and_keeps_the_rest(tmp_path: Path, caplog, recwarn) -> None:
    """The messages `quiet_lightning_banner` drops are still where and as Lightning emits them (a Trainer's start
    and its pytree helper), and Lightning's other messages pass. (pytest resets warning filters set at import.)"""
    import logging
    import warnings

    from lightning.pytorch.utilities._pytree import _tree_flatten

    quiet_lightning_banner()
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        L.Trainer(default_root_dir=tmp_path, accelerator="cpu", logger=True, enable_checkpointing=True)
        from lightning.pytorch.utilities.rank_zero import rank_zero_info

        rank_zero_info("Restoring states from the checkpoint path at x.ckpt")
    logged = [record.getMessage() for record in caplog.records]
    assert logged == ["Restoring states from the checkpoint path at x.ckpt"], logged
    with warnings.catch_warnings(record=True) as caught:
        _tree_flatten({"a": 1})  # Lightning 2.6 with torch >= 2.10 warned here on every run
    assert not [w for w in caught if "LeafSpec" in str(w.message)]
