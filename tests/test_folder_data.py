"""A folder of images as a data set (src/data/folder.py): conversion, scan, the decoded cache, and the command line
(fit and predict on a messy folder, class subfolders, 2-process DDP with one cache and disjoint batches, the global
batch halved per process, exact resume)."""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from src.callbacks.rng_state import RNGStateCallback
from src.data import ImageDataModule, convert_image, folder_images, scan_folder
from src.data import folder as folder_module
from src.errors import ConfigError
from src.main import cli_main

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "fashion_mnist.yaml")


# -- folders to test on --------------------------------------------------------------------------------------------


def noise(h: int, w: int, seed: int, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)


def broken_png(path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(noise(30, 30, 99)).save(buf, "PNG")
    path.write_bytes(buf.getvalue()[:200])  # truncated: the header opens, the pixels do not decode


def messy_folder(root: Path, classes: tuple[str, ...] = ("cats", "dogs"), per_class: int = 6) -> Path:
    """Class subfolders (nested one level deeper too) with L, RGB, RGBA and P images of assorted sizes, a JPEG,
    a text file and a truncated PNG."""
    sizes = [(40, 30), (28, 28), (17, 50), (64, 48), (30, 30), (100, 20)]
    modes = ["L", "RGB", "RGBA", "P", "RGB", "L"]
    for c, name in enumerate(classes):
        for i in range(per_class):
            folder = root / name / ("deeper" if i % 2 else "")
            folder.mkdir(parents=True, exist_ok=True)
            w, h = sizes[i % len(sizes)]
            image = Image.fromarray(noise(h, w, seed=100 * c + i)).convert(modes[i % len(modes)])
            image.save(folder / f"{name}{i}.{'jpg' if i % len(sizes) == 4 else 'png'}")
    (root / classes[0] / "notes.txt").write_text("not an image")
    broken_png(root / classes[-1] / "broken.png")
    return root


# -- conversion ----------------------------------------------------------------------------------------------------


def test_modes_convert_to_the_requested_channels() -> None:
    rgb = noise(12, 12, 0)
    for mode in ["L", "RGB", "RGBA", "P", "1", "CMYK", "I;16"]:
        image = (
            Image.fromarray(rgb).convert(mode)
            if mode != "I;16"
            else Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
        )
        for channels in (1, 3, 4):
            out = convert_image(image.copy(), 12, channels)
            assert out.shape == (channels, 12, 12) and out.dtype == np.uint8, (mode, channels)
    # RGB -> RGB is lossless at the same size; L -> RGB repeats the gray; 16-bit gray scales to 8 bits
    assert np.array_equal(convert_image(Image.fromarray(rgb), 12, 3), rgb.transpose(2, 0, 1))
    gray = Image.fromarray(rgb[..., 0])
    assert np.array_equal(convert_image(gray, 12, 3), np.repeat(rgb[None, ..., 0], 3, axis=0))
    sixteen = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
    assert np.array_equal(convert_image(sixteen, 12, 1)[0], rgb[..., 0])


def test_transparency_goes_over_white() -> None:
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)  # fully transparent black
    rgba[:4, :, :] = (10, 20, 30, 255)  # top half opaque
    out = convert_image(Image.fromarray(rgba, "RGBA"), 8, 3)
    assert (out[:, 4:] == 255).all() and (out[:, :4].transpose(1, 2, 0) == (10, 20, 30)).all()
    assert np.array_equal(convert_image(Image.fromarray(rgba, "RGBA"), 8, 4), rgba.transpose(2, 0, 1))


def test_shorter_side_resized_and_center_cropped() -> None:
    # 60 wide x 20 high, three vertical bands: red, green, blue. A 10 x 10 result is the middle (green) band.
    bands = np.zeros((20, 60, 3), dtype=np.uint8)
    bands[:, :20, 0], bands[:, 20:40, 1], bands[:, 40:, 2] = 255, 255, 255
    out = convert_image(Image.fromarray(bands), 10, 3).astype(int)
    assert out.shape == (3, 10, 10)
    assert (out[1, :, 2:-2] > 250).all() and (out[0, :, 2:-2] < 5).all() and (out[2, :, 2:-2] < 5).all()
    tall = convert_image(Image.fromarray(bands.transpose(1, 0, 2)), 10, 3).astype(int)  # 20 wide x 60 high
    assert (tall[1, 2:-2, :] > 250).all()


