"""Exact resume: a run killed at step k and resumed equals, bit for bit, the run that was never stopped."""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from src.callbacks.faults import SignalCheckpoint
from src.callbacks.rng_state import RNGStateCallback
from src.data import ImageDataModule
from src.resume import RNG_STATES_KEY, ResumableDataLoader, collect_rng_states, gather_rng_states, restore_rng_states

STEPS = 10  # 4 batches per epoch: the runs cross two epoch boundaries


class SyntheticData(ImageDataModule):
    """ImageDataModule over random in-memory 28x28 images instead of files (everything else is the real one)."""

    def _split(self, split):
        n = 40 if split == "train" else 8
        generator = torch.Generator().manual_seed(1 if split == "train" else 2)
        return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=generator), torch.zeros(n).long()


class Record(L.Callback):
    """Losses by step, and optionally a kill: a SIGTERM after step `sigterm_at`, a crash before step `crash_at`+1."""

    def __init__(self, sigterm_at: int | None = None, crash_at: int | None = None) -> None:
        self.losses: dict[int, float] = {}
        self.sigterm_at, self.crash_at = sigterm_at, crash_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.crash_at:
            raise RuntimeError("simulated crash")  # like a kill -9: only the periodic checkpoint survives
        if self.sigterm_at is not None and trainer.global_step + 1 == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during step `sigterm_at`, which still completes

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = outputs["loss"].item()


@pytest.fixture
def fit(tiny_module_28):
    """`fit(root, record, num_workers, ckpt_path=None, rng_state=None)`: `run_fit` of the tiny 28x28 module."""
    return functools.partial(run_fit, tiny_module_28)


def run_fit(
    make_module: Callable[[], L.LightningModule],
    root: Path,
    record: Record,
    num_workers: int,
    ckpt_path: str | None = None,
    rng_state: L.Callback | None = None,
) -> L.Trainer:
    """`STEPS` steps of `make_module()` (built after seeding, so every run starts from the same weights) on the
    synthetic data, with periodic checkpoints. `rng_state`: the callback that saves and restores the RNG states
    (default: RNGStateCallback, as the CLI adds it)."""
    L.seed_everything(0)  # as the CLI does on every start, resumed or not
    data = SyntheticData(batch_size=8, val_size=8, num_workers=num_workers, random_flip=True)
    checkpoints = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, save_top_k=0, every_n_train_steps=3)
    rng_state = rng_state or RNGStateCallback()
    trainer = L.Trainer(default_root_dir=root, max_steps=STEPS, accelerator="cpu", logger=False,
                        callbacks=[checkpoints, SignalCheckpoint(), rng_state, record], val_check_interval=3,
                        check_val_every_n_epoch=None, limit_val_batches=1, num_sanity_val_steps=1,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(make_module(), datamodule=data, ckpt_path=ckpt_path)
    return trainer


def state(trainer: L.Trainer) -> dict[str, torch.Tensor]:
    module = trainer.lightning_module
    tensors = {f"state_dict.{k}": v for k, v in module.state_dict().items()}
    for i, s in trainer.optimizers[0].state_dict()["state"].items():
        tensors.update({f"optimizer.{i}.{k}": torch.as_tensor(v) for k, v in s.items()})
    tensors["lr"] = torch.tensor(trainer.optimizers[0].param_groups[0]["lr"])
    tensors["global_step"] = torch.tensor(trainer.global_step)
    return tensors


@pytest.mark.parametrize(
    "num_workers, kill",
    [(0, "crash_at_5"), (0, "sigterm_at_4"), (2, "sigterm_at_6")],
)
def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path: Path, num_workers: int, kill: str, fit) -> None:
    reference = Record()
    expected = state(fit(tmp_path / "reference", reference, num_workers))
    assert sorted(reference.losses) == list(range(1, STEPS + 1))

    mode, k = kill.rsplit("_at_", 1)[0], int(kill.rsplit("_", 1)[1])
    first = Record(**{mode + "_at": k})
    root = tmp_path / "killed"
    if mode == "crash":
        with pytest.raises(RuntimeError, match="simulated crash"):
            fit(root, first, num_workers)
    else:
        with pytest.raises(SystemExit):  # Lightning's SIGTERMException: the CLI exits with status 0
            fit(root, first, num_workers)
    last = root / "checkpoints" / "last.ckpt"
    saved_step = torch.load(last, weights_only=True)["global_step"]
    assert saved_step == (3 if mode == "crash" else k)  # crash: the periodic checkpoint; SIGTERM: the step itself

    second = Record()
    resumed = state(fit(root, second, num_workers, ckpt_path=str(last)))
    assert sorted(second.losses) == list(range(saved_step + 1, STEPS + 1))
    losses = {**{s: v for s, v in first.losses.items() if s <= saved_step}, **second.losses}
    assert losses == reference.losses  # exact float equality, step by step
    assert expected.keys() == resumed.keys()
    for key, value in expected.items():
        assert torch.equal(value, resumed[key]), key


