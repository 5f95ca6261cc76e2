"""Faults: a SIGTERM/SIGUSR1 saves last.ckpt and exits cleanly; a non-finite loss is skipped or stops the run."""

from __future__ import annotations

import functools
import os
import signal
import struct
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from src.callbacks.faults import NonFiniteGuard, SignalCheckpoint
from src.errors import NonFiniteLossError
from src.main import cli_main
from src.module import DiffusionModule
from src.optim import AdamW, LinearWarmup

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "fashion_mnist.yaml")


@pytest.fixture
def tiny_module(tiny_module):
    """The shared tiny module (tests/conftest.py) with 2 warm-up steps."""
    return functools.partial(tiny_module, lr_scheduler=partial(LinearWarmup, warmup_steps=2))


def loader() -> DataLoader:
    images = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return DataLoader(list(zip(images, torch.zeros(40).long(), strict=True)), batch_size=8)


class Inject(L.Callback):
    """Puts a NaN into the batch of step `nan_at` (or sends `signum` during step `signal_at`); records weights."""

    def __init__(self, nan_at: int | None = None, signal_at: int | None = None, signum: int = signal.SIGTERM):
        self.nan_at, self.signal_at, self.signum = nan_at, signal_at, signum
        self.weights: dict[int, list[torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.weights[trainer.global_step] = [p.detach().clone() for p in pl_module.net.parameters()]
        if trainer.global_step == self.nan_at:
            batch[0][0, 0, 0, 0] = float("nan")
        if self.signal_at is not None and trainer.global_step + 1 == self.signal_at:
            os.kill(os.getpid(), self.signum)


def fit(
    root: Path,
    module: DiffusionModule,
    inject: Inject,
    guard: NonFiniteGuard | None = None,
    max_steps: int = 5,
    precision: str | L.pytorch.plugins.Precision = "32-true",
) -> L.Trainer:
    checkpoints = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, save_top_k=0, every_n_train_steps=1)
    callbacks = [checkpoints, SignalCheckpoint(), guard or NonFiniteGuard(), inject]
    plugins = (
        {"plugins": [precision]} if isinstance(precision, L.pytorch.plugins.Precision) else {"precision": precision}
    )
    trainer = L.Trainer(default_root_dir=root, max_steps=max_steps, accelerator="cpu", logger=False,
                        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False, **plugins)  # fmt: skip
    trainer.fit(module, loader())
    return trainer


def test_nonfinite_step_is_skipped_up_to_the_limit(tmp_path: Path, tiny_module) -> None:
    guard = NonFiniteGuard(max_skips=1)
    inject = Inject(nan_at=2)
    with pytest.warns(
        UserWarning, match=r"non-finite loss at step 2 .*images \(8, 1, 8, 8\) min .*\(1 non-finite\), t \["
    ):
        trainer = fit(tmp_path, tiny_module(), inject, guard)
    assert trainer.global_step == 5 and guard.num_skipped == 1
    # The skipped step left the weights as they were; the others changed them; all stay finite.
    assert all(torch.equal(a, b) for a, b in zip(inject.weights[2], inject.weights[3], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(inject.weights[3], inject.weights[4], strict=True))
    assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    # The skip count is part of the checkpoint, so a resumed run keeps counting.
    states = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    assert {"num_skipped": 1} in states.values()


def test_nonfinite_step_stops_the_run_with_the_last_checkpoint_intact(tmp_path: Path, tiny_module) -> None:
    # Fused AdamW (the default): the bad step is skipped on the device and counted when the next step starts, so
    # the run stops one step later; the checkpoint of that step holds the weights from before the bad step.
    inject = Inject(nan_at=3)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 3 .*loss nan.*t \[.*stopped") as error:
        fit(tmp_path, tiny_module(), inject)
    assert "\n" not in str(error.value)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 4
    saved = [checkpoint["state_dict"][f"net.{name}"] for name, _ in tiny_module().net.named_parameters()]
    assert all(torch.equal(a, b) for a, b in zip(inject.weights[3], saved, strict=True))  # the NaN step changed nothing
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["last.ckpt"]  # no stray temporary files


def test_nonfinite_step_without_fused_optimizer_stops_before_the_update(tmp_path: Path, tiny_module) -> None:
    # An optimizer without found_inf support: the flag is read at once and the run stops before the bad update.
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 3 .*stopped"):
        fit(tmp_path, tiny_module(optimizer=partial(AdamW, lr=1e-3, fused=False)), Inject(nan_at=3))
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3  # the step before the NaN, not overwritten by the failed one
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())


def test_fp16_with_grad_scaler_skips_and_counts_a_nonfinite_loss(tmp_path: Path, tiny_module) -> None:
    # 16-mixed: the GradScaler owns found_inf and skips the step; the guard watches the loss and counts it.
    guard = NonFiniteGuard(max_skips=1)
    inject = Inject(nan_at=2)
    with pytest.warns(UserWarning, match=r"non-finite loss at step 2 .*skipped this update \(1 of at most 1\)"):
        precision = L.pytorch.plugins.MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
        trainer = fit(tmp_path, tiny_module(), inject, guard, precision=precision)
    assert trainer.precision_plugin.scaler is not None and guard.num_skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(inject.weights[2], inject.weights[3], strict=True))
    assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="needs CUDA")])],
)  # fmt: skip
def test_guard_skips_on_the_device_and_reads_the_flag_later(device: str) -> None:
    # The mechanism without Lightning's loop: the fused kernel gets found_inf and leaves weights and moments alone;
    # the guard has not looked at the flag yet (no host read in the step) and counts it at the next batch start.
    # On CUDA the guard's hook and the optimizer step run under torch's sync debug mode, which raises on a sync.
    net = torch.nn.Linear(3, 2).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.1, fused=True)
    net(torch.ones(1, 3, device=device)).sum().backward()
    optimizer.step()
    before = [p.detach().clone() for p in net.parameters()]
    moments = [optimizer.state[p]["exp_avg"].clone() for p in net.parameters()]
    net.weight.grad[0, 0] = float("inf")
    guard = NonFiniteGuard(max_skips=1)

    class Stub:
        global_step, current_epoch, precision_plugin = 7, 0, None

    module = torch.nn.Module()
    module.last_loss, module.last_t = torch.tensor(1.0, device=device), torch.tensor([3], device=device)
    guard.on_train_batch_start(Stub(), module, (torch.zeros(1, 1, 2, 2, device=device),), 0)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        guard.on_before_optimizer_step(Stub(), module, optimizer)
        optimizer.step()
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
    assert guard.num_skipped == 0 and len(guard._pending) == 1
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    assert all(torch.equal(m, optimizer.state[p]["exp_avg"]) for m, p in zip(moments, net.parameters(), strict=True))
    assert int(optimizer.state[net.weight]["step"]) == 1  # the skipped step is not counted by Adam either
    with pytest.warns(UserWarning, match=r"non-finite gradient at step 7 .*grad norm inf.*t \[3\]"):
        guard.on_train_batch_start(Stub(), module, None, 1)
    assert guard.num_skipped == 1 and not guard._pending


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_saves_last_checkpoint_and_exits_cleanly(tmp_path: Path, signum: int, tiny_module) -> None:
    with pytest.raises(SystemExit) as exit_info:
        fit(tmp_path, tiny_module(), Inject(signal_at=2, signum=signum), max_steps=100)
    assert exit_info.value.code in (None, 0)
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # our SIGUSR1 handler is gone again


