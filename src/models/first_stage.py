"""The first stage: an encoder/decoder the diffusion runs inside (latent diffusion's E and D, Rombach et al. 2022).

The diffusion model is trained on z = encode(x) and samples z, which `decode` turns back into images (section 3 of
the paper: "the diffusion model is trained on the latent space ... only D is needed at sampling"). The first stage
is frozen: trained beforehand (or fixed), kept out of the optimizer, never averaged, always in eval mode.

`FirstStage` is the interface, and is itself the identity (pixel space): the model with it trains and samples
bit-identically to the model without one. A first stage says how it maps shapes both ways (`latent_shape`,
`image_shape`), so that the command line can size the data from the network (or the network from the data), and
whether its latents are bounded like images (`latent_range`: x_0-hat clipping applies only then). Like the
networks, it records its constructor arguments in `config`, which checkpoints and exports keep to rebuild it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn


class FirstStage(nn.Module):
    """The identity first stage; subclass it with `encode`, `decode` and the two shape maps."""

    # The interval the latents of images in [-1, 1] lie in, where x_0-hat may be clipped
    # (--model.sampling.clip_denoised): (-1, 1) for pixels and for any map that keeps pixel values, None where latents
    # are unbounded (a VAE's).
    latent_range: tuple[float, float] | None = (-1.0, 1.0)

    def __init__(self) -> None:
        super().__init__()
        self.config: dict = {}

    def encode(self, images: Tensor) -> Tensor:
        """Latents of images in [-1, 1], (B, C, H, W) -> (B, *latent_shape)."""
        return images

    def decode(self, latents: Tensor) -> Tensor:
        """Images in [-1, 1] of latents (the inverse of `encode`, or its best approximation)."""
        return latents

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, int, int]:
        """(C, H, W) of the latent of an image of shape (C, H, W)."""
        return tuple(image_shape)

    def image_shape(self, latent_shape: Sequence[int]) -> tuple[int, int, int]:
        """(C, H, W) of the image a latent of this shape decodes to."""
        return tuple(latent_shape)


NORMALIZATIONS = ("std", "channel", "none")


def tensors_digest(tensors: Iterable[tuple[str, Tensor]]) -> str:
    """sha256 (16 hex digits) of named tensors' names, dtypes, shapes and bytes: what keys the latent cache."""
    hasher = hashlib.sha256()
    for name, tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        hasher.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()[:16]