class EpochEndSignal(Record):
    """A SIGTERM during the first epoch's end hooks: after its last batch, before the next epoch starts."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = False

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


def test_signal_between_epochs_resumes_exactly(tmp_path: Path, fit) -> None:
    # Lightning raises the SIGTERMException only once the epoch is complete; the checkpoint then written must not
    # carry the finished epoch's batch counters into the next one (the resumed run would train one batch of it).
    reference = Record()
    expected = state(fit(tmp_path / "reference", reference, num_workers=0))
    first = EpochEndSignal()
    root = tmp_path / "killed"
    with pytest.raises(SystemExit):
        fit(root, first, num_workers=0)
    last = root / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4  # the whole first epoch (4 batches)

    second = Record()
    resumed = state(fit(root, second, num_workers=0, ckpt_path=str(last)))
    assert sorted(second.losses) == list(range(5, STEPS + 1))
    assert {**{s: v for s, v in first.losses.items() if s <= 4}, **second.losses} == reference.losses
    for key, value in expected.items():
        assert torch.equal(value, resumed[key]), key


class OldRNGStates(L.Callback):
    """Writes checkpoints as DiffusionModule did before RNGStateCallback: every rank's RNG states under the top-level
    key RNG_STATES_KEY (its `on_save_checkpoint`, unchanged), and no callback entry."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint[RNG_STATES_KEY] = gather_rng_states()


def test_checkpoint_with_the_old_rng_key_resumes_exactly(tmp_path: Path, fit) -> None:
    reference = Record()
    expected = state(fit(tmp_path / "reference", reference, num_workers=0))
    first = Record(crash_at=5)
    root = tmp_path / "killed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(root, first, num_workers=0, rng_state=OldRNGStates())
    last = root / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert RNG_STATES_KEY in checkpoint and RNGStateCallback().state_key not in checkpoint["callbacks"]
    assert checkpoint["global_step"] == 3

    second = Record()
    resumed = state(fit(root, second, num_workers=0, ckpt_path=str(last)))  # with RNGStateCallback
    assert {**{s: v for s, v in first.losses.items() if s <= 3}, **second.losses} == reference.losses
    for key, value in expected.items():
        assert torch.equal(value, resumed[key]), key


def test_loader_state_skips_consumed_batches_and_flips_depend_only_on_position() -> None:
    images = torch.arange(12, dtype=torch.float32).reshape(12, 1, 1, 1).expand(12, 1, 2, 2).contiguous()
    images[..., 1] += 100  # left and right columns differ, so a flip shows
    dataset = list(zip(images, torch.zeros(12).long(), strict=True))

    def loader() -> ResumableDataLoader:
        return ResumableDataLoader(dataset, batch_size=3, seed=5, random_flip=True)

    full = loader()
    full.sampler.set_epoch(1)
    batches = list(full)
    assert full.state_dict() == {"seed": 5, "epoch": 1, "batches_consumed": 4}

    partial = loader()
    partial.sampler.set_epoch(1)
    iterator = iter(partial)
    next(iterator)
    state = partial.state_dict()
    assert state == {"seed": 5, "epoch": 1, "batches_consumed": 1}

    restored = loader()
    restored.load_state_dict(state)
    rest = list(restored)
    assert len(rest) == 3
    for a, b in zip(batches[1:], rest, strict=True):
        assert torch.equal(a[0], b[0])
    flipped = torch.cat([b[0] for b in batches])[..., 0, 0] >= 100
    assert 0 < flipped.sum() < 12  # some flipped, some not
    # The next epoch starts from its beginning and shuffles differently.
    restored.sampler.set_epoch(2)
    assert len(list(restored)) == 4 and restored.state_dict()["batches_consumed"] == 4


def test_rng_states_round_trip() -> None:
    import random

    import numpy as np

    saved = collect_rng_states()
    a = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    restore_rng_states(saved)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
