"""Inference export (src/export.py): a real Lightning checkpoint's EMA weights -> model.safetensors + config.json ->
`DiffusionModel.load` gives the EMA network's outputs exactly, without importing Lightning; and the same loader reads
the checkpoint itself."""

import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from src.diffusion.sampler_settings import SamplerSettings
from src.export import export_checkpoint, main
from src.models.diffusion import DiffusionModel
from src.models.unet import UNet
from src.module import DiffusionModule
from src.optim import AdamW, LinearWarmup
from src.options import Sampling, Training

pytest.importorskip("safetensors")
pytestmark = pytest.mark.filterwarnings("ignore:.*eval mode.*", "ignore:.*val_dataloader.*")
REPO = Path(__file__).resolve().parents[1]
NET = dict(in_channels=1, base_channels=8, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4],
           dropout=0.0, image_size=8, norm_groups=4)  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Two training steps of a tiny model with Lightning, saved where the CLI would put it, plus the CLI's
    config.yaml in the run folder (DiffusionModule does not store `net` in its hyperparameters)."""
    torch.manual_seed(0)
    module = DiffusionModule(
        UNet(**NET),
        optimizer=partial(AdamW, lr=1e-2),
        lr_scheduler=partial(LinearWarmup, warmup_steps=0),
        training=Training(ema_decay=0.9),
        sampling=Sampling(steps=7, eta=0.3),
    )
    data = TensorDataset(torch.rand(8, 1, 8, 8) * 2 - 1, torch.zeros(8, dtype=torch.int64))
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, DataLoader(data, batch_size=4))
    run = tmp_path_factory.mktemp("runs") / "version_0"
    ckpt = run / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"net": {"class_path": "src.models.unet.UNet",
                                                                        "init_args": NET}}}))  # fmt: skip
    return ckpt, module


def test_export_gives_the_ema_model(checkpoint, tmp_path):
    ckpt, module = checkpoint
    out = export_checkpoint(ckpt, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    model = DiffusionModel.load(out)
    net, schedule = model.net, model.schedule
    assert model.settings == SamplerSettings(sampler="ddim", steps=7, eta=0.3, skip="uniform", variance="fixed_small",
                                             clip_x0=False, options={})  # fmt: skip
    assert model.prediction == "eps" and not model.training
    assert schedule.num_timesteps == 1000 and torch.equal(schedule.betas, module.schedule.betas.cpu())
    ema, raw = module.model.net.eval(), module.net.eval()
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([5, 900])
    with torch.no_grad():
        assert torch.equal(net(x, t), ema(x, t))
        assert not torch.equal(net(x, t), raw(x, t))  # the EMA weights, not the trained copy
    meta = json.loads((out / "config.json").read_text())
    assert meta["net"] == {"class_path": "src.models.unet.UNet", "init_args": UNet(**NET).config}
    assert meta["source"]["global_step"] == 2
    # DiffusionModel.load dispatches on what it is given: the export folder or the checkpoint itself.
    for source in (out, ckpt):
        with torch.no_grad():
            assert torch.equal(DiffusionModel.load(source).net(x, t), ema(x, t))


def test_version_1_exports_still_load(checkpoint, tmp_path):
    # Version 1 wrote the UNet's arguments as "unet" and the prediction among the sampler options.
    ckpt, module = checkpoint
    out = export_checkpoint(ckpt, tmp_path / "export")
    meta = json.loads((out / "config.json").read_text())
    old = {"format": meta["format"], "version": 1, "unet": meta["net"]["init_args"], "schedule": meta["schedule"],
           "sampler": {**{k: v for k, v in meta["sampler"].items() if k != "options"}, "prediction": "eps"}}  # fmt: skip
    (out / "config.json").write_text(json.dumps(old))
    model = DiffusionModel.load(out)
    assert model.settings == module.model.settings and model.prediction == "eps"
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 900])
    with torch.no_grad():
        assert torch.equal(model.net(x, t), module.model.net.eval()(x, t))


def test_version_2_exports_load_and_sample_the_same_pngs(checkpoint, tmp_path):
    """What the code before the diffusion process and first stage wrote (version 2: no "process" or
    "first_stage"; a fixed schedule's model is otherwise written as it is now) samples the very same PNG bytes."""
    from src.images import save_grid

    ckpt, module = checkpoint
    out = export_checkpoint(ckpt, tmp_path / "export")
    meta = json.loads((out / "config.json").read_text())
    assert "process" not in meta and "first_stage" not in meta
    (out / "config.json").write_text(json.dumps({**meta, "version": 2}, indent=2) + "\n")
    pngs = []
    for source in (out, ckpt):
        images = DiffusionModel.load(source).sample_indices(torch.arange(4))
        save_grid(images, tmp_path / f"{len(pngs)}.png", nrow=2)
        pngs.append((tmp_path / f"{len(pngs)}.png").read_bytes())
    assert pngs[0] == pngs[1]


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_exported_x0_and_v_models_sample_as_the_module_does(tmp_path, prediction):
    # The export records what the net predicts, and the loaded model's sampling converts it to eps.
    from src.diffusion.samplers import sample

    torch.manual_seed(0)
    module = DiffusionModule(
        UNet(**NET),
        optimizer=partial(AdamW, lr=1e-2),
        lr_scheduler=partial(LinearWarmup, warmup_steps=0),
        prediction=prediction,
        training=Training(ema_decay=0.9),
        sampling=Sampling(steps=6),
    )
    with torch.no_grad():  # non-zero output layer, so that the parameterisation matters
        for p in module.model.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, ckpt)
    model = DiffusionModel.load(export_checkpoint(ckpt, tmp_path / "export"))
    assert model.prediction == prediction
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model.sample(x_T), module.model.sample(x_T), rtol=0, atol=1e-6)
        options = model.settings.kwargs()
        assert not torch.allclose(sample(model.net, x_T, model.schedule, **options), module.model.sample(x_T))