class LatentFirstStage(FirstStage):
    """Latent diffusion's first stage (Rombach et al. 2022): a trained `AutoencoderKL` or `VQModel`, frozen, in fp32.

    `encode` draws z from the posterior q(z|x) (its mean with `sample_posterior` false; a VQ model's continuous
    latent), then normalises it; `decode` undoes the normalisation and decodes (a VQ model quantises first). The
    normalisation is measured on the first training batch (all processes' images together; `calibrate`, which
    DiffusionModule calls) and stored in buffers, so checkpoints and exports keep it and a resumed run never
    measures again:

    - "std": z / std(z), one number over every latent element: LDM's `scale_by_std` (section 4.3.2, appendix D.1:
      "we rescale the latents to unit standard deviation"; Stable Diffusion's 0.18215 is this factor for its VAE).
    - "channel": (z - mean_c) / std_c per latent channel, as EDM2 (Karras et al. 2024) normalises SD's latents.
    - "none": z itself.

    Args:
        path: an autoencoder file (`python -m src.autoencoder_main fit` writes `<run dir>/autoencoder.pt`). Its
            weights become this module's, so checkpoints and exports carry them and `config` records the
            architecture instead of the path: a checkpoint rebuilds the stage without the file.
        normalization: "std", "channel" or "none".
        sample_posterior: train on posterior samples z = mean + std * eps (LDM), or on the posterior mean.
        autoencoder: {"class", "config"} of the architecture (how checkpoints rebuild the stage; set from `path`);
            given, `path` is not read.
    """

    latent_range = None  # a VAE's latents are unbounded: no x_0-hat clipping

    def __init__(
        self,
        path: str | None = None,
        normalization: str = "std",
        sample_posterior: bool = True,
        autoencoder: dict | None = None,
    ) -> None:
        super().__init__()
        from src.errors import ConfigError
        from src.models.autoencoder import AUTOENCODERS, load_autoencoder

        if normalization not in NORMALIZATIONS:
            raise ConfigError(f"--model.first_stage.init_args.normalization {normalization!r} is unknown; choose one "
                              f"of {', '.join(NORMALIZATIONS)}")  # fmt: skip
        if path is None and autoencoder is None:
            raise ConfigError("--model.first_stage.init_args.path: give the autoencoder file (autoencoder.pt, from "
                              "python -m src.autoencoder_main fit)")  # fmt: skip
        if autoencoder is not None:
            # A checkpoint's recorded architecture (`--ckpt_path`, DiffusionModel.load): the weights and the measured
            # normalisation come from its state dict, so `path` is not read again.
            model = AUTOENCODERS[autoencoder["class"]](**autoencoder["config"])
        else:
            model = load_autoencoder(path)
            autoencoder = {"class": type(model).__name__, "config": dict(model.config)}
        self.autoencoder = model.eval().requires_grad_(False)
        self.is_vq = autoencoder["class"] == "VQModel"
        self.normalization = normalization
        self.sample_posterior = sample_posterior
        self.config = {"normalization": normalization, "sample_posterior": sample_posterior, "autoencoder": autoencoder}
        channels = autoencoder["config"]["latent_channels"]
        # NaN until measured; float64 so that the measurement is stored exactly as computed.
        self.register_buffer("latent_mean", torch.full((channels,), torch.nan, dtype=torch.float64))
        self.register_buffer("latent_std", torch.full((channels,), torch.nan, dtype=torch.float64))
        if normalization == "none":
            self.latent_mean.zero_()
            self.latent_std.fill_(1.0)

    @property
    def calibrated(self) -> bool:
        return not bool(torch.isnan(self.latent_std).any())

    def encode_moments(self, images: Tensor) -> Tensor:
        """(B, 2, C, h, w): the posterior q(z|x)'s mean and std for images in [-1, 1], in fp32; what the latent
        cache (src/data/latent_cache.py) stores. A VQ model's encoding is deterministic: its std is 0."""
        with torch.autocast(images.device.type, enabled=False):
            images = images.float()
            if self.is_vq:
                z = self.autoencoder.encode(images)
                return torch.stack([z, torch.zeros_like(z)], dim=1)
            posterior = self.autoencoder.encode(images)
            return torch.stack([posterior.mean, posterior.std], dim=1)

    def latents_from_moments(self, moments: Tensor) -> Tensor:
        """z, before normalisation, from `encode_moments`' output: mean + std * eps with eps ~ N(0, I) drawn from the
        global RNG (DiagonalGaussian.sample's draw, so cached and encoded latents of one seed agree), or the mean."""
        moments = moments.float()
        mean, std = moments[:, 0], moments[:, 1]
        if self.is_vq or not self.sample_posterior:
            return mean
        return mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)

    def raw_latents(self, images: Tensor) -> Tensor:
        """z of images in [-1, 1], before normalisation, in fp32."""
        return self.latents_from_moments(self.encode_moments(images))

    def calibrate(self, images: Tensor, all_reduce_sum: Callable[[Tensor], Tensor] = lambda x: x) -> Tensor:
        """Measure the normalisation on `images` (and, through `all_reduce_sum`, every process's); returns the
        per-channel std. See `calibrate_latents`."""
        return self.calibrate_latents(self.raw_latents(images), all_reduce_sum)

    def calibrate_latents(self, z: Tensor, all_reduce_sum: Callable[[Tensor], Tensor] = lambda x: x) -> Tensor:
        """Measure the normalisation on raw latents `z` (and, through `all_reduce_sum`, every process's); returns
        the per-channel std. The mean and std of all elements ("std") or of each channel ("channel"), unbiased."""
        z = z.double()
        per_channel = self.normalization == "channel"
        dims = (0, 2, 3) if per_channel else (0, 1, 2, 3)
        count = torch.full((), z.numel() / (z.shape[1] if per_channel else 1), dtype=torch.float64, device=z.device)
        moments = torch.stack(torch.broadcast_tensors(count, z.sum(dims), z.pow(2).sum(dims)))
        count, total, squares = all_reduce_sum(moments)
        mean = total / count
        std = ((squares - count * mean**2) / (count - 1)).clamp_min(0).sqrt()
        # "std" divides by one std about the mean and, as LDM's scale_by_std, does not subtract the mean.
        self.latent_mean.copy_(mean.expand_as(self.latent_mean) if per_channel else torch.zeros_like(self.latent_mean))
        self.latent_std.copy_(std.expand_as(self.latent_std))
        return self.latent_std.clone()

    def _moments(self, z: Tensor) -> tuple[Tensor, Tensor]:
        if not self.calibrated:  # before the first training batch (a sanity check, an untrained model): identity
            return torch.zeros((), device=z.device), torch.ones((), device=z.device)
        shape = (1, -1, 1, 1)
        return self.latent_mean.view(shape).to(z.dtype), self.latent_std.view(shape).to(z.dtype)

    def autoencoder_digest(self) -> str:
        """What identifies the autoencoder's weights (and so its `encode_moments`): the latent cache's key."""
        return tensors_digest(self.autoencoder.state_dict().items())

    def normalize(self, z: Tensor) -> Tensor:
        """Raw latents -> the diffusion's latents: (z - mean) / std with the measured statistics."""
        mean, std = self._moments(z)
        return (z - mean) / std

    def encode(self, images: Tensor) -> Tensor:
        return self.normalize(self.raw_latents(images))

    def decode(self, latents: Tensor) -> Tensor:
        with torch.autocast(latents.device.type, enabled=False):
            latents = latents.float()
            mean, std = self._moments(latents)
            return self.autoencoder.decode(latents * std + mean)

    @property
    def downsampling_factor(self) -> int:
        return self.autoencoder.downsampling_factor

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, int, int]:
        _, height, width = image_shape
        f = self.downsampling_factor
        return (self.autoencoder.config["latent_channels"], height // f, width // f)

    def image_shape(self, latent_shape: Sequence[int]) -> tuple[int, int, int]:
        _, height, width = latent_shape
        f = self.downsampling_factor
        return (self.autoencoder.config["out_channels"], height * f, width * f)

    def train(self, mode: bool = True) -> LatentFirstStage:
        return super().train(False)  # frozen: always in eval mode
