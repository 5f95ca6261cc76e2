"""Exact resume of the random streams: every rank's torch, CUDA, numpy and python RNG states in the checkpoint.

Lightning's checkpoints hold the model, the optimizers, the LR schedulers and the loop counters, but no RNG state;
without it a resumed run draws other timesteps, noise and dropout masks than the run that was never stopped.
`RNGStateCallback` saves the states as its `state_dict` (under `checkpoint["callbacks"]`) and puts them back when
training starts. `src.main` adds it to every `fit` run that does not list it itself.

Checkpoints written before this callback existed hold the states under the top-level key
`src.resume.RNG_STATES_KEY`; they resume exactly as well.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from src.resume import RNG_STATES_KEY, gather_rng_states, restore_rng_states


class RNGStateCallback(Callback):
    """Saves every rank's RNG states in each checkpoint and restores this rank's when a resumed fit starts.

    `state_dict` is a collective call under DDP (the states travel to rank 0, which writes the file); Lightning calls
    it on every rank while it builds a checkpoint. The states are applied in `on_train_start`, after the sanity
    check and everything else that runs between loading the checkpoint and the first training batch, so nothing
    can shift the streams. A checkpoint from more ranks than this run has restores the first ones' states; a rank
    without saved states (more ranks than the checkpoint had) keeps its seeded streams.
    """

    def __init__(self) -> None:
        self._to_restore: list[dict[str, Any]] | None = None  # one entry per rank of the saving run

    def state_dict(self) -> dict[str, Any]:
        return {"rng_states": gather_rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = list(state_dict["rng_states"])

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Called before `load_state_dict`, which replaces these with the callback's own entry when there is one.
        legacy = checkpoint.get(RNG_STATES_KEY)
        if legacy:
            self._to_restore = list(legacy)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        states, self._to_restore = self._to_restore, None
        if states and trainer.global_rank < len(states):
            restore_rng_states(states[trainer.global_rank])
