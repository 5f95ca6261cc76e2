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

from collections.abc import Sequence

from torch import Tensor, nn


class FirstStage(nn.Module):
    """The identity first stage; subclass it with `encode`, `decode` and the two shape maps."""

    # The interval the latents of images in [-1, 1] lie in, where x_0-hat may be clipped (--model.clip_denoised):
    # (-1, 1) for pixels and for any map that keeps pixel values, None where latents are unbounded (a VAE's).
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
