"""Your own folder on a laptop (configs/folder32.yaml): a small folder trains with the default validation hold-out,
the conditional quickstart names the folder recipe for a flat folder, one flag changes the resolution, and a
GPU-sized network on the CPU gets one warning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import src.main
from src.data import ImageDataModule
from src.errors import ConfigError
from src.main import cli_main

REPO = Path(__file__).resolve().parents[1]
FOLDER32 = str(REPO / "configs" / "folder32.yaml")

pytestmark = pytest.mark.usefixtures("one_thread")


def flat_folder(root: Path, n: int = 20) -> Path:
    """n small RGB PNGs (smooth colour gradients, assorted sizes) directly in root: no class subfolders."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = 12 + i % 5, 16 + i % 3
        yy, xx = np.mgrid[0:h, 0:w]
        image = rng.uniform(0, 255, 3) * (xx[..., None] / w) + rng.uniform(0, 255, 3) * (yy[..., None] / h) / 2
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / f"img{i:02d}.png")
    return root


def tiny_fit(tmp_path: Path, root: Path, *extra: str, steps: int = 2) -> list[str]:
    """`fit --config configs/folder32.yaml --data.data_dir root` for a few steps of batch 4, no validation and a
    two-step end-of-fit grid (the recipe's callbacks otherwise as shipped)."""
    return ["fit", "--config", FOLDER32, "--data.data_dir", str(root), "--data.cache_dir", str(tmp_path / "cache"),
            "--trainer.max_steps", str(steps), "--data.batch_size", "4", "--trainer.limit_val_batches", "0",
            "--model.sampling.steps", "2", "--trainer.default_root_dir", str(tmp_path / "runs"),
            "--logger_backend", "csv", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", *extra]  # fmt: skip


def test_folder32_trains_a_folder_of_20_images_with_the_default_val_size(tmp_path: Path, caplog) -> None:
    root = flat_folder(tmp_path / "photos")
    with caplog.at_level("INFO"):
        cli = cli_main(tiny_fit(tmp_path, root))
    assert cli.trainer.global_step == 2
    # 5% of 20, at least one: a fixed 1,000 rejected every folder of 1,000 images or fewer
    assert len(cli.datamodule.train_set) == 19 and len(cli.datamodule.val_set) == 1
    assert f"Holding out 1 of the 20 images of {root}" in caplog.text
    assert len(list((tmp_path / "runs" / "folder32").glob("version_0/checkpoints/last.ckpt"))) == 1
    assert cli.model.net.in_channels == 3 and cli.model.net.image_size == 32
    assert sum(p.numel() for p in cli.model.net.parameters()) < src.main.CPU_PARAMETER_LIMIT  # a CPU recipe: quiet
    assert "on the CPU" not in caplog.text


def test_default_val_size_scales_with_a_folder_and_keeps_the_builtin_split(tmp_path: Path) -> None:
    folder = ImageDataModule("folder", str(tmp_path), image_size=8, num_channels=3)
    assert [folder.num_held_out(n) for n in (1, 2, 20, 50, 1000, 19_999, 20_000, 1_000_000)] == [
        0, 1, 1, 2, 50, 999, 1000, 1000,
    ]  # fmt: skip
    # The built-in sets keep the 1,000 held-out images of every shipped result, whatever the set's size.
    builtin = ImageDataModule("fashion_mnist")
    assert builtin.val_size is None and builtin.num_held_out(60_000) == 1000
    assert ImageDataModule("fashion_mnist", val_size=0).num_held_out(60_000) == 0
    # An explicit size is used as given, and one that leaves nothing to train on is one line.
    explicit = ImageDataModule("folder", str(tmp_path), val_size=20, image_size=8, num_channels=3)
    with pytest.raises(ConfigError, match=r"^--data.val_size 20 leaves no training images out of the 20 in "):
        explicit.train_val_indices(20)


def test_conditional_quickstart_on_a_flat_folder_names_the_folder_recipe(tmp_path: Path) -> None:
    """`make train ARGS="--data.dataset folder --data.data_dir DIR"` (configs/fashion_mnist_cond.yaml, 10 classes)
    on a folder without class subfolders: one line naming configs/folder32.yaml, before the folder is decoded."""
    root = flat_folder(tmp_path / "photos", n=4)
    args = ["fit", "--config", str(REPO / "configs" / "fashion_mnist_cond.yaml"), "--data.dataset", "folder",
            "--data.data_dir", str(root), "--data.cache_dir", str(tmp_path / "cache"),
            "--trainer.default_root_dir", str(tmp_path / "runs"), "--logger_backend", "csv"]  # fmt: skip
    with pytest.raises(ConfigError) as error:
        cli_main(args)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("the network is class-conditional (--model.net.init_args.num_classes 10) but ")
    assert "has no class subfolders" in message and "--config configs/folder32.yaml" in message
    assert f'make train CONFIG=configs/folder32.yaml ARGS="--data.data_dir {root}"' in message
    assert not (tmp_path / "cache").exists()  # failed before decoding anything


def test_image_size_is_one_flag_for_images_net_and_attention(tmp_path: Path) -> None:
    cli = cli_main(["--config", FOLDER32, "--image_size", "48"], run=False)
    assert cli.model.net.image_size == cli.datamodule.image_size == 48
    assert cli.model.net.config["attn_resolutions"] == [12]  # the lowest level, as 8 is at 32
    # End to end: the folder is converted to the new size and the net trains on it.
    root = flat_folder(tmp_path / "photos")
    cli = cli_main(tiny_fit(tmp_path, root, "--image_size", "16", steps=1))
    assert cli.trainer.global_step == 1 and cli.model.net.config["attn_resolutions"] == [4]
    assert cli.datamodule.train_set[0][0].shape == (3, 16, 16)
    assert len(list((tmp_path / "cache").glob("photos-16px-3ch-*.u8"))) == 1
    (ckpt,) = (tmp_path / "runs" / "folder32").glob("version_0/checkpoints/last.ckpt")
    net = torch.load(ckpt, weights_only=True)["hyper_parameters"]["net"]["init_args"]
    assert net["image_size"] == 16 and net["attn_resolutions"] == [4]
    # The run's config.yaml records the moved attention beside --image_size 16, so it parses back to the same net.
    saved = yaml.safe_load((ckpt.parents[1] / "config.yaml").read_text())
    assert saved["image_size"] == saved["model"]["net"]["init_args"]["image_size"] == 16
    assert saved["model"]["net"]["init_args"]["attn_resolutions"] == [4]


def test_the_long_resolution_flag_with_stale_attention_is_one_line(tmp_path: Path) -> None:
    """--model.net.init_args.image_size 48 alone would leave the recipe's attention at 8 x 8, which a 48-pixel
    net never has (the UNet would silently drop it)."""
    root = flat_folder(tmp_path / "photos", n=4)
    with pytest.raises(ConfigError) as error:
        cli_main(tiny_fit(tmp_path, root, "--model.net.init_args.image_size", "48"))
    assert str(error.value) == (
        "--model.net.init_args.attn_resolutions [8]: at image_size 48 this network's feature maps are [48, 24, 12] "
        "pixels wide, so attention at [8] would never run; pick sizes from that list, e.g. "
        "--model.net.init_args.attn_resolutions [12] (the lowest), or change the resolution with --image_size "
        "instead, which moves the attention along"
    )
    cli = cli_main(["--config", FOLDER32, "--model.net.init_args.image_size", "48",
                    "--model.net.init_args.attn_resolutions", "[12]"], run=False)  # fmt: skip
    assert cli.datamodule.image_size == 48  # the link from the net's size to the data's stays


def test_a_gpu_sized_network_on_the_cpu_warns_once(tmp_path: Path, monkeypatch, caplog) -> None:
    """configs/folder64.yaml's 121M parameters on a CPU: one line naming the CPU recipes (here the limit is lowered
    so that the 1.1M-parameter recipe stands in for it and the test stays fast)."""
    monkeypatch.setattr(src.main, "CPU_PARAMETER_LIMIT", 100_000)
    root = flat_folder(tmp_path / "photos", n=8)
    with caplog.at_level("WARNING"):
        cli_main(tiny_fit(tmp_path, root, steps=1))
    (line,) = [r.getMessage() for r in caplog.records if "on the CPU" in r.getMessage()]
    assert line.startswith("warning: training a 1M-parameter network on the CPU: a GPU-sized recipe")
    assert "configs/folder32.yaml" in line and "\n" not in line
