"""Post-hoc EMA during fit (Karras et al. 2024, EDM2): track power-function EMAs of the trained network at a few
relative lengths and write snapshots of them, from which `python -m src.posthoc_ema` reconstructs the average of
any other length afterwards (the math: src/models/posthoc_ema.py).

    trainer:
      callbacks:
        - class_path: src.callbacks.posthoc_ema.PostHocEMA
          init_args: {sigma_rels: [0.05, 0.10], every_n_steps: 250, dtype: float16}

Snapshots are `<run dir>/posthoc_ema/step_<N>.pt`, one file per snapshot step holding every tracked average, each
written atomically the moment it is taken and never held in memory afterwards: memory stays at one copy of the
network per sigma_rel however many snapshots a run takes. The running averages live beside the network (same
device, float32) and are in every checkpoint (this callback's state), so a resumed run continues them exactly.
The averages are of what the optimizer trains: `pl_module.net`, and a learned diffusion process's parameters
(`--model.process` with parameters, e.g. VDM's noise schedule) under keys prefixed `PROCESS_PREFIX`, so that a
reconstruction pairs the network with the schedule of the same average (`trained_state`). The model's own EMA
(`--model.training.ema_decay`, what sampling uses) is unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from src.atomic import save_atomically
from src.callbacks.sampling import run_dir
from src.errors import ConfigError
from src.models.posthoc_ema import sigma_rel_to_gamma, update_power_ema

SNAPSHOT_FORMAT = "ddim-lightning-posthoc-ema"
SNAPSHOT_DIR = "posthoc_ema"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The snapshot keys of a learned process's state (the network's keys are its own state-dict keys, as they always were;
# a state-dict key never contains "::").
PROCESS_PREFIX = "process::"


def trained_state(pl_module: L.LightningModule) -> dict[str, Tensor]:
    """The state that post-hoc EMA averages: the network's, plus a learned process's under `PROCESS_PREFIX` (a fixed
    schedule has no parameters and adds nothing, so snapshots of such runs are as before)."""
    state = dict(pl_module.net.state_dict())
    process = getattr(pl_module, "process", None)
    if process is not None and getattr(process, "has_parameters", lambda: False)():
        state.update({PROCESS_PREFIX + k: v for k, v in process.state_dict().items()})
    return state


def split_state(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(the network's state, the learned process's state: empty for a fixed schedule) of a `trained_state`."""
    net = {k: v for k, v in state.items() if not k.startswith(PROCESS_PREFIX)}
    return net, {k[len(PROCESS_PREFIX) :]: v for k, v in state.items() if k.startswith(PROCESS_PREFIX)}


