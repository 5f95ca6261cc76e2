"""Checkpoints written before DiffusionModel existed still load, predict and resume.

Until then the EMA weights were `ema.model.*` in the state dict (now `model.net.*`, the sampling model's network),
and the hyperparameters held the FID options and, until the options were grouped (src/options.py), every option under
its flat name (`sampling_steps`, `guidance_scale`, ...). The old file is made from a new one by undoing exactly those changes;
every way in (CLI predict and resume, `DiffusionModule.load_from_checkpoint`, `DiffusionModel.load`) must give
what the new file gives.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import _fit, _predict, needs_fashion_mnist

from src.models.diffusion import DiffusionModel
from src.module import DiffusionModule
from src.options import flat_options

pytestmark = [pytest.mark.slow, needs_fashion_mnist, pytest.mark.usefixtures("one_thread")]

# The hyperparameters of the FID options as DiffusionModule recorded them before they moved to the FID callback.
OLD_FID_HPARAMS = {
    "num_fid_samples": 0,
    "fid_extractor": "inception",
    "fid_weights_path": None,
    "fid_ref_stats": None,
    "fid_ref_split": "train",
    "fid_cache_dir": None,
    "fid_batch_size": 250,
}


def old_format(checkpoint: dict) -> dict:
    """`checkpoint` as the previous version wrote it."""
    old = dict(checkpoint)
    state = old["state_dict"]
    assert any(k.startswith("model.net.") for k in state) and not any(k.startswith("ema.") for k in state)
    old["state_dict"] = {("ema.model." + k[len("model.net.") :] if k.startswith("model.net.") else k): v
                         for k, v in state.items()}  # fmt: skip
    assert "sampling" in old["hyper_parameters"] and "guidance" in old["hyper_parameters"]
    old["hyper_parameters"] = {**flat_options(old["hyper_parameters"]), **OLD_FID_HPARAMS}
    assert "sampling" not in old["hyper_parameters"] and "sampling_steps" in old["hyper_parameters"]
    return old


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    new = _fit(root, 4)
    old = new.with_name("old.ckpt")
    torch.save(old_format(torch.load(new, weights_only=False)), old)
    return new, old


def test_predict_from_an_old_checkpoint_writes_the_same_images(checkpoints, tmp_path: Path) -> None:
    new, old = checkpoints
    _predict(new, tmp_path / "r", tmp_path / "new")
    _predict(old, tmp_path / "r", tmp_path / "old")
    names = sorted(p.name for p in (tmp_path / "new").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "old").iterdir()) and len(names) == 5
    for name in names:
        assert np.array_equal(
            np.asarray(Image.open(tmp_path / "new" / name)), np.asarray(Image.open(tmp_path / "old" / name))
        )


def test_resuming_an_old_checkpoint_continues_exactly(checkpoints, tmp_path: Path) -> None:
    new, old = checkpoints
    results = []
    for name, ckpt in (("new", new), ("old", old)):
        resumed = _fit(tmp_path / name, 6, "--ckpt_path", str(ckpt))
        results.append(torch.load(resumed, weights_only=False))
    a, b = results
    assert a["global_step"] == b["global_step"] == 6
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key


def test_old_checkpoints_load_in_python(checkpoints) -> None:
    new, old = checkpoints
    x, t = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 700])
    with torch.no_grad():
        expected = DiffusionModel.load(new).net(x, t)
        assert torch.equal(DiffusionModel.load(old).net(x, t), expected)
        module = DiffusionModule.load_from_checkpoint(old, map_location="cpu")
        assert torch.equal(module.model.net(x, t), expected)


def test_recorded_options_the_sampler_does_not_read_are_reset_when_loading(checkpoints, tmp_path: Path) -> None:
    """Options its sampler never read, recorded before they were refused, do not stop a checkpoint from loading:
    they are reset to their defaults (sampling is unchanged, as the sampler never read them)."""
    from src.diffusion.sampler_settings import SamplerSettings

    new, _ = checkpoints
    checkpoint = torch.load(new, weights_only=False)
    hparams = flat_options(checkpoint["hyper_parameters"])  # recorded by their flat names then
    checkpoint["hyper_parameters"] = {**hparams, "sampler": "dpmpp_3m", "eta": 0.5, "skip": "logsnr",
                                      "ddpm_variance": "fixed_large", "bpd_timesteps": 0,
                                      "sampler_options": {"solver_order": 2, "rho": 5.0}}  # fmt: skip
    path = tmp_path / "unread.ckpt"
    torch.save(checkpoint, path)
    expected = SamplerSettings(sampler="dpmpp_3m", steps=hparams["sampling_steps"], variance="fixed_large",
                               clip_x0=hparams["clip_denoised"], options={"rho": 5.0})  # fmt: skip
    assert DiffusionModel.load(path).settings == expected
    assert DiffusionModule.load_from_checkpoint(path, map_location="cpu").model.settings == expected
