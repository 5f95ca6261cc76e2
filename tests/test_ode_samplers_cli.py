"""The continuous-time samplers through the command line: `predict --model.sampling.sampler NAME` on a tiny trained model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

try:
    from test_cli import _fit, _predict, needs_fashion_mnist
except ImportError:  # pragma: no cover
    from tests.test_cli import _fit, _predict, needs_fashion_mnist


# The SDE / ODE samplers run on Karras noise levels and do not read the config's --model.sampling.skip logsnr (which the
# DPM-Solver++(2M) of fashion_mnist.yaml uses): it goes back to the default with them.
KARRAS = ["--model.sampling.skip", "uniform"]


def _images(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted(folder.iterdir(), key=lambda p: int(p.stem))]


@pytest.mark.slow
@needs_fashion_mnist
def test_predict_with_each_continuous_sampler(tmp_path: Path) -> None:
    ckpt = _fit(tmp_path / "runs", 2)
    for name in ("euler_maruyama", "pc", "heun", "dpmpp_3m", "unipc", "ipndm"):
        out = tmp_path / name
        _predict(ckpt, tmp_path / "runs", out, "--model.sampling.sampler", name, *KARRAS)
        images = _images(out)
        assert len(images) == 5 and images[0].shape == (28, 28), name
    # A deterministic solver's sample i does not depend on the batch it is drawn in.
    _predict(ckpt, tmp_path / "runs", tmp_path / "dpmpp_3m_b5", "--model.sampling.sampler", "dpmpp_3m", *KARRAS,
             "--data.predict_batch_size", "5")  # fmt: skip
    for a, b in zip(_images(tmp_path / "dpmpp_3m"), _images(tmp_path / "dpmpp_3m_b5"), strict=True):
        assert np.array_equal(a, b)


@pytest.mark.slow
@needs_fashion_mnist
def test_sampler_options_reach_the_solver_and_bad_ones_are_refused(tmp_path: Path) -> None:
    from src.errors import ConfigError

    ckpt = _fit(tmp_path / "runs", 2)
    # Enough steps for the third order to be used (the first and last steps are lower order).
    unipc = ["--model.sampling.sampler", "unipc", "--model.sampling.steps", "10", *KARRAS]
    _predict(ckpt, tmp_path / "runs", tmp_path / "order2", *unipc)
    _predict(ckpt, tmp_path / "runs", tmp_path / "order3", *unipc, "--model.sampling.options", "{solver_order: 3}")
    assert any(not np.array_equal(a, b) for a, b in zip(_images(tmp_path / "order2"), _images(tmp_path / "order3")))
    with pytest.raises(ConfigError, match="unknown order"):
        _predict(ckpt, tmp_path / "runs", tmp_path / "bad", *unipc, "--model.sampling.options", "{order: 3}")
    with pytest.raises(ConfigError, match="--model.sampling.sampler ddim does not read --model.sampling.options rho"):
        _predict(ckpt, tmp_path / "runs", tmp_path / "bad2", "--model.sampling.sampler", "ddim", "--model.sampling.options",
                 "{rho: 3}")  # fmt: skip
    # An option the chosen SDE / ODE sampler does not read: DPM-Solver++(3M) ran unchanged with solver_order 2.
    with pytest.raises(
        ConfigError, match="--model.sampling.sampler dpmpp_3m does not read --model.sampling.options solver_order"
    ):
        _predict(ckpt, tmp_path / "runs", tmp_path / "bad3", "--model.sampling.sampler", "dpmpp_3m", *KARRAS,
                 "--model.sampling.options", "{solver_order: 2}")  # fmt: skip
    with pytest.raises(ConfigError, match="--model.sampling.sampler heun does not read --model.sampling.skip logsnr"):
        _predict(ckpt, tmp_path / "runs", tmp_path / "bad4", "--model.sampling.sampler", "heun")


@pytest.mark.slow
@needs_fashion_mnist
def test_continuous_samplers_call_a_guided_v_model_at_fractional_timesteps(tmp_path: Path, monkeypatch) -> None:
    """The quickstart's kind of model (class-conditional, v-prediction, guided): the SDE / ODE samplers evaluate it at
    the fractional timesteps of their Karras levels and convert v at each exact level; `quantize` rounds them."""
    from src.models.unet import UNet

    conditional = ["--model.net.init_args.num_classes", "10"]
    ckpt = _fit(tmp_path / "runs", 2, *conditional)
    seen: list[float] = []
    forward = UNet.forward

    def recording(self, x, t, *args, **kwargs):
        seen.extend(t.flatten().tolist())
        return forward(self, x, t, *args, **kwargs)

    monkeypatch.setattr(UNet, "forward", recording)
    guided = [*conditional, "--model.guidance.scale", "2.0", "--model.sampling.sampler", "heun", *KARRAS]
    _predict(ckpt, tmp_path / "runs", tmp_path / "heun", *guided)
    assert seen and any(t != round(t) for t in seen), "heun called the network at integer timesteps only"
    seen.clear()
    _predict(ckpt, tmp_path / "runs", tmp_path / "quantized", *guided, "--model.sampling.options", "{quantize: true}")
    assert seen and all(t == round(t) for t in seen)
