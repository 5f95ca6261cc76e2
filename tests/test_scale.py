"""Multi-process and mixed-precision training on the CPU: DDP (gloo) equals one process with the same global
batch; step counts and the learning-rate schedule do not depend on the number of processes; bf16 autocast."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from src.diffusion.losses import l_simple
from src.module import DiffusionModule
from src.optim import AdamW, LinearWarmup
from src.options import Sampling, Schedule, Training

NUM_ITEMS, STEPS, GLOBAL_BATCH = 32, 3, 8


class IndexedImages(Dataset):
    """Fixed random images, returned with their index."""

    def __init__(self) -> None:
        self.images = torch.rand(NUM_ITEMS, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def __len__(self) -> int:
        return NUM_ITEMS

    def __getitem__(self, i: int):
        return self.images[i], i


class RankStrided(Sampler):
    """Rank r of W takes items r, r + W, ...: each step's items across ranks are exactly one process's batch.
    (Lightning's own DistributedSampler for training shuffles even when the loader did not.)"""

    @staticmethod
    def _rank_world() -> tuple[int, int]:
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

    def __iter__(self):
        rank, world = self._rank_world()
        return iter(range(rank, NUM_ITEMS, world))

    def __len__(self) -> int:
        return NUM_ITEMS // self._rank_world()[1]


class IndexNoiseModule(DiffusionModule):
    """DiffusionModule whose t and noise are functions of the sample index, not of each process's RNG stream,
    so that one process and N processes see the same (x_0, t, noise) triples."""

    def training_step(self, batch, batch_idx):
        images, index = batch
        t = (index * 37) % self.schedule.num_timesteps
        noise = torch.stack(
            [torch.randn(images.shape[1:], generator=torch.Generator().manual_seed(int(i))) for i in index]
        )
        loss = l_simple(self.net, images, self.schedule, t, noise).mean()
        self.log("train/loss", loss)
        return loss


class SaveRankState(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(
            {
                "net": {k: v.clone() for k, v in pl_module.net.state_dict().items()},
                "ema": {k: v.clone() for k, v in pl_module.model.net.state_dict().items()},
                "step": trainer.global_step,
                "lr": trainer.optimizers[0].param_groups[0]["lr"],
                "scheduler_steps": trainer.lr_scheduler_configs[0].scheduler.last_epoch,
            },
            self.out / f"rank{trainer.global_rank}_of_{trainer.world_size}.pt",
        )


@pytest.fixture
def tiny_module(tiny_unet):
    """A factory of the tiny IndexNoiseModule, the same weights every time (seeded)."""

    def make() -> IndexNoiseModule:
        torch.manual_seed(0)
        net = tiny_unet(attn_resolutions=(4,), mid_attention=True)
        return IndexNoiseModule(
            net,
            schedule=Schedule(timesteps=50),
            optimizer=partial(AdamW, lr=1e-3),
            lr_scheduler=partial(LinearWarmup, warmup_steps=5),
            training=Training(ema_decay=0.9, ema_warmup=True),
            sampling=Sampling(steps=5),
        )

    return make


def run(module: IndexNoiseModule, tmp_path: Path, devices: int, **kwargs) -> None:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        callbacks=[SaveRankState(tmp_path)],
        use_distributed_sampler=False,
        **kwargs,
    )
    # Per-process batch = global batch / processes.
    loader = DataLoader(IndexedImages(), batch_size=GLOBAL_BATCH // devices, sampler=RankStrided())
    trainer.fit(module, loader)


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tmp_path: Path, tiny_module) -> None:
    run(tiny_module(), tmp_path, devices=1)
    run(tiny_module(), tmp_path, devices=2)
    single = torch.load(tmp_path / "rank0_of_1.pt", weights_only=True)
    ranks = [torch.load(tmp_path / f"rank{r}_of_2.pt", weights_only=True) for r in range(2)]
    for state in ranks:
        # Steps are counted once per optimizer step, not per process; the warm-up follows them.
        assert state["step"] == single["step"] == STEPS
        assert state["scheduler_steps"] == single["scheduler_steps"] == STEPS
        assert math.isclose(state["lr"], single["lr"])
        for key in ("net", "ema"):
            for name, value in single[key].items():
                torch.testing.assert_close(state[key][name], value, rtol=1e-5, atol=1e-6, msg=f"{key}.{name}")
    # EMA (and weights) identical on every rank, bit for bit.
    for name, value in ranks[0]["ema"].items():
        assert torch.equal(value, ranks[1]["ema"][name]), name


def test_bf16_autocast_training_step_on_cpu_is_finite(tmp_path: Path, tiny_module) -> None:
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    module = tiny_module()
    trainer.fit(module, DataLoader(IndexedImages(), batch_size=8))
    assert math.isfinite(trainer.callback_metrics["train/loss"].item())
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert all(p.dtype == torch.float32 for p in module.parameters())  # bf16 only inside autocast
