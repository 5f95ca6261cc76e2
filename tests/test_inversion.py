"""Spherical interpolation (src/diffusion/interpolation.py) and the DDIM inversion script (scripts/ddim_inversion.py):
slerp's endpoints, norms and parallel fallback; reconstruction error falling with the number of steps for the exact
Gaussian denoiser; the script's files on a tiny network."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from src.diffusion.interpolation import lerp, slerp
from src.diffusion.schedule import NoiseSchedule

try:  # the closed-form denoiser of the sampler tests (pytest puts tests/ on sys.path)
    from test_samplers import MU, S, gaussian_model
except ImportError:  # pragma: no cover
    from tests.test_samplers import MU, S, gaussian_model

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ddim_inversion.py"


def load_script():
    spec = importlib.util.spec_from_file_location("ddim_inversion", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- slerp
def gaussians(d=3 * 32 * 32, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 32, 32, generator=g, dtype=dtype), torch.randn(3, 32, 32, generator=g, dtype=dtype)


def test_slerp_endpoints_are_exact():
    x0, x1 = gaussians()
    assert torch.equal(slerp(x0, x1, 0.0), x0) and torch.equal(slerp(x0, x1, 1.0), x1)
    path = slerp(x0, x1, torch.tensor([0.0, 0.25, 1.0]))
    assert path.shape == (3, *x0.shape) and path.dtype == x0.dtype
    assert torch.equal(path[0], x0) and torch.equal(path[-1], x1)
    torch.testing.assert_close(path[1], slerp(x0, x1, 0.25))


def test_slerp_of_orthogonal_unit_vectors():
    e0, e1 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    for a in (0.1, 0.5, 0.8):
        expected = torch.tensor([math.cos(a * math.pi / 2), math.sin(a * math.pi / 2)], dtype=torch.float64)
        torch.testing.assert_close(slerp(e0, e1, a), expected, rtol=0, atol=1e-15)


def test_slerp_keeps_the_norm_of_gaussian_latents_and_lerp_does_not():
    """The reason for slerp (DDIM section 5.3): N(0, I) latents in d = 3072 dimensions have norm ~ sqrt(d) and are
    nearly orthogonal; slerp's midpoint keeps that norm, lerp's shrinks it by ~1/sqrt(2)."""
    x0, x1 = gaussians(dtype=torch.float64)
    d = x0.numel()
    mid_s, mid_l = slerp(x0, x1, 0.5).norm().item(), lerp(x0, x1, 0.5).norm().item()
    assert abs(mid_s / math.sqrt(d) - 1) < 0.03
    assert abs(mid_l / math.sqrt(d / 2) - 1) < 0.05
    # With equal-norm endpoints the whole path stays on the sphere.
    x1 = x1 * x0.norm() / x1.norm()
    norms = slerp(x0, x1, torch.linspace(0, 1, 11)).flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, x0.norm().item()), rtol=1e-12, atol=0)


@pytest.mark.parametrize("factor", [1.0, 1.0 + 1e-7, 3.0, -1.0])
def test_slerp_falls_back_to_lerp_for_parallel_vectors(factor):
    """sin(theta) -> 0 for (anti)parallel vectors: no NaN, and the linear interpolation, the formula's limit."""
    x0 = gaussians()[0]
    x1 = factor * x0
    out = slerp(x0, x1, torch.tensor([0.0, 0.3, 1.0]))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, lerp(x0, x1, torch.tensor([0.0, 0.3, 1.0])), rtol=0, atol=1e-6)


def test_slerp_shape_errors():
    with pytest.raises(ValueError, match="same shape"):
        slerp(torch.zeros(3), torch.zeros(4), 0.5)
    with pytest.raises(ValueError, match="1-D"):
        slerp(torch.zeros(3), torch.ones(3), torch.zeros(2, 2))


# ---------------------------------------------------------------------------------------------- inversion
def test_reconstruction_error_falls_with_steps():
    """Exact Gaussian eps-predictor (float64): x_0 -> x_T -> x_0 with DDIM. Measured MSE (Var x_0 = 0.28 over all
    coordinates): 1.7e-2 at 10 steps, 1.4e-3 at 50, 3.8e-4 at 100; std of x_T 0.75, 0.92, 0.96."""
    script = load_script()
    g = torch.Generator().manual_seed(0)
    x0 = torch.as_tensor(MU) + torch.as_tensor(S) * torch.randn(500, 1, 1, len(MU), generator=g, dtype=torch.float64)
    rows, recs = script.reconstruction_errors(gaussian_model(), x0, NoiseSchedule.linear(1000), steps=(10, 50, 100))
    mse = [r["mse"] for r in rows]
    assert [r["steps"] for r in rows] == [10, 50, 100] and set(recs) == {10, 50, 100}
    assert mse[0] > mse[1] > mse[2] and mse[2] < 1e-3 and mse[0] < 0.1
    # The encodings approach the prior N(0, I) as the steps shrink.
    assert (
        rows[0]["latent_std"] < rows[1]["latent_std"] < rows[2]["latent_std"] and abs(rows[2]["latent_std"] - 1) < 0.1
    )


def test_script_writes_its_files(tmp_path, tiny_unet):
    script = load_script()
    torch.manual_seed(0)
    net = tiny_unet(attn_resolutions=(4,), mid_attention=True).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    rows = script.run(net, NoiseSchedule.linear(1000), images, tmp_path, steps=(2, 5), interp_steps=3, num_interp=4)
    assert [r["steps"] for r in rows] == [2, 5] and all(np.isfinite(r["mse"]) for r in rows)
    assert {p.name for p in tmp_path.iterdir()} == {
        "errors.csv",
        "errors.md",
        "reconstruction.png",
        "interpolation.png",
    }
    assert (tmp_path / "errors.md").read_text().count("\n| ") == 4  # header, separator, two rows
