"""Training latent diffusion's first stage: an autoencoder with a reconstruction loss, a KL or VQ regulariser and an
optional patch discriminator (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models",
section 3.1 and appendix G; the loss is their `LPIPSWithDiscriminator` / `VQLPIPSWithDiscriminator`, after Esser et
al. 2021, "Taming Transformers", eq. 4-7).

    python -m src.autoencoder_main fit --config configs/fashion_mnist_autoencoder.yaml
    python -m src.autoencoder_main test --config configs/fashion_mnist_autoencoder.yaml --ckpt_path last

The network is `src.models.autoencoder.AutoencoderKL` or `VQModel`. The generator's loss:

- KL-reg: the negative log-likelihood of a Laplace-like output distribution with one learned log-variance,
  sum(|x - x_rec| / exp(logvar) + logvar) over pixels (plus `perceptual_weight` * LPIPS inside the |.| term where
  a user has VGG16 weights: `lpips_vgg_path`), mean over the batch, plus `kl_weight` * KL(q(z|x) || N(0, I)).
- VQ-reg: mean(|x - x_rec|) (+ LPIPS) plus `codebook_weight` * the quantiser's codebook and commitment loss.
- with the discriminator, from `disc_start` on: + lambda * `disc_weight` * (-mean D(x_rec)), lambda the adaptive
  weight ||grad nll|| / (||grad g_loss|| + 1e-4) at the decoder's last layer (Taming Transformers eq. 7), clamped to
  [0, 1e4]; the discriminator (a PatchGAN, `PatchDiscriminator`) trains by the hinge loss on the same batch.

The two networks have their own Adam optimisers (LDM's betas (0.5, 0.9)), so the module optimises manually. The
autoencoder always runs in fp32 (autocast off), also in a run trained with `--trainer.precision bf16-mixed`: the
reconstruction's fine detail is what it is for. `validate` and `test` log PSNR, the L1 error and, with
`fd_extractor` (a classifier file or "standin"), the Fréchet distance between the features of the images and
those of their reconstructions; a grid of images over their reconstructions goes to `<run dir>/reconstructions/`.
At the end of fit the autoencoder is saved as `<run dir>/autoencoder.pt` (`export_path`), the file latent
diffusion's first stage loads.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics.image import PeakSignalNoiseRatio

from src.errors import ConfigError, first_line
from src.images import make_grid, save_png, to_uint8
from src.metrics.features import build_feature_extractor
from src.metrics.fid import FeatureStatistics, frechet_distance
from src.models.autoencoder import AutoencoderKL, VQModel, load_autoencoder, save_autoencoder

ADAPTIVE_WEIGHT_MAX = 1e4  # LDM's clamp of the adaptive weight


class PatchDiscriminator(nn.Module):
    """The PatchGAN discriminator of pix2pix (Isola et al. 2017, `NLayerDiscriminator`), as LDM and Taming use it:
    a 4x4 stride-2 conv with LeakyReLU(0.2), `num_layers - 1` more with BatchNorm (channels doubling up to 8x),
    a stride-1 one, then a stride-1 conv to one logit per patch. Weights N(0, 0.02), BatchNorm scales N(1, 0.02).
    Each output pixel judges one receptive field of the input (70 x 70 pixels at `num_layers` 3); on 28-pixel
    images `num_layers` 2 leaves a 5 x 5 map of patches."""

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, num_layers + 1):
            previous, mult = mult, min(2**n, 8)
            stride = 2 if n < num_layers else 1
            layers += [
                nn.Conv2d(channels * previous, channels * mult, 4, stride, 1, bias=False),
                nn.BatchNorm2d(channels * mult),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


def hinge_discriminator_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """1/2 (E[relu(1 - D(x))] + E[relu(1 + D(x_rec))]) (Lim & Ye 2017, Geometric GAN; LDM's `hinge_d_loss`)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def laplace_nll(reconstruction_error: Tensor, logvar: Tensor) -> Tensor:
    """LDM's KL-reg reconstruction term: sum over pixels of error / exp(logvar) + logvar, mean over the batch. With
    the error |x - x_rec| this is the negative log-likelihood of a Laplace decoder up to constants, whose scale the
    one learned `logvar` sets (so the weight of the reconstruction against the KL term adapts while training)."""
    per_pixel = reconstruction_error / torch.exp(logvar) + logvar
    return per_pixel.sum() / reconstruction_error.shape[0]


def adaptive_weight(nll: Tensor, generator_loss: Tensor, last_layer: Tensor) -> Tensor:
    """Taming Transformers eq. 7: ||grad_L nll|| / (||grad_L g_loss|| + 1e-4) at the decoder's last layer L,
    clamped to [0, 1e4] and detached, so that the adversarial gradient arriving there is as large as the
    reconstruction's (times `disc_weight`)."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    generator_grad = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.norm() / (generator_grad.norm() + 1e-4)
    return weight.clamp(0.0, ADAPTIVE_WEIGHT_MAX).detach()


class LPIPS(nn.Module):
    """LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"), VGG16
    version, as LDM's autoencoders train with it: torchmetrics' network, whose linear layers ship with torchmetrics,
    on a VGG16 backbone read from `vgg_path`, a torchvision `vgg16` state dict (ImageNet weights cannot be downloaded
    offline; torchvision's file is vgg16-397923af.pth). Gray images are repeated to three channels. Frozen."""

    def __init__(self, vgg_path: str) -> None:
        super().__init__()
        from torchmetrics.functional.image.lpips import _LPIPS

        path = Path(vgg_path)
        if not path.is_file():
            raise ConfigError(
                f"--model.lpips_vgg_path {vgg_path}: no such file; LPIPS needs torchvision's VGG16 ImageNet weights "
                "(vgg16-397923af.pth), or set --model.perceptual_weight 0 (the offline default: L1 only)"
            )
        self.net = _LPIPS(pretrained=True, net="vgg", pnet_rand=True)  # the lin layers from torchmetrics' file
        state = torch.load(path, map_location="cpu", weights_only=True)
        backbone = {}
        for name, _ in self.net.net.named_parameters():  # slice{k}.{index}.{weight|bias} <- features.{index}.*
            _, index, kind = name.split(".")
            key = f"features.{index}.{kind}"
            if key not in state:
                raise ConfigError(f"--model.lpips_vgg_path {vgg_path}: no {key}; is it a torchvision vgg16 state dict?")
            backbone[name] = state[key]
        self.net.net.load_state_dict(backbone)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # always eval (dropout off), as the reference's frozen LPIPS

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """(B, 1, 1, 1) distances between images in [-1, 1]."""
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        return self.net(x, y, normalize=False)


class AutoencoderModule(L.LightningModule):
    """Latent diffusion's first stage, trained by reconstruction, its regulariser and an optional discriminator.

    Args:
        net: an `AutoencoderKL` or a `VQModel` (src/models/autoencoder.py).
        image_size: the training images' size (the autoencoder is fully convolutional; the data module converts a
            folder's images to it).
        lr: Adam's learning rate for both networks (LDM: 4.5e-6 per image of the total batch, 4.5e-4 at 100).
        betas: Adam's betas (LDM's GAN setting (0.5, 0.9)).
        kl_weight: weight of KL(q(z|x) || N(0, I)) (LDM's KL-f models: 1e-6); AutoencoderKL only.
        logvar_init: initial value of the learned output log-variance (LDM: 0); AutoencoderKL only.
        codebook_weight: weight of the codebook and commitment loss (LDM: 1); VQModel only.
        sample_posterior: decode a posterior sample (True, training as a VAE) or its mean.
        disc_start: optimizer step from which the discriminator trains and the generator sees its loss; null: no
            discriminator at all.
        disc_weight: scale of the adaptive adversarial weight (LDM: 0.5 for KL-f, 0.75 for VQ-f4).
        disc_layers: the PatchGAN's stride-2 layers (3 for 256-pixel images, 2 for 28-pixel ones).
        disc_channels: its first layer's channels.
        perceptual_weight: LPIPS weight inside the reconstruction term (LDM: 1); 0 without `lpips_vgg_path`.
        lpips_vgg_path: torchvision VGG16 weights for LPIPS (offline: none, so the reconstruction term is L1 alone).
        fd_extractor: features for the reconstruction Fréchet distance in validate/test (a classifier file, e.g. the
            fd_classifier's, or "standin"; null: none).
        grid_images: images in the validation grid (the first batch's, over their reconstructions); 0: no grid.
        export_path: where fit saves the autoencoder (default `<run dir>/autoencoder.pt`).
        init_from: an autoencoder file (`autoencoder.pt`, as fit writes it) whose weights a new fit starts from, of the
            same architecture as `net`: fine-tuning, e.g. LDM's schedule of reconstruction first and the
            discriminator once it has converged, as a second run with `--model.disc_start 0`. The discriminator and
            the output log-variance start afresh. A resumed run (`--ckpt_path`) takes the checkpoint's weights.
    """

    image_size_option = "model.image_size"  # what --data.image_size follows (src/main.py links it)

    def __init__(
        self,
        net: nn.Module,
        image_size: int = 28,
        lr: float = 4.5e-4,
        betas: tuple[float, float] = (0.5, 0.9),
        kl_weight: float = 1e-6,
        logvar_init: float = 0.0,
        codebook_weight: float = 1.0,
        sample_posterior: bool = True,
        disc_start: int | None = None,
        disc_weight: float = 0.5,
        disc_layers: int = 3,
        disc_channels: int = 64,
        perceptual_weight: float = 0.0,
        lpips_vgg_path: str | None = None,
        fd_extractor: str | None = None,
        grid_images: int = 32,
        export_path: str | None = None,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(net, (AutoencoderKL, VQModel)):
            raise ConfigError(f"--model.net must be an AutoencoderKL or a VQModel (src.models.autoencoder), got "
                              f"{type(net).__name__}")  # fmt: skip
        if perceptual_weight > 0 and not lpips_vgg_path:
            raise ConfigError(
                f"--model.perceptual_weight {perceptual_weight} needs LPIPS's VGG16 weights: pass "
                "--model.lpips_vgg_path FILE (torchvision's vgg16-397923af.pth), or --model.perceptual_weight 0"
            )
        factor = net.downsampling_factor
        if image_size % factor:
            raise ConfigError(
                f"--model.image_size {image_size} is not divisible by the autoencoder's downsampling factor {factor} "
                f"(2^(levels - 1)): its decoder would not give the images' size back; use --image_size "
                f"{max(factor, image_size - image_size % factor)} or fewer block_out_channels"
            )
        if disc_start is not None and disc_start < 0:
            raise ConfigError(f"--model.disc_start must be >= 0 (or null: no discriminator), got {disc_start}")
        self.save_hyperparameters(ignore=["net"])
        self.automatic_optimization = False  # two optimizers (autoencoder, discriminator)
        self.net = net
        self.is_vq = isinstance(net, VQModel)
        # The learned log-variance of the KL model's output distribution (LDM's `logvar`); VQ models have none.
        self.logvar = None if self.is_vq else nn.Parameter(torch.tensor(float(logvar_init)))
        channels = net.config["out_channels"]
        self.discriminator = (
            PatchDiscriminator(channels, disc_channels, disc_layers) if disc_start is not None else None
        )
        # Frozen helpers stay outside the module tree (`_frozen`), so that checkpoints hold none of their weights and a
        # run may change them on resume; `_move_frozen` puts them on the run's device.
        self._frozen: dict[str, nn.Module] = {}
        if perceptual_weight > 0:
            self._frozen["lpips"] = LPIPS(lpips_vgg_path)
        if fd_extractor:
            self._frozen["extractor"] = build_feature_extractor(fd_extractor)
        self.psnr = nn.ModuleDict({stage: PeakSignalNoiseRatio(data_range=2.0) for stage in ("val", "test")})
        if self.extractor is not None:
            dim = self.extractor.pool_dim
            self.fd_stats = nn.ModuleDict({kind: FeatureStatistics(dim) for kind in ("real", "reconstructed")})
        if self.is_vq:
            self.register_buffer("code_counts", torch.zeros(net.config["num_embeddings"]), persistent=False)
        self.saved_path: Path | None = None

    @property
    def lpips(self) -> LPIPS | None:
        return self._frozen.get("lpips")

    @property
    def extractor(self) -> nn.Module | None:
        return self._frozen.get("extractor")

    def _move_frozen(self) -> None:
        for name, module in self._frozen.items():
            self._frozen[name] = module.to(self.device)

    # ------------------------------------------------------------------------------------------ losses
    def reconstruct(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(reconstruction, regulariser term (KL per sample, or the VQ loss), VQ indices or None), in fp32."""
        with torch.autocast(images.device.type, enabled=False):
            images = images.float()
            if self.is_vq:
                reconstruction, quantized = self.net(images)
                return reconstruction, quantized.loss, quantized.indices
            posterior = self.net.encode(images)
            z = posterior.sample() if self.hparams.sample_posterior and self.training else posterior.mode()
            return self.net.decode(z), posterior.kl(), None

    def reconstruction_error(self, images: Tensor, reconstruction: Tensor) -> Tensor:
        """|x - x_rec| per pixel, plus `perceptual_weight` * LPIPS broadcast over the pixels (LDM's rec_loss)."""
        error = (images - reconstruction).abs()
        if self.lpips is not None:
            error = error + self.hparams.perceptual_weight * self.lpips(images, reconstruction)
        return error

    def generator_nll(self, images: Tensor, reconstruction: Tensor, regulariser: Tensor) -> tuple[Tensor, Tensor]:
        """(nll, the generator loss without the adversarial term)."""
        error = self.reconstruction_error(images, reconstruction)
        if self.is_vq:  # VQLPIPSWithDiscriminator: a plain mean, no learned variance
            nll = error.mean()
            return nll, nll + self.hparams.codebook_weight * regulariser
        nll = laplace_nll(error, self.logvar)
        return nll, nll + self.hparams.kl_weight * regulariser.mean()

    def discriminator_active(self) -> bool:
        start = self.hparams.disc_start
        return self.discriminator is not None and self.global_step >= start

    # ------------------------------------------------------------------------------------------ training
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images = batch[0]
        optimizers = self.optimizers()
        ae_optimizer, disc_optimizer = optimizers if isinstance(optimizers, list) else (optimizers, None)
        active = self.discriminator_active()

        reconstruction, regulariser, indices = self.reconstruct(images)
        nll, loss = self.generator_nll(images.float(), reconstruction, regulariser)
        logs = {"train/nll": nll.detach(), "train/rec_l1": (images - reconstruction).abs().mean().detach()}
        if self.is_vq:
            logs["train/vq_loss"] = regulariser.detach()
            self.code_counts += torch.bincount(indices.flatten(), minlength=self.code_counts.numel())
        else:
            logs |= {"train/kl": regulariser.mean().detach(), "train/logvar": self.logvar.detach()}
        if active:
            # The generator's adversarial term; the discriminator is not stepped on this loss (its optimizer zeroes
            # what reaches it before its own step).
            generator_loss = -self.discriminator(reconstruction).mean()
            weight = adaptive_weight(nll, generator_loss, self.net.decoder.conv_out.weight)
            loss = loss + weight * self.hparams.disc_weight * generator_loss
            logs |= {"train/g_loss": generator_loss.detach(), "train/d_weight": weight}
        self.last_loss = loss.detach()  # the non-finite guard's report (src/callbacks/faults.py)
        ae_optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        ae_optimizer.step()

        if active:
            disc_loss = hinge_discriminator_loss(
                self.discriminator(images.float()), self.discriminator(reconstruction.detach())
            )
            disc_optimizer.zero_grad(set_to_none=True)
            self.manual_backward(disc_loss)
            grads = [p.grad for p in self.discriminator.parameters() if p.grad is not None]
            if torch.isfinite(torch.nn.utils.get_total_norm(grads)):
                # The raw optimizer: Lightning counts every LightningOptimizer.step as a global step, which would
                # make --trainer.max_steps and disc_start count two per batch once the discriminator trains.
                disc_optimizer.optimizer.step()
            logs["train/d_loss"] = disc_loss.detach()
        self.log("train/loss", loss.detach(), prog_bar=True)
        self.log_dict(logs)
        return loss.detach()

    def on_train_epoch_end(self) -> None:
        """VQ: the share of codes used and the codebook perplexity exp(H) over the epoch, all processes together."""
        if not self.is_vq:
            return
        counts = self.trainer.strategy.reduce(self.code_counts.clone(), reduce_op="sum")
        probabilities = counts / counts.sum().clamp_min(1)
        entropy = -(probabilities * torch.log(probabilities.clamp_min(1e-12))).sum()
        self.log_dict({"train/codes_used": (counts > 0).float().mean(), "train/code_perplexity": entropy.exp()})
        self.code_counts.zero_()

    # ------------------------------------------------------------------------------------------ evaluation
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    def _evaluate(self, batch: tuple[Tensor, Tensor], batch_idx: int, stage: str) -> None:
        images = batch[0].float()
        reconstruction, regulariser, _ = self.reconstruct(images)
        reconstruction = reconstruction.clamp(-1, 1)
        self.psnr[stage].update(reconstruction, images)
        logs = {f"{stage}/rec_l1": (images - reconstruction).abs().mean()}
        if not self.is_vq:
            logs[f"{stage}/kl"] = regulariser.mean()
        self.log_dict(logs, sync_dist=True)
        if self.extractor is not None:
            self.fd_stats["real"].update(self.extractor(to_uint8(images))["pool"])
            self.fd_stats["reconstructed"].update(self.extractor(to_uint8(reconstruction))["pool"])
        if batch_idx == 0 and self.hparams.grid_images > 0 and stage == "val":
            self._save_grid(images, reconstruction)

    def _on_evaluation_epoch_end(self, stage: str) -> None:
        self.log(f"{stage}/psnr", self.psnr[stage].compute(), prog_bar=True)
        self.psnr[stage].reset()
        if self.extractor is not None:
            real = self.fd_stats["real"].compute()
            reconstructed = self.fd_stats["reconstructed"].compute()
            distance = frechet_distance(*reconstructed, *real)
            self.log(f"{stage}/fd{self.extractor.metric_suffix}", float(distance))
            for statistics in self.fd_stats.values():
                statistics.reset()

    def on_validation_epoch_end(self) -> None:
        self._on_evaluation_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._on_evaluation_epoch_end("test")

    def _save_grid(self, images: Tensor, reconstruction: Tensor) -> None:
        """Rows of images over rows of their reconstructions, `<run dir>/reconstructions/step_<N>.png`, logged."""
        from src.callbacks.sampling import _log_image, run_dir

        folder = run_dir(self.trainer) / "reconstructions"  # every rank: a broadcast under DDP
        if not self.trainer.is_global_zero or self.trainer.sanity_checking:
            return
        count = min(self.hparams.grid_images, images.shape[0])
        columns = min(count, 8)
        count -= count % columns
        pairs = []
        for row in range(0, count, columns):
            pairs += [images[row : row + columns], reconstruction[row : row + columns]]
        grid = make_grid(to_uint8(torch.cat(pairs)), nrow=columns)
        save_png(grid, folder / f"step_{self.global_step:07d}.png")
        for logger in self.trainer.loggers:
            _log_image(logger, "reconstructions", grid, self.global_step)

    # ------------------------------------------------------------------------------------------ wiring
    def configure_optimizers(self):
        hp = self.hparams
        parameters = list(self.net.parameters()) + ([self.logvar] if self.logvar is not None else [])
        optimizers = [torch.optim.Adam(parameters, lr=hp.lr, betas=tuple(hp.betas))]
        if self.discriminator is not None:
            optimizers.append(torch.optim.Adam(self.discriminator.parameters(), lr=hp.lr, betas=tuple(hp.betas)))
        return optimizers

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.init_from:
            # Before Lightning restores a --ckpt_path, which then replaces these weights (resume wins).
            self._load_initial_weights(self.hparams.init_from)
        # Under DDP every backward must account for every parameter: the autoencoder's backward leaves the
        # discriminator unused before disc_start and the discriminator's leaves the autoencoder unused, so DDP must
        # look for unused parameters (Lightning's "ddp_find_unused_parameters_true"). The strategy wraps the module
        # after this hook, so setting its option here covers `--trainer.strategy ddp` and "auto" on several devices.
        ddp_kwargs = getattr(self.trainer.strategy, "_ddp_kwargs", None)
        if isinstance(ddp_kwargs, dict):
            ddp_kwargs["find_unused_parameters"] = True

    def _load_initial_weights(self, path: str) -> None:
        """The net's weights from the autoencoder file `path`; a ConfigError in one line unless it holds the same
        architecture."""
        flag = f"--model.init_from {path}"
        try:
            source = load_autoencoder(path)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"{flag}: {first_line(e)}") from e
        if type(source) is not type(self.net) or dict(source.config) != dict(self.net.config):
            differing = sorted(
                k for k in set(source.config) | set(self.net.config)
                if source.config.get(k) != self.net.config.get(k)
            )  # fmt: skip
            raise ConfigError(
                f"{flag} holds a {type(source).__name__} that differs from --model.net in "
                f"{', '.join(differing) or 'its class'}: give the same --model.net.init_args, or another file"
            )
        self.net.load_state_dict(source.state_dict())
        rank_zero_info(f"Started the autoencoder from {path}")

    def on_validation_start(self) -> None:
        self._move_frozen()

    on_test_start = on_validation_start

    def on_fit_start(self) -> None:
        self._move_frozen()
        if self.discriminator is not None and self.trainer.precision == "16-mixed":
            raise ConfigError("the autoencoder's discriminator steps outside fp16's loss scaling: train with "
                              "--trainer.precision 32-true or bf16-mixed")  # fmt: skip

    def on_train_end(self) -> None:
        from src.callbacks.sampling import run_dir

        path = Path(self.hparams.export_path or run_dir(self.trainer) / "autoencoder.pt")  # every rank: a broadcast
        if not self.trainer.is_global_zero:
            return
        save_autoencoder(self.net, path)
        self.saved_path = path
        rank_zero_info(f"Saved the autoencoder to {path}")
