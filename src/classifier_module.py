"""Training the noise-conditioned classifier p_phi(y | x_t, t) used by classifier guidance (Dhariwal & Nichol 2021,
"Diffusion Models Beat GANs on Image Synthesis", section 4): the classifier must name the class from every noise
level the sampler will show it, so it is trained on x_t ~ q(x_t | x_0) with t uniform.

    python -m src.classifier_main fit --config configs/fashion_mnist_classifier.yaml
    python -m src.main predict --config configs/fashion_mnist.yaml --ckpt_path CKPT \\
        --model.guidance.classifier_path runs/fashion_mnist_classifier/version_0/classifier.pt \\
        --model.guidance.classifier_scale 1.0

The network is `src.models.classifier.NoisyClassifier` (the UNet's encoder half plus a head); at the end of fit
it is saved with `NoisyClassifier.save` as `<run dir>/classifier.pt` (or `export_path`), the file that
`--model.guidance.classifier_path` loads.

With `clean_only` the same loop trains an ordinary clean-image classifier, e.g. the `FeatureClassifier` CNN of
the quality measure fd_classifier (configs/fashion_mnist_fd_classifier.yaml), with random-crop augmentation and
a cosine learning-rate decay; `python -m src.classifier_main test --config ... --ckpt_path last` gives its
accuracy on the test split.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from src.diffusion.losses import sample_timesteps
from src.diffusion.schedule import NoiseSchedule, schedule_recipe
from src.errors import ConfigError
from src.models.classifier import FeatureClassifier
from src.optim import LinearWarmup

LR_DECAYS = ("none", "cosine")


def noisy_classifier_loss(
    classifier: nn.Module, x0: Tensor, y: Tensor, schedule: NoiseSchedule, t: Tensor | None = None
) -> Tensor:
    """Cross-entropy of p_phi(y | x_t, t) with x_t ~ q(x_t | x_0) and t uniform (Dhariwal & Nichol, section 4):
    the classifier must know y from every noise level the sampler will show it. Mean over the batch."""
    if t is None:
        t = sample_timesteps(x0.shape[0], schedule.num_timesteps, x0.device)
    x_t = schedule.q_sample(x0, t)
    return torch.nn.functional.cross_entropy(classifier(x_t, t), y)


def random_crop(images: Tensor, padding: int, fill: float = -1.0) -> Tensor:
    """Each image shifted by its own random offset of up to `padding` pixels in each direction: padded with
    `fill` (-1, the black background of [-1, 1] images), then cropped back to its size (the translation
    augmentation of Krizhevsky et al. 2012 / He et al. 2016's "4 pixels are padded on each side")."""
    if padding <= 0:
        return images
    b, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4, value=fill)
    dy = torch.randint(0, 2 * padding + 1, (b, 1), device=images.device)
    dx = torch.randint(0, 2 * padding + 1, (b, 1), device=images.device)
    rows = (dy + torch.arange(h, device=images.device))[:, :, None]  # (B, H, 1)
    cols = (dx + torch.arange(w, device=images.device))[:, None, :]  # (B, 1, W)
    batch = torch.arange(b, device=images.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def cosine_decay_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """The learning-rate factor of a linear warm-up then a half-cosine decay to 0 at `total_steps`
    (Loshchilov & Hutter 2017, SGDR, eq. 5 with one cycle and eta_min = 0)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(max(step - warmup_steps, 0) / max(total_steps - warmup_steps, 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class ClassifierModule(L.LightningModule):
    """Cross-entropy training of a noise-conditioned classifier on the diffusion model's forward process.

    Args:
        net: the classifier, `net(x_t, t) -> logits`: a `NoisyClassifier` (guidance) or a `FeatureClassifier`.
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
            images only, instead of sharing capacity with the 999 noise levels guidance needs. A `FeatureClassifier`
            (the fd_classifier CNN) needs it.
        random_crop: with `clean_only`: shift each training image by up to this many pixels (zero-padded crop,
            `random_crop`); 0: off. Horizontal flips are the data module's `--data.random_flip`.
        lr_decay: "none" (constant after the warm-up) or "cosine" (to 0 at `trainer.max_steps`).
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: str = "linear",
        timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        lr: float = 3e-4,
        weight_decay: float = 0.05,
        warmup_steps: int = 0,
        export_path: str | None = None,
        clean_only: bool = False,
        random_crop: int = 0,
        lr_decay: str = "none",
    ) -> None:
        super().__init__()
        if isinstance(net, FeatureClassifier) and not clean_only:
            raise ConfigError("a FeatureClassifier is a clean-image classifier: set --model.clean_only true")
        if random_crop < 0 or (random_crop > 0 and not clean_only):
            raise ConfigError(f"--model.random_crop must be >= 0 and needs --model.clean_only true, got {random_crop}")
        if lr_decay not in LR_DECAYS:
            raise ConfigError(f"--model.lr_decay must be one of {', '.join(LR_DECAYS)}, got {lr_decay!r}")
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.schedule = NoiseSchedule.from_name(**schedule_recipe(schedule, timesteps, beta_start, beta_end))
        self.saved_path: Path | None = None

    def on_fit_start(self) -> None:
        self.schedule = self.schedule.to(self.device)

    on_validation_start = on_fit_start

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        # Kept for the non-finite guard's report (src/callbacks/faults.py).
        if self.hparams.clean_only:
            self.last_t = torch.zeros(images.shape[0], dtype=torch.int64, device=images.device)
            images = random_crop(images, self.hparams.random_crop)
            loss = torch.nn.functional.cross_entropy(self.net(images, self.last_t), labels)
        else:
            self.last_t = sample_timesteps(images.shape[0], self.schedule.num_timesteps, images.device)
            loss = noisy_classifier_loss(self.net, images, labels, self.schedule, self.last_t)
        self.last_loss = loss.detach()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    def _evaluate(self, batch: tuple[Tensor, Tensor], batch_idx: int, stage: str) -> None:
        """`<stage>/acc_clean` (accuracy on the clean images, t = 0) and, for a noise-conditioned classifier,
        `<stage>/loss` and `<stage>/acc` over all noise levels; with `clean_only` those two are the clean ones."""
        images, labels = batch
        zeros = torch.zeros(images.shape[0], dtype=torch.int64, device=images.device)
        clean = self.net(images, zeros)
        if self.hparams.clean_only:
            logits = clean
        else:
            # The same t and noise for the same batch at every evaluation, so successive values are comparable.
            generator = torch.Generator().manual_seed(10_000 + batch_idx)
            t = torch.randint(0, self.schedule.num_timesteps, (images.shape[0],), generator=generator).to(self.device)
            noise = torch.randn(images.shape, generator=generator).to(self.device)
            logits = self.net(self.schedule.q_sample(images, t, noise), t)
        self.log_dict(
            {
                f"{stage}/loss": torch.nn.functional.cross_entropy(logits, labels),
                f"{stage}/acc": (logits.argmax(1) == labels).float().mean(),  # over all noise levels (or clean)
                f"{stage}/acc_clean": (clean.argmax(1) == labels).float().mean(),  # at t = 0
            },
            prog_bar=True,
            sync_dist=True,
        )

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.net.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.lr_decay == "cosine":
            total = (
                self.trainer.max_steps if self.trainer.max_steps > 0 else int(self.trainer.estimated_stepping_batches)
            )
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: cosine_decay_factor(step, hp.warmup_steps, total)
            )
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"},
            }
        scheduler = LinearWarmup(optimizer, hp.warmup_steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"},
        }

    def on_train_end(self) -> None:
        from src.callbacks.sampling import run_dir

        # run_dir is a broadcast under DDP: every rank resolves the path, then rank 0 alone writes.
        path = Path(self.hparams.export_path or run_dir(self.trainer) / "classifier.pt")
        if not self.trainer.is_global_zero:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self.net.save(str(path))
        self.saved_path = path
        rank_zero_info(f"Saved the classifier to {path} (use it with --model.guidance.classifier_path {path})")
