"""Training the noise-conditioned classifier p_phi(y | x_t, t) used by classifier guidance (Dhariwal & Nichol 2021,
"Diffusion Models Beat GANs on Image Synthesis", section 4): the classifier must name the class from every noise
level the sampler will show it, so it is trained on x_t ~ q(x_t | x_0) with t uniform.

    python -m src.classifier_main fit --config configs/fashion_mnist_classifier.yaml
    python -m src.main predict --config configs/fashion_mnist.yaml --ckpt_path CKPT \\
        --model.classifier_path runs/fashion_mnist_classifier/version_0/classifier.pt --model.classifier_scale 1.0

The network is `src.models.classifier.NoisyClassifier` (the UNet's encoder half plus a head); at the end of fit
it is saved with `NoisyClassifier.save` as `<run dir>/classifier.pt` (or `export_path`), the file that
`--model.classifier_path` loads.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from src.diffusion.losses import sample_timesteps
from src.diffusion.schedule import NoiseSchedule
from src.models.classifier import NoisyClassifier
from src.module import linear_warmup


def noisy_classifier_loss(
    classifier: nn.Module, x0: Tensor, y: Tensor, schedule: NoiseSchedule, t: Tensor | None = None
) -> Tensor:
    """Cross-entropy of p_phi(y | x_t, t) with x_t ~ q(x_t | x_0) and t uniform (Dhariwal & Nichol, section 4):
    the classifier must know y from every noise level the sampler will show it. Mean over the batch."""
    if t is None:
        t = sample_timesteps(x0.shape[0], schedule.num_timesteps, x0.device)
    x_t = schedule.q_sample(x0, t)
    return torch.nn.functional.cross_entropy(classifier(x_t, t), y)


class ClassifierModule(L.LightningModule):
    """Cross-entropy training of a noise-conditioned classifier on the diffusion model's forward process.

    Args:
        net: the classifier, `net(x_t, t) -> logits`.
        schedule: noise schedule name (must match the diffusion model it will guide): "linear" or "cosine".
        timesteps: number of diffusion steps T.
        beta_start: first beta of the linear schedule.
        beta_end: last beta of the linear schedule.
        lr: AdamW learning rate (3e-4 in Dhariwal & Nichol's classifiers).
        weight_decay: AdamW weight decay (0.05 there).
        warmup_steps: linear learning-rate warm-up steps.
        export_path: where to save the trained classifier (default: `<run dir>/classifier.pt`).
        clean_only: train on clean images x_0 at t = 0 only (no noise): an ordinary image classifier, whose
            penultimate features `--fid.extractor FILE` and `python -m src.evaluate --extractor FILE` use
            for a Fréchet distance (configs/fashion_mnist_fd_classifier.yaml). Its features then describe clean
            images only, instead of sharing capacity with the 999 noise levels guidance needs.
    """

    def __init__(
        self,
        net: NoisyClassifier,
        schedule: str = "linear",
        timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        lr: float = 3e-4,
        weight_decay: float = 0.05,
        warmup_steps: int = 0,
        export_path: str | None = None,
        clean_only: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.schedule = NoiseSchedule.from_options(schedule, timesteps, beta_start, beta_end)
        self.saved_path: Path | None = None

    def on_fit_start(self) -> None:
        self.schedule = self.schedule.to(self.device)

    on_validation_start = on_fit_start

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        # Kept for the non-finite guard's report (src/callbacks/faults.py).
        if self.hparams.clean_only:
            self.last_t = torch.zeros(images.shape[0], dtype=torch.int64, device=images.device)
            loss = torch.nn.functional.cross_entropy(self.net(images, self.last_t), labels)
        else:
            self.last_t = sample_timesteps(images.shape[0], self.schedule.num_timesteps, images.device)
            loss = noisy_classifier_loss(self.net, images, labels, self.schedule, self.last_t)
        self.last_loss = loss.detach()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        # The same t and noise for the same batch at every evaluation, so successive values are comparable.
        generator = torch.Generator().manual_seed(10_000 + batch_idx)
        t = torch.randint(0, self.schedule.num_timesteps, (images.shape[0],), generator=generator).to(self.device)
        noise = torch.randn(images.shape, generator=generator).to(self.device)
        logits = self.net(self.schedule.q_sample(images, t, noise), t)
        clean = self.net(images, torch.zeros_like(t))
        self.log_dict(
            {
                "val/loss": torch.nn.functional.cross_entropy(logits, labels),
                "val/acc": (logits.argmax(1) == labels).float().mean(),  # over all noise levels
                "val/acc_clean": (clean.argmax(1) == labels).float().mean(),  # at t = 0
            },
            prog_bar=True,
            sync_dist=True,
        )

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.net.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        return {"optimizer": optimizer, "lr_scheduler": linear_warmup(optimizer, hp.warmup_steps)}

    def on_train_end(self) -> None:
        from src.callbacks.sampling import run_dir

        # run_dir is a broadcast under DDP: every rank resolves the path, then rank 0 alone writes.
        path = Path(self.hparams.export_path or run_dir(self.trainer) / "classifier.pt")
        if not self.trainer.is_global_zero:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self.net.save(str(path))
        self.saved_path = path
        rank_zero_info(f"Saved the classifier to {path} (use it with --model.classifier_path {path})")