def test_downscaling_is_antialiased() -> None:
    # A one-pixel checkerboard shrunk 8x must average to mid-gray; point sampling would give pure black or white.
    board = ((np.indices((80, 80)).sum(0) % 2) * 255).astype(np.uint8)
    out = convert_image(Image.fromarray(board), 10, 1).astype(float)
    assert abs(out.mean() - 127.5) < 3 and out.std() < 3


def test_big_jpeg_is_decoded_at_a_reduced_scale_with_the_same_result(tmp_path: Path) -> None:
    smooth = np.linspace(0, 255, 800, dtype=np.float64)
    image = np.stack([np.add.outer(smooth[:600] * 0.5, smooth * 0.5)] * 3, -1).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "big.jpg", quality=95)
    fast = convert_image(Image.open(tmp_path / "big.jpg"), 32, 3).astype(int)
    full = Image.open(tmp_path / "big.jpg")
    full.load()  # already decoded at full size: draft() no longer applies
    assert np.abs(fast - convert_image(full, 32, 3).astype(int)).max() <= 6


# -- scanning --------------------------------------------------------------------------------------------------------


def test_scan_is_recursive_sorted_and_labels_class_subfolders(tmp_path: Path) -> None:
    root = messy_folder(tmp_path / "imgs")
    (root / ".hidden").mkdir()
    Image.fromarray(noise(8, 8, 0)).save(root / ".hidden" / "x.png")
    files, labels, classes = scan_folder(root)
    assert classes == ["cats", "dogs"]
    assert "cats/notes.txt" not in files and not any(".hidden" in f for f in files)
    assert "dogs/broken.png" in files and "cats/deeper/cats1.png" in files and "cats/cats4.jpg" in files
    assert files == sorted(files) and len(files) == 13
    assert all(label == (f.startswith("dogs")) for f, label in zip(files, labels, strict=True))
    # an image directly in the root: the set is unlabelled
    Image.fromarray(noise(8, 8, 1)).save(root / "loose.png")
    assert scan_folder(root)[1:] == ([0] * 14, [])


def test_empty_or_missing_folder_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(FileNotFoundError, match="no images found"):
        scan_folder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        scan_folder(tmp_path / "absent")


# -- the cache -------------------------------------------------------------------------------------------------------


def test_cache_is_built_once_reused_and_rebuilt_when_a_file_changes(tmp_path: Path, monkeypatch) -> None:
    root, cache = messy_folder(tmp_path / "imgs"), tmp_path / "cache"
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image file\(s\) of 13 in .*dogs/broken.png"):
        first = folder_images(root, 16, 3, cache)
    assert first.built and first.images.shape == (12, 3, 16, 16) and first.images.dtype == np.uint8
    assert first.class_names == ["cats", "dogs"] and first.labels.tolist() == [0] * 6 + [1] * 6
    assert "dogs/broken.png" not in first.files and first.skipped[0][0] == "dogs/broken.png"
    # every row is the file converted on its own
    for row, rel in enumerate(first.files):
        assert np.array_equal(first.images[row], convert_image(Image.open(root / rel), 16, 3)), rel

    # A second run decodes nothing (and still names the skipped file).
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(folder_module, "convert_image", no_decoding)
    with pytest.warns(UserWarning, match="broken.png"):
        again = folder_images(root, 16, 3, cache)
    assert not again.built and again.path == first.path and np.array_equal(again.images, first.images)
    monkeypatch.undo()

    # Another size is another cache; a changed file rebuilds and removes the stale cache of that size.
    assert folder_images(root, 8, 1, cache, warn=False).built
    Image.fromarray(noise(20, 20, 7)).save(root / "cats" / "cats0.png")
    changed = folder_images(root, 16, 3, cache, warn=False)
    assert changed.built and changed.path != first.path and not first.path.exists()
    assert not np.array_equal(changed.images[0], first.images[0])
    assert sorted(p.suffix for p in cache.iterdir() if p.suffix != ".lock") == [".json", ".json", ".u8", ".u8"]


