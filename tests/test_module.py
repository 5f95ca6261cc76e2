"""DiffusionModule wiring: optimizer, warm-up, EMA in checkpoints, resume; loggers; images; atomic checkpoints."""

from __future__ import annotations

import functools
import os
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from PIL import Image
from torch.utils.data import DataLoader

from src.checkpoint_io import AtomicCheckpointIO
from src.images import make_grid, save_grid, to_uint8
from src.loggers import auto_logger, wandb_logged_in
from src.main import latest_checkpoint
from src.module import DiffusionModule
from src.optim import AdamW, LinearWarmup


@pytest.fixture
def tiny_module(tiny_module):
    """The shared tiny module (tests/conftest.py) with 4 warm-up steps and a fixed EMA decay."""
    return functools.partial(tiny_module, lr_scheduler=partial(LinearWarmup, warmup_steps=4), ema_warmup=False)


def loader(n: int = 32, batch_size: int = 8) -> DataLoader:
    images = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    dataset = list(zip(images, torch.zeros(n, dtype=torch.int64), strict=True))
    return DataLoader(dataset, batch_size=batch_size)


def trainer(root: Path, max_steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(default_root_dir=root, max_steps=max_steps, accelerator="cpu", logger=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)  # fmt: skip


def test_optimizer_holds_only_the_trained_network(tiny_module) -> None:
    module = tiny_module()
    optimizer = module.configure_optimizers()["optimizer"]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in module.net.parameters()}
    assert not any(p.requires_grad for p in module.model.parameters())