def write_fake_fashion_mnist(root: Path, n_train: int = 60, n_test: int = 20) -> Path:
    """Tiny Fashion-MNIST-format idx files (random pixels) in torchvision's layout under `root`."""
    folder = root / "FashionMNIST" / "raw"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n) + labels.tobytes())
    return root


TINY_CLI = [
    "--config", CONFIG,
    "--model.net.init_args.base_channels", "8",
    "--model.net.init_args.norm_groups", "4",
    "--model.net.init_args.channel_mult", "[1, 2]",
    "--model.net.init_args.attn_resolutions", "[]",
    "--model.net.init_args.mid_attention", "false",
    "--model.sampling.steps", "2",
    "--data.batch_size", "8",
    "--data.val_size", "8",
    "--logger_backend", "csv",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--trainer.limit_val_batches", "0",
    "--trainer.callbacks", '[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",'
    ' "init_args": {"save_last": true, "save_top_k": 0, "every_n_train_steps": 1}}]',
]  # fmt: skip


def test_sigterm_to_the_cli_saves_and_the_requeued_run_resumes(tmp_path: Path) -> None:
    data, runs = write_fake_fashion_mnist(tmp_path / "data"), tmp_path / "runs"
    args = ["fit", *TINY_CLI, "--data.data_dir", str(data), "--trainer.default_root_dir", str(runs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "src.main", *args, "--trainer.max_steps", "100000"],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not list(runs.glob("*/version_0/checkpoints/last.ckpt")):  # training is under way
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0]
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, output
    assert "Stopping on a signal after step" in output
    (last,) = runs.glob("*/version_0/checkpoints/last.ckpt")
    step = torch.load(last, weights_only=True, map_location="cpu")["global_step"]
    assert step >= 1

    # The requeued job: same command with --ckpt_path last continues in the same run folder.
    cli_main([*args, "--ckpt_path", "last", "--trainer.max_steps", str(step + 2)])
    assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == step + 2
    assert [p.name for p in (runs / "fashion_mnist").iterdir()] == ["version_0"]


KILLS_REGISTERED_CHILDREN = """
import gc, os, signal, subprocess, sys, time
from src.signals import exit_after_signals, exit_on_second_signal, register_children

class Owner:  # stands for a trainer: its launcher's processes
    def __init__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]

kept, dropped = Owner(), Owner()
register_children(kept, lambda owner: owner.procs)
register_children(dropped, lambda owner: owner.procs)
dropped_child = dropped.procs[0]
del dropped
gc.collect()
print(kept.procs[0].pid, dropped_child.pid, flush=True)
signal.signal(signal.SIGTERM, lambda *args: None)  # a Python-level handler, as Lightning installs: it only asks
assert exit_on_second_signal()
exit_after_signals(1)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(60)
"""


def test_a_forced_exit_kills_the_registered_processes_of_live_owners_only() -> None:
    """The second-signal exit kills the DDP ranks a trainer launched; the registry holds trainers weakly, so a
    dropped one (and its model) is freed and its processes are no longer this exit's business."""
    process = subprocess.Popen([sys.executable, "-c", KILLS_REGISTERED_CHILDREN], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)  # fmt: skip
    kept, dropped = (int(pid) for pid in process.stdout.readline().split())
    try:
        process.wait(timeout=60)
        assert process.returncode == 128 + signal.SIGTERM, process.stdout.read()
        deadline = time.monotonic() + 10
        while _alive(kept) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(kept)
        assert _alive(dropped)
    finally:
        for pid in (kept, dropped):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, killed but not yet reaped by its ended parent's init, counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