def test_interrupted_build_never_looks_complete(tmp_path: Path, monkeypatch) -> None:
    root, cache = messy_folder(tmp_path / "imgs"), tmp_path / "cache"
    real = folder_module._decode_into

    def dies_half_way(root_, files, start, path, shape):
        if start > 0:
            raise KeyboardInterrupt  # like Ctrl-C or a kill in the middle of the build
        return real(root_, files, start, path, shape)

    monkeypatch.setattr(folder_module, "PARALLEL_MIN_IMAGES", 10**9)
    monkeypatch.setattr(folder_module, "_decode_all", lambda r, f, p, s: dies_half_way(str(r), f, 0, str(p), s)
                        + dies_half_way(str(r), f, 1, str(p), s))  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        folder_images(root, 16, 3, cache, warn=False)
    assert [p.suffix for p in cache.iterdir()] == [".lock"]  # no sidecar, no raw file, no temporary left
    monkeypatch.undo()
    assert folder_images(root, 16, 3, cache, warn=False).built


def _concurrent_reader(root: str, cache: str, queue) -> None:
    result = folder_images(root, 16, 3, cache, warn=False)
    queue.put((result.built, str(result.path), int(result.images.sum())))


def test_concurrent_processes_build_one_cache_and_read_the_same(tmp_path: Path, monkeypatch) -> None:
    root, cache = messy_folder(tmp_path / "imgs"), tmp_path / "cache"
    slow = folder_module._decode_into

    def slow_decode(*args):
        time.sleep(1.0)  # keep the lock held long enough for the others to arrive
        return slow(*args)

    monkeypatch.setattr(folder_module, "_decode_into", slow_decode)
    queue = mp.get_context("fork").Queue()
    procs = [mp.get_context("fork").Process(target=_concurrent_reader, args=(str(root), str(cache), queue)) for _ in range(3)]  # fmt: skip
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert sorted(r[0] for r in results) == [False, False, True]  # exactly one process decoded
    assert len({(r[1], r[2]) for r in results}) == 1


# -- the data module -------------------------------------------------------------------------------------------------


def test_datamodule_splits_the_folder_without_copying(tmp_path: Path) -> None:
    root = messy_folder(tmp_path / "imgs")
    dm = ImageDataModule("folder", str(root), batch_size=4, val_size=3, image_size=16, num_channels=3,
                         cache_dir=str(tmp_path / "cache"))  # fmt: skip
    assert dm.image_shape == (3, 16, 16) and dm.class_names == ["cats", "dogs"] and dm.random_flip
    with pytest.warns(UserWarning, match="broken.png"):
        dm.setup("fit")
    assert len(dm.train_set) == 9 and len(dm.val_set) == 3
    assert dm.train_set.images.data_ptr() == dm.val_set.images.data_ptr()  # one memory-mapped array, two views
    assert set(dm.train_set.indices.tolist()).isdisjoint(dm.val_set.indices.tolist())
    x, y = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert y.dtype == torch.int64 and set(y.tolist()) <= {0, 1}
    dm.setup("test")
    assert torch.equal(dm.test_set.indices, dm.val_set.indices)  # a folder tests on its held-out images
    assert dm.state_dict() == {"dataset": "folder", "class_names": ["cats", "dogs"]}
    images, name = dm.reference_images("train")
    assert images.shape == (12, 3, 16, 16) and name.startswith("folder-")
    assert dm.reference_images("test")[0].shape == (3, 3, 16, 16)


def test_datamodule_bad_settings_are_one_line(tmp_path: Path) -> None:
    root = messy_folder(tmp_path / "imgs")
    with pytest.raises(ConfigError, match="needs --data.data_dir"):
        ImageDataModule("folder")
    with pytest.raises(ConfigError, match="image size and channels"):
        ImageDataModule("folder", str(root)).image_shape  # noqa: B018
    dm = ImageDataModule("folder", str(root), val_size=12, image_size=8, num_channels=1, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="--data.val_size 12 leaves no training images out of the 12"):
        dm.setup("fit")


# -- through the command line ----------------------------------------------------------------------------------------

TINY = [
    "--config", CONFIG,
    "--data.dataset", "folder",
    "--model.net.init_args.in_channels", "3",
    "--model.net.init_args.image_size", "16",
    "--model.net.init_args.base_channels", "8",
    "--model.net.init_args.norm_groups", "4",
    "--model.net.init_args.attn_resolutions", "[4]",
    "--model.sampling.steps", "2",
    "--logger_backend", "csv",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--data.val_size", "2",
]  # fmt: skip