def test_network_arguments_sources(checkpoint, tmp_path):
    ckpt, _ = checkpoint
    lone = tmp_path / "lone.ckpt"  # a checkpoint away from its run folder: no config.yaml beside it
    data = torch.load(ckpt, weights_only=True)
    assert data["hyper_parameters"]["net"]["class_path"] == "src.models.unet.UNet"  # new checkpoints record the net
    # An older checkpoint without it:
    del data["hyper_parameters"]["net"]
    torch.save(data, lone)
    with pytest.raises(ValueError, match="no network arguments found"):
        export_checkpoint(lone, tmp_path / "a")
    export_checkpoint(lone, tmp_path / "b", config=ckpt.parent.parent / "config.yaml")
    # Network arguments in the hyperparameters (as {"class_path", "init_args"}) take precedence.
    data["hyper_parameters"]["net"] = {"class_path": "src.models.unet.UNet", "init_args": NET}
    torch.save(data, lone)
    export_checkpoint(lone, tmp_path / "c")
    data["hyper_parameters"]["net"] = {"class_path": "src.models.unet.UNet", "init_args": dict(NET, base_channels=16)}
    torch.save(data, lone)
    with pytest.raises(ValueError, match="do not fit"):
        export_checkpoint(lone, tmp_path / "d")


def test_cli_refuses_to_overwrite(checkpoint, tmp_path, capsys):
    ckpt, _ = checkpoint
    out = tmp_path / "export"
    main([str(ckpt), str(out)])
    assert "model.safetensors" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main([str(ckpt), str(out)])
    assert info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    main([str(ckpt), str(out), "--overwrite"])


def test_loading_and_sampling_an_export_does_not_import_lightning(checkpoint, tmp_path):
    out = export_checkpoint(checkpoint[0], tmp_path / "export")
    code = (
        "import sys, torch; from src.models.diffusion import DiffusionModel; m = DiffusionModel.load(sys.argv[1]); "
        "m.sample_indices(torch.arange(2), steps=2); "
        "assert not any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules), 'lightning'"
    )
    result = subprocess.run([sys.executable, "-c", code, str(out)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
