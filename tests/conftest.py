"""Fixtures shared by the test files."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING

import pytest
import torch

from src.optim import AdamW, LinearWarmup

if TYPE_CHECKING:
    from src.models.unet import UNet
    from src.module import DiffusionModule


@pytest.fixture(autouse=True, scope="session")
def data_cache_in_a_temporary_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The runs of the tests (and their subprocesses) cache folders and latents in a temporary folder of the
    session, never in the user's ~/.cache/ddim-lightning or $DDIM_DATA_CACHE."""
    before = os.environ.get("DDIM_DATA_CACHE")
    os.environ["DDIM_DATA_CACHE"] = str(tmp_path_factory.mktemp("data_cache"))
    yield
    if before is None:
        os.environ.pop("DDIM_DATA_CACHE")
    else:
        os.environ["DDIM_DATA_CACHE"] = before


@pytest.fixture
def one_thread():
    """Run a test on one torch thread. Elementwise ops on tensors of more than 32k elements go multi-threaded; on
    a busy 2-core machine the thread pool's spin-waits made a 1000-step sampler ~50x slower (measured 140 s instead
    of 1.8 s). One thread is fast. Use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The tiny network most tests train or sample with: one channel, 8x8, two levels of 8 and 16 channels, one residual
# block each, no attention and no dropout: every code path of the UNet and the module, in well under a second.
TINY_UNET = dict(in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                 dropout=0.0, image_size=8, norm_groups=4, mid_attention=False)  # fmt: skip
# The DiffusionModule settings the tiny tests share (each test adds what it is about: warm-up, EMA, FID, ...).
TINY_MODULE = dict(timesteps=50, optimizer=partial(AdamW, lr=1e-3), ema_decay=0.9, sampling_steps=5)


# The factories hold no state, so one per session serves fixtures of every scope.
@pytest.fixture(scope="session")
def tiny_unet() -> Callable[..., UNet]:
    """A factory of tiny UNets: `tiny_unet(**overrides)` is `UNet(**TINY_UNET)` with any argument overridden
    (`image_size=28`, `dropout=0.1`, `num_classes=4`, `attn_resolutions=(4,)`, ...)."""
    from src.models.unet import UNet

    def make(**overrides) -> UNet:
        return UNet(**{**TINY_UNET, **overrides})

    return make


@pytest.fixture(scope="session")
def tiny_module(tiny_unet) -> Callable[..., DiffusionModule]:
    """A factory of tiny DiffusionModules: `tiny_module(net=None, **overrides)` is
    `DiffusionModule(net or tiny_unet(), **TINY_MODULE)` with any module argument overridden; the options of the
    groups by their flat names (`eta=0.5`, `objective="ssm"`: src.options.RENAMED) or as a group (`sampling=...`)."""
    from src.module import DiffusionModule
    from src.options import grouped_options

    def make(net: UNet | None = None, **overrides) -> DiffusionModule:
        options = grouped_options({**TINY_MODULE, **overrides})
        return DiffusionModule(net if net is not None else tiny_unet(), **options)

    return make


@pytest.fixture(scope="session")
def tiny_module_28(tiny_module, tiny_unet) -> Callable[..., DiffusionModule]:
    """A factory of the tiny module on 28x28 images with dropout 0.1 and 5 warm-up steps: the one the resume tests
    train (resume, time budget, folder data; dropout draws from the RNG every step, so a resumed run must restore
    the RNG states to match)."""

    def make(**overrides) -> DiffusionModule:
        return tiny_module(
            tiny_unet(image_size=28, dropout=0.1),
            **{"lr_scheduler": partial(LinearWarmup, warmup_steps=5), **overrides},
        )

    return make


# The small network the UNet's own tests check numbers on: 28x28 (odd bottom size 7), three levels, attention at 14.
SMALL_UNET = dict(in_channels=1, base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(14,),
                  dropout=0.0, image_size=28, norm_groups=4)  # fmt: skip


@pytest.fixture(scope="session")
def small_unet() -> Callable[..., UNet]:
    """A factory: `small_unet(**overrides)` is `UNet(**SMALL_UNET)` with any argument overridden, built right after
    `torch.manual_seed(0)` (the same weights every time)."""
    from src.models.unet import UNet

    def make(**overrides) -> UNet:
        torch.manual_seed(0)
        return UNet(**{**SMALL_UNET, **overrides})

    return make


@pytest.fixture(scope="session")
def perturb() -> Callable[..., torch.nn.Module]:
    """`perturb(module, scale, seed=1)`: every parameter moved by scale * N(0, 1) (a generator seeded with `seed`), off
    the zero initialisations of the last convs and attention outputs that make every block start as the identity.
    Returns the module."""

    @torch.no_grad()
    def move(module: torch.nn.Module, scale: float, seed: int = 1) -> torch.nn.Module:
        generator = torch.Generator().manual_seed(seed)
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
        return module

    return move