@pytest.mark.slow
def test_messy_folder_trains_and_predicts_with_class_names(tmp_path: Path, caplog) -> None:
    root = messy_folder(tmp_path / "imgs")
    cache = tmp_path / "cache"
    common = [*TINY, "--data.data_dir", str(root), "--data.cache_dir", str(cache),
              "--model.net.init_args.num_classes", "2", "--trainer.default_root_dir", str(tmp_path / "runs")]  # fmt: skip
    callbacks = json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                             "init_args": {"save_last": True, "save_top_k": 0}}])  # fmt: skip
    with pytest.warns(UserWarning, match="broken.png"):
        cli_main(["fit", *common, "--trainer.max_steps", "3", "--data.batch_size", "4",
                  "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
                  "--trainer.callbacks", callbacks])  # fmt: skip
    (ckpt,) = (tmp_path / "runs").glob("*/version_*/checkpoints/last.ckpt")
    assert torch.load(ckpt, weights_only=True)["ImageDataModule"]["class_names"] == ["cats", "dogs"]
    assert len(list(cache.glob("*.u8"))) == 1

    # predict needs neither the folder nor its cache: the class names come from the checkpoint
    os.rename(root, tmp_path / "gone")
    out = tmp_path / "pngs"
    with caplog.at_level("INFO"):
        cli_main(["predict", *common, "--ckpt_path", str(ckpt), "--data.num_samples", "3", "--output_dir", str(out)])
    assert f"Class labels of {root}: 0 = cats, 1 = dogs" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == ["0_0.png", "0_2.png", "1_1.png"]
    assert Image.open(out / "1_1.png").size == (16, 16) and Image.open(out / "1_1.png").mode == "RGB"