def test_learning_rate_warms_up_linearly_then_stays(tiny_module) -> None:
    module = tiny_module(optimizer=partial(AdamW, lr=1e-3), lr_scheduler=partial(LinearWarmup, warmup_steps=4))
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    np.testing.assert_allclose(lrs, [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_fit_updates_ema_once_per_step_and_checkpoint_restores_it(tmp_path: Path, tiny_module) -> None:
    torch.manual_seed(0)
    module = tiny_module()
    start = [p.detach().clone() for p in module.net.parameters()]
    trainer(tmp_path, max_steps=3).fit(module, loader())
    # After k updates with decay d (no warm-up): ema = d^k start + sum of the trained iterates; just check that
    # the EMA moved away from the start but lags the trained weights.
    moved = [(e - s).abs().sum() for e, s in zip(module.model.net.parameters(), start, strict=True)]
    lag = [(e - p).abs().sum() for e, p in zip(module.model.net.parameters(), module.net.parameters(), strict=True)]
    assert sum(moved) > 0 and sum(lag) > 0

    path = tmp_path / "m.ckpt"
    trainer(tmp_path, max_steps=3).strategy.checkpoint_io.save_checkpoint({"state_dict": module.state_dict()}, path)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert any(k.startswith("model.net.") for k in state)  # the EMA weights: the sampling model's network
    restored = tiny_module()
    restored.load_state_dict(state)
    for a, b in zip(restored.model.net.parameters(), module.model.net.parameters(), strict=True):
        assert torch.equal(a, b)


def test_resume_restores_ema_optimizer_and_step_count(tmp_path: Path, tiny_module) -> None:
    torch.manual_seed(0)
    first = tiny_module()
    t1 = trainer(tmp_path, max_steps=3)
    t1.fit(first, loader())
    ckpt = tmp_path / "resume.ckpt"
    t1.save_checkpoint(ckpt)
    saved_ema = [p.detach().clone() for p in first.model.net.parameters()]
    saved_exp_avg = t1.optimizers[0].state_dict()["state"][0]["exp_avg"].clone()

    seen = {}

    class Capture(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["step"] = trainer.global_step
            seen["ema"] = [p.detach().clone() for p in pl_module.model.net.parameters()]
            seen["exp_avg"] = trainer.optimizers[0].state_dict()["state"][0]["exp_avg"].clone()
            seen["lr"] = trainer.optimizers[0].param_groups[0]["lr"]

    resumed = tiny_module()
    t2 = trainer(tmp_path, max_steps=6, callbacks=[Capture()])
    t2.fit(resumed, loader(), ckpt_path=ckpt)
    assert seen["step"] == 3
    for a, b in zip(seen["ema"], saved_ema, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(seen["exp_avg"], saved_exp_avg)
    assert seen["lr"] == pytest.approx(1e-3)  # warm-up (4 steps) position restored, not restarted
    assert t2.global_step == 6 and resumed.lr_schedulers().last_epoch == 6


def test_latest_checkpoint_finds_newest_last_ckpt(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no last.ckpt under"):
        latest_checkpoint(str(tmp_path), "run")
    for version in ("version_0", "version_1"):
        (tmp_path / "run" / version / "checkpoints").mkdir(parents=True)
        (tmp_path / "run" / version / "checkpoints" / "last.ckpt").write_bytes(b"x")
    old = tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt"
    os.utime(old, (1e9, 1e9))
    assert latest_checkpoint(str(tmp_path), "run").parent.parent.name == "version_1"


def test_sample_uses_ema_and_respects_overrides(tiny_module) -> None:
    module = tiny_module()
    with torch.no_grad():
        for p in module.model.net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x_T = module.model.initial_noise(torch.arange(3))
    assert torch.equal(x_T, module.model.initial_noise(torch.tensor([0, 1, 2])))
    assert torch.equal(x_T[1:], module.model.initial_noise(torch.tensor([1, 2])))  # noise depends on the index only
    a = module.model.sample(x_T)
    b = module.model.sample(x_T, steps=2)
    assert a.shape == (3, 1, 8, 8) and not torch.allclose(a, b)
    with pytest.raises(ValueError, match="--model.sampling.sampler 'euler' is unknown"):
        module.model.sample(x_T, sampler="euler")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sampler="euler"), "--model.sampling.sampler"),
        (dict(skip="cubic"), "--model.sampling.skip"),
        (dict(eta=-0.1), "--model.sampling.eta"),
        (dict(sampling_steps=51), "--model.sampling.steps"),
        (dict(ddpm_variance="learned"), "--model.sampling.variance"),
    ],
)
def test_bad_sampler_settings_fail_at_construction(kwargs, message, tiny_module) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_module(**kwargs)


# ---------------------------------------------------------------------------------------------- loggers
def test_logger_never_needs_a_login(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert not wandb_logged_in()
    assert isinstance(auto_logger(str(tmp_path), "run"), TensorBoardLogger)
    assert auto_logger(str(tmp_path), "run", "tensorboard", version="version_3").version == "version_3"
    # Resuming into a CSV run's folder keeps the earlier metrics.csv (Lightning's writer deletes it on start).
    (tmp_path / "run" / "version_3").mkdir(parents=True)
    (tmp_path / "run" / "version_3" / "metrics.csv").write_text("step,loss\n0,1.0\n")
    csv_logger = auto_logger(str(tmp_path), "run", "csv", version="version_3")
    assert isinstance(csv_logger, CSVLogger) and csv_logger.version == "version_3"
    csv_logger.log_metrics({"loss": 0.5}, step=1)
    csv_logger.save()
    (kept,) = (tmp_path / "run" / "version_3").glob("metrics.until-*.csv")
    assert kept.read_text() == "step,loss\n0,1.0\n"
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = auto_logger(str(tmp_path), "run")
    assert isinstance(logger, WandbLogger) and logger._offline
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_logged_in()
    with pytest.raises(ValueError, match="unknown logger backend"):
        auto_logger(str(tmp_path), "run", "mlflow")


# ---------------------------------------------------------------------------------------------- images and files
def test_to_uint8_and_grid_layout(tmp_path: Path) -> None:
    x = torch.tensor([-1.0, -0.999, 0.0, 1.0, 2.0]).reshape(1, 1, 1, 5)
    assert to_uint8(x).flatten().tolist() == [0, 0, 128, 255, 255]
    images = torch.stack([torch.full((1, 2, 2), k, dtype=torch.uint8) for k in range(5)])
    grid = make_grid(images, nrow=3, padding=1, pad_value=9)
    assert grid.shape == (1, 2 * 3 + 1, 3 * 3 + 1)
    assert grid[0, 1, 1] == 0 and grid[0, 1, 4] == 1 and grid[0, 4, 4] == 4 and grid[0, 0, 0] == 9
    path = save_grid(torch.zeros(4, 3, 5, 5), tmp_path / "g" / "grid.png")
    assert Image.open(path).size == (2 * 7 + 2, 2 * 7 + 2)
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temporary file left behind


def test_atomic_checkpoint_keeps_the_old_file_when_a_save_fails(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        io.save_checkpoint({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_checkpoint_alone_rebuilds_the_module(tmp_path: Path, tiny_module) -> None:
    """The network's class and arguments are recorded in the checkpoint's hyper-parameters."""
    module = tiny_module(eta=0.5)
    t = trainer(tmp_path, max_steps=1)
    t.fit(module, loader())
    t.save_checkpoint(tmp_path / "m.ckpt")
    hparams = torch.load(tmp_path / "m.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["net"]["class_path"] == "src.models.unet.UNet"
    assert hparams["net"]["init_args"]["base_channels"] == 8
    loaded = DiffusionModule.load_from_checkpoint(tmp_path / "m.ckpt", map_location="cpu")
    assert loaded.hparams["sampling"]["eta"] == 0.5 and loaded.net.config == module.net.config
    for a, b in zip(loaded.model.net.parameters(), module.model.net.parameters(), strict=True):
        assert torch.equal(a, b)


def test_channels_last_and_compile_keep_training_and_checkpoint_keys(tmp_path: Path, tiny_module) -> None:
    torch.manual_seed(0)
    plain = tiny_module()
    trainer(tmp_path / "a", max_steps=2).fit(plain, loader())
    torch.manual_seed(0)
    nhwc = tiny_module(channels_last=True)
    trainer(tmp_path / "b", max_steps=2).fit(nhwc, loader())
    weight = nhwc.net.down[0][0].conv1.weight  # (8, 8, 3, 3): NHWC and NCHW strides differ
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    for a, b in zip(plain.net.parameters(), nhwc.net.parameters(), strict=True):
        torch.testing.assert_close(a, b.contiguous(), rtol=1e-4, atol=1e-6)  # same step, other memory layout

    compiled = tiny_module(compile=True)
    compiled.on_fit_start()  # wraps lazily: nothing is compiled until the first training step
    assert compiled.train_net is not compiled.net
    assert set(compiled.state_dict()) == set(plain.state_dict())  # no "_orig_mod." keys
