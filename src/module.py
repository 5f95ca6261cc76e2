"""DiffusionModule: Lightning wiring around a noise-prediction network and a noise schedule.

The math lives in `src/diffusion/` (schedule, loss, samplers) and the network in `src/models/unet.py`;
this file only orchestrates: the training step (DDPM Algorithm 1), the optimizer and its warm-up, the EMA
weights, and sampling with those EMA weights for validation, callbacks and `predict`.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn

from src.diffusion.losses import l_simple
from src.diffusion.samplers import DDPM_VARIANCES, SAMPLERS, SKIP_TYPES, sample
from src.diffusion.schedule import NoiseSchedule
from src.models.ema import EMA


class DiffusionModule(L.LightningModule):
    """Trains `net` as eps_theta with L_simple and samples from its EMA copy.

    Args:
        net: the noise-prediction network, `net(x_t, t) -> eps` (e.g. `src.models.unet.UNet`).
        schedule: noise schedule name, "linear" (DDPM) or "cosine" (improved DDPM).
        timesteps: number of diffusion steps T.
        beta_start: first beta of the linear schedule.
        beta_end: last beta of the linear schedule.
        lr: peak learning rate of Adam(W) (2e-4 in DDPM for CIFAR-10).
        weight_decay: AdamW weight decay (0 in DDPM).
        adam_betas: Adam's (beta1, beta2).
        warmup_steps: linear learning-rate warm-up from 0 over this many optimizer steps (5000 in DDPM).
        ema_decay: decay of the weights' exponential moving average (0.9999 in DDPM).
        ema_warmup: use the decay warm-up min(decay, (1 + n) / (10 + n)) (helps short runs).
        sampler: "ddim" or "ddpm", used by validation grids, the sample callback and predict.
        sampling_steps: DDIM steps (ignored by "ddpm", which runs all T steps).
        eta: DDIM eta in [0, 1]: 0 deterministic DDIM, 1 DDPM-like.
        skip: DDIM timestep spacing: "uniform", "quad", "trailing" or "linspace".
        ddpm_variance: "fixed_small" (beta-tilde) or "fixed_large" (beta) for the "ddpm" sampler.
        clip_denoised: clamp the predicted x_0 to [-1, 1] at every sampling step.
        sample_seed: seed of the predict noise; sample i of a run always starts from the same x_T.
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: str = "linear",
        timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 5000,
        ema_decay: float = 0.9999,
        ema_warmup: bool = True,
        sampler: str = "ddim",
        sampling_steps: int = 50,
        eta: float = 0.0,
        skip: str = "uniform",
        ddpm_variance: str = "fixed_small",
        clip_denoised: bool = False,
        sample_seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        if sampler not in SAMPLERS:
            raise ValueError(f"--model.sampler {sampler!r} is unknown; choose one of {', '.join(SAMPLERS)}")
        if skip not in SKIP_TYPES:
            raise ValueError(f"--model.skip {skip!r} is unknown; choose one of {', '.join(SKIP_TYPES)}")
        if ddpm_variance not in DDPM_VARIANCES:
            raise ValueError(
                f"--model.ddpm_variance {ddpm_variance!r} is unknown; choose one of {', '.join(DDPM_VARIANCES)}"
            )
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"--model.eta must be in [0, 1], got {eta}")
        if not 1 <= sampling_steps <= timesteps:
            raise ValueError(
                f"--model.sampling_steps must be in [1, {timesteps}] (--model.timesteps), got {sampling_steps}"
            )
        self.net = net
        self.ema = EMA(net, decay=ema_decay, warmup=ema_warmup)
        kwargs = {"beta_start": beta_start, "beta_end": beta_end} if schedule == "linear" else {}
        self.schedule = NoiseSchedule.from_name(schedule, timesteps, **kwargs)

    # ------------------------------------------------------------------ shapes
    @property
    def image_shape(self) -> tuple[int, int, int]:
        size = self.net.image_size
        return (self.net.in_channels, size, size)

    def on_fit_start(self) -> None:
        self.schedule = self.schedule.to(self.device)

    def on_predict_start(self) -> None:
        self.schedule = self.schedule.to(self.device)

    on_validation_start = on_test_start = on_predict_start

    # ------------------------------------------------------------------ training (Algorithm 1)
    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        """eps predicted by the EMA weights (what sampling uses)."""
        return self.ema(x_t, t)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images = batch[0]
        loss = l_simple(self.net, images, self.schedule).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Norm before clipping, so a clipped run still shows how large its gradients were.
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        if grads:
            self.log(
                "train/grad_norm",
                torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])),
            )
        self.log("train/lr", optimizer.param_groups[0]["lr"], prog_bar=True)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # One EMA update per optimizer step (not per micro-batch under gradient accumulation).
        self.ema.update(self.net, self.trainer.global_step)

    def configure_optimizers(self):
        hp = self.hparams
        # Only the trained network's parameters: the EMA copy is updated by averaging, never by the optimizer.
        optimizer = torch.optim.AdamW(
            self.net.parameters(), lr=hp.lr, betas=tuple(hp.adam_betas), weight_decay=hp.weight_decay
        )
        warmup = max(int(hp.warmup_steps), 0)

        def lr_factor(step: int) -> float:
            # DDPM: linear warm-up over the first `warmup_steps` steps, then constant.
            return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ evaluation: EMA loss on fixed noise
    def _fixed_noise_loss(self, images: Tensor, batch_idx: int) -> Tensor:
        # The same t and noise for the same batch at every evaluation, so successive values are comparable.
        generator = torch.Generator().manual_seed(10_000 + batch_idx)
        t = torch.randint(0, self.schedule.num_timesteps, (images.shape[0],), generator=generator)
        noise = torch.randn(images.shape, generator=generator, dtype=images.dtype)
        return l_simple(self.ema, images, self.schedule, t.to(self.device), noise.to(self.device)).mean()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val/loss", self._fixed_noise_loss(batch[0], batch_idx), prog_bar=True, sync_dist=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("test/loss", self._fixed_noise_loss(batch[0], batch_idx), sync_dist=True)

    # ------------------------------------------------------------------ sampling
    def initial_noise(self, indices: Tensor, seed: int | None = None) -> Tensor:
        """x_T for sample indices: sample i's noise depends only on (seed, i), never on batching or the
        number of processes."""
        seed = self.hparams.sample_seed if seed is None else seed
        noise = [
            torch.randn(self.image_shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i)))
            for i in indices.tolist()
        ]
        return torch.stack(noise).to(self.device)

    @torch.no_grad()
    def sample(
        self, x_T: Tensor, progress: bool = False, generator: torch.Generator | None = None, **overrides: object
    ) -> Tensor:
        """Images in [-1, 1] from noise x_T with the EMA weights and the configured sampler; keyword
        overrides (sampler, steps, eta, skip, variance, clip_x0) replace the configured options."""
        hp = self.hparams
        options = dict(
            sampler=hp.sampler,
            steps=hp.sampling_steps,
            eta=hp.eta,
            skip=hp.skip,
            variance=hp.ddpm_variance,
            clip_x0=hp.clip_denoised,
        )
        options.update(overrides)
        schedule = self.schedule if self.schedule.betas.device == self.device else self.schedule.to(self.device)
        return sample(self.ema, x_T.to(self.device), schedule, generator=generator, progress=progress, **options)

    def predict_step(self, batch: Tensor, batch_idx: int) -> dict[str, Tensor]:
        """`batch` holds sample indices; returns them with the images in [-1, 1]."""
        indices = batch[0] if isinstance(batch, (list, tuple)) else batch
        generator = torch.Generator().manual_seed(self.hparams.sample_seed * 1_000_003 + int(indices[0]) + 7)
        images = self.sample(self.initial_noise(indices), generator=generator)
        return {"index": indices, "images": images}