class PostHocEMA(Callback):
    """Power-function EMAs of the trained network at `sigma_rels`, snapshotted every `every_n_steps` optimizer steps
    and at the end of fit.

    Args:
        sigma_rels: relative EMA lengths to track (EDM2 tracks 0.05 and 0.10); each in (0, 0.3].
        every_n_steps: optimizer steps between snapshots. More snapshots fit more lengths better; EDM2's
            reconstructions use a few dozen. The quickstart's ~3,700 steps at 250 give 15 snapshot steps.
        dtype: precision of the snapshot files (float16 halves the disk; the running averages stay float32).
    """

    def __init__(
        self, sigma_rels: list[float] = (0.05, 0.10), every_n_steps: int = 250, dtype: str = "float32"
    ) -> None:
        self.sigma_rels = [float(s) for s in sigma_rels]
        try:
            self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        except ValueError as e:
            raise ConfigError(f"PostHocEMA sigma_rels {self.sigma_rels}: {e}") from None
        if not self.sigma_rels or every_n_steps < 1 or dtype not in DTYPES:
            raise ConfigError(
                f"PostHocEMA needs at least one sigma_rel, every_n_steps >= 1 and dtype one of {sorted(DTYPES)}; "
                f"got {self.sigma_rels}, {every_n_steps}, {dtype!r}"
            )
        self.every_n_steps = int(every_n_steps)
        self.dtype = dtype
        self.step = 0  # the training step the averages have seen (EDM2's t)
        self.averages: list[dict[str, Tensor]] | None = None
        self._restored: dict[str, Any] | None = None
        self._dir: Path | None = None
        self._last_snapshot = -1
        self._float_keys: list[str] = []
        self._other_keys: list[str] = []

    # ------------------------------------------------------------------ state
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._dir = run_dir(trainer) / SNAPSHOT_DIR  # a collective under DDP: every rank calls it

    def state_dict(self) -> dict[str, Any]:
        if self.averages is None:
            return {}
        averages = [{k: v.detach().cpu() for k, v in average.items()} for average in self.averages]
        return {"sigma_rels": self.sigma_rels, "step": self.step, "averages": averages}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict) or None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not on_fit_start: Lightning restores the step counter after that hook, before this one.
        if not trainer.is_global_zero:
            return  # the weights are the same on every rank; one copy of the averages is enough
        restored, self._restored = self._restored, None
        net_state = trained_state(pl_module)
        if restored:
            if [float(s) for s in restored["sigma_rels"]] != self.sigma_rels:
                raise ConfigError(
                    f"PostHocEMA: the checkpoint tracked sigma_rels {restored['sigma_rels']}, this run asks for "
                    f"{self.sigma_rels}; keep the same sigma_rels to resume, or start a new run"
                )
            self.step = int(restored["step"])
            self.averages = [{k: v.to(net_state[k].device) for k, v in avg.items()} for avg in restored["averages"]]
            for average in self.averages:  # a checkpoint from before learned processes were averaged: start them now
                for key in net_state.keys() - average.keys():
                    average[key] = net_state[key].detach().clone()
            self._last_snapshot = self.step
        else:
            self.averages = [{k: v.detach().clone() for k, v in net_state.items()} for _ in self.sigma_rels]
            self.step = trainer.global_step
        # Averaged (floating point) and copied (counters) entries, sorted once rather than at every step.
        self._float_keys = [k for k, v in net_state.items() if v.is_floating_point()]
        self._other_keys = [k for k, v in net_state.items() if not v.is_floating_point()]
        if self.step > 0 and not restored:
            rank_zero_warn(
                f"PostHocEMA starts at step {self.step} without earlier averages (the checkpoint has none): its "
                "averages count every earlier step as the current weights"
            )

    # ------------------------------------------------------------------ updates and snapshots
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # One update per optimizer step (global_step counts those), not per micro-batch under gradient accumulation.
        if self.averages is None or trainer.global_step == self.step:
            return
        self.step = trainer.global_step
        net_state = trained_state(pl_module)
        for average, gamma in zip(self.averages, self.gammas, strict=True):
            keys = self._float_keys
            update_power_ema([average[k] for k in keys], [net_state[k] for k in keys], self.step, gamma)
            for key in self._other_keys:
                average[key].copy_(net_state[key])
        if self.step % self.every_n_steps == 0:
            self.snapshot()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The last step's averages, so that the reconstruction can reach the end of the run.
        if self.averages is not None and self.step > 0:
            self.snapshot()
            rank_zero_info(f"PostHocEMA: snapshots in {self._dir}; reconstruct with python -m src.posthoc_ema")

    def snapshot(self) -> Path | None:
        """Write the current averages to `<run dir>/posthoc_ema/step_<N>.pt` (once per step)."""
        if self.averages is None or self._dir is None or self._last_snapshot == self.step:
            return None
        dtype = DTYPES[self.dtype]
        averages = [
            {k: (v.to(dtype) if v.is_floating_point() else v).cpu() for k, v in average.items()}
            for average in self.averages
        ]
        path = self._dir / f"step_{self.step:08d}.pt"
        save_atomically(
            {"format": SNAPSHOT_FORMAT, "step": self.step, "sigma_rels": self.sigma_rels, "gammas": self.gammas,
             "dtype": self.dtype, "averages": averages},
            path,
        )  # fmt: skip
        self._last_snapshot = self.step
        return path
