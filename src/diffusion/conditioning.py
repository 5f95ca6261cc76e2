"""Spatially aligned conditions for concatenation conditioning (`UNet(conditioning="concat")`): functions of a clean
image that the network sees beside x_t, so that it learns p(x | condition(x)).

Latent diffusion (Rombach et al. 2022, section 3.3 and 4.4) conditions super-resolution and inpainting models by
concatenating the condition to the network's input; SR3 (Saharia et al. 2021, section 2.4) upsamples the
low-resolution image to the target size by bicubic interpolation first. A condition here maps clean images in
[-1, 1], (B, C, H, W), to the network's y at the size it diffuses (the image's, or a first stage's latent size):
training makes y from each batch's images, sampling from the images named to condition on (`DiffusionModel`'s
`condition_images`). Pure torch; a condition of one's own is any class with the same two methods, named by its
dotted path in `--model.condition`.
"""

from __future__ import annotations

import importlib

import torch.nn.functional as F
from torch import Tensor


class LowResolution:
    """Super-resolution's condition: the image reduced by `factor` (the mean of each factor x factor block, a box
    filter, as `F.interpolate(mode="area")` and a camera's pixel do), then brought back to the network's size by
    bicubic interpolation (SR3) and clipped to [-1, 1] (bicubic overshoots at edges).

    Args:
        factor: the reduction, e.g. 4: 28 x 28 Fashion-MNIST from 7 x 7; the image size must be divisible by it.
    """

    name = "low_resolution"

    def __init__(self, factor: int = 4) -> None:
        if int(factor) != factor or factor < 2:
            raise ValueError(f"LowResolution's factor must be an integer >= 2, got {factor}")
        self.factor = int(factor)
        self.config = {"factor": self.factor}

    def reduce(self, images: Tensor) -> Tensor:
        """The low-resolution images, (B, C, H / factor, W / factor): each pixel the mean of a factor x factor block."""
        height, width = images.shape[-2:]
        if height % self.factor or width % self.factor:
            raise ValueError(f"LowResolution: images of {height} x {width} are not divisible by factor {self.factor}")
        return F.avg_pool2d(images, self.factor)

    def __call__(self, images: Tensor, size: tuple[int, int]) -> Tensor:
        """y for the network: the low-resolution images upsampled (bicubic) to `size`, in [-1, 1]."""
        low = self.reduce(images)
        return F.interpolate(low, size=tuple(size), mode="bicubic", align_corners=False).clamp(-1.0, 1.0)

    def visible(self, images: Tensor) -> Tensor:
        """What a person should see of the condition at the images' size: the low-resolution pixels, enlarged
        (nearest), so a grid shows what the model was given and not an interpolation of it."""
        return F.interpolate(self.reduce(images), size=tuple(images.shape[-2:]), mode="nearest")


CONDITIONS = {LowResolution.name: LowResolution}


def build_condition(spec: dict | None):
    """A condition from its config, {"name": <a built-in name or a class's dotted path>, <its arguments>}, e.g.
    {"name": "low_resolution", "factor": 4}; None: no condition. Bad specs are one-line ValueErrors."""
    if spec is None:
        return None
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(
            f"--model.condition is {{name: ..., <arguments>}} (e.g. name: low_resolution, factor: 4), got {spec!r}"
        )
    options = {k: v for k, v in spec.items() if k != "name"}
    name = spec["name"]
    if name in CONDITIONS:
        cls = CONDITIONS[name]
    elif isinstance(name, str) and "." in name:
        module, _, attribute = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"--model.condition name {name!r} cannot be imported: {e}") from None
    else:
        raise ValueError(
            f"--model.condition name {name!r} is unknown; choose one of {', '.join(CONDITIONS)} or a class's dotted path"
        )
    try:
        return cls(**options)
    except TypeError as e:
        raise ValueError(f"--model.condition {name!r}: {e}") from None


def condition_spec(condition) -> dict | None:
    """The config that rebuilds `condition` (`build_condition`'s input); None for None."""
    if condition is None:
        return None
    name = getattr(condition, "name", None)
    if CONDITIONS.get(name) is not type(condition):
        name = f"{type(condition).__module__}.{type(condition).__qualname__}"
    return {"name": name, **dict(getattr(condition, "config", {}))}