@pytest.mark.slow
def test_conditional_net_needs_as_many_classes_as_subfolders(tmp_path: Path) -> None:
    root = messy_folder(tmp_path / "imgs", classes=("a", "b", "c"), per_class=2)
    result = subprocess.run(
        [sys.executable, "-m", "src.main", "fit", *TINY, "--data.data_dir", str(root), "--data.cache_dir",
         str(tmp_path / "cache"), "--model.net.init_args.num_classes", "2", "--trainer.max_steps", "1",
         "--trainer.default_root_dir", str(tmp_path / "runs")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "num_classes 2" in last and "has 3 class subfolders (a, b, c)" in last


@pytest.mark.slow
def test_two_ddp_processes_read_one_cache_see_disjoint_batches_of_half_the_global_batch(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(32):
        Image.fromarray(noise(20, 24, seed=i)).save(root / f"{i}.png")
    record = tmp_path / "record"
    callbacks = json.dumps([{"class_path": "batch_recorder.RecordBatches", "init_args": {"out_dir": str(record)}}])
    args = [sys.executable, "-m", "src.main", "fit", *TINY, "--data.data_dir", str(root),
            "--data.cache_dir", str(tmp_path / "cache"), "--data.random_flip", "false", "--data.batch_size", "8",
            "--data.val_size", "4", "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0",
            "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
            "--trainer.enable_checkpointing", "false", "--trainer.logger", "false",
            "--trainer.callbacks", callbacks, "--trainer.default_root_dir", str(tmp_path / "runs")]  # fmt: skip
    # tests/ on the path for the recorder (a "tests" package in site-packages can shadow this folder)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (result.stdout + result.stderr).count("Decoded 32 images") == 1  # one process decoded, once
    assert len(list((tmp_path / "cache").glob("*.u8"))) == 1
    ranks = [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 and len(r["steps"]) == 3 for r in ranks)
    assert all(s["batch_size"] == 4 for r in ranks for s in r["steps"])  # the global batch of 8, halved
    for step in range(3):
        a, b = (set(r["steps"][step]["images"]) for r in ranks)
        assert len(a) == len(b) == 4 and a.isdisjoint(b)
    seen = [h for r in ranks for s in r["steps"] for h in s["images"]]
    assert len(seen) == len(set(seen)) == 24  # 28 training images, 3 steps x 8: no image twice in the epoch


# -- exact resume on a folder ----------------------------------------------------------------------------------------


def _fit_folder(
    make_module: Callable[[], L.LightningModule], root: Path, cache: Path, run: Path, ckpt_path: str | None = None
) -> dict[str, torch.Tensor]:
    L.seed_everything(0)
    data = ImageDataModule("folder", str(root), batch_size=4, val_size=4, image_size=28, num_channels=1,
                           cache_dir=str(cache))  # fmt: skip
    checkpoints = ModelCheckpoint(dirpath=run, save_top_k=-1, every_n_train_steps=3, filename="{step}")
    trainer = L.Trainer(default_root_dir=run, max_steps=8, accelerator="cpu", logger=False,
                        callbacks=[checkpoints, RNGStateCallback()], limit_val_batches=0, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    module = make_module()
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_resume_from_a_folder_is_exact(tmp_path: Path, tiny_module_28) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(24):
        Image.fromarray(noise(30, 28, seed=i, channels=1)[..., 0]).save(root / f"{i}.png")
    straight = _fit_folder(tiny_module_28, root, tmp_path / "cache", tmp_path / "a")
    resumed = _fit_folder(tiny_module_28, root, tmp_path / "cache", tmp_path / "b",
                          ckpt_path=str(tmp_path / "a" / "step=3.ckpt"))  # fmt: skip
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


# -- FID against a folder ----------------------------------------------------------------------------------------------


def test_evaluate_folders_on_both_sides(tmp_path: Path) -> None:
    from src.evaluate import main

    ref = messy_folder(tmp_path / "ref")
    samples = tmp_path / "samples" / "nested"
    samples.mkdir(parents=True)
    for i in range(6):
        Image.fromarray(noise(16, 16, seed=500 + i)).save(samples / f"{i}.png")
    Image.fromarray(noise(40, 30, seed=600)).convert("L").save(samples / "odd.png")  # converted to 3 x 16 x 16
    args = ["--samples", str(tmp_path / "samples"), "--ref", str(ref), "--extractor", "standin", "--device", "cpu",
            "--kid", "--prc", "--cache_dir", str(tmp_path / "stats"), "--data_cache_dir", str(tmp_path / "cache")]  # fmt: skip
    with pytest.warns(UserWarning, match="broken.png"):
        first = main(args)
    assert first["num_samples"] == 7 and first["fid_standin"] > 0 and "kid_mean_standin" in first
    assert "-all-standin-16px-n12-" in first["ref_stats"]
    with pytest.warns(UserWarning, match="broken.png"):
        assert main(args)["fid_standin"] == pytest.approx(first["fid_standin"])  # cached statistics


@pytest.mark.slow
def test_validate_logs_fid_against_the_folder(tmp_path: Path) -> None:
    root = messy_folder(tmp_path / "imgs")
    common = [*TINY, "--data.data_dir", str(root), "--data.cache_dir", str(tmp_path / "cache"),
              "--trainer.default_root_dir", str(tmp_path / "runs")]  # fmt: skip
    with pytest.warns(UserWarning, match="broken.png"):
        cli = cli_main(["validate", *common, "--fid.num_samples", "4", "--fid.extractor", "standin",
                        "--fid.cache_dir", str(tmp_path / "stats"), "--trainer.limit_val_batches", "1"])  # fmt: skip
    assert np.isfinite(float(cli.trainer.callback_metrics["val/fid_standin"]))
    (stats,) = (tmp_path / "stats").glob("*.npz")
    assert stats.name.startswith("folder-") and "-train-standin-16px-n12-" in stats.name


@pytest.mark.slow
def test_missing_folder_is_one_line_through_the_command_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "src.main", "fit", *TINY, "--data.data_dir", str(tmp_path / "absent"),
         "--trainer.default_root_dir", str(tmp_path / "runs")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip().splitlines()[-1] == f"error: --data.data_dir {tmp_path / 'absent'}: no such folder "
        "(the folder of images to train on)"
    )


def test_cache_can_be_built_ahead_from_the_command_line(tmp_path: Path, capsys) -> None:
    from src.data.__main__ import main

    root = messy_folder(tmp_path / "imgs")
    args = ["--data_dir", str(root), "--image_size", "8", "--num_channels", "1", "--cache_dir", str(tmp_path / "c")]
    with pytest.warns(UserWarning, match="broken.png"):
        main(args)
    assert (
        capsys.readouterr()
        .out.strip()
        .endswith(f"12 images, 2 classes decoded into {next((tmp_path / 'c').glob('*.u8'))}")
    )
    with pytest.warns(UserWarning, match="broken.png"):
        main(args)
    assert "already in" in capsys.readouterr().out
