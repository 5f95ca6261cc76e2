"""End to end through the command line: fit -> checkpoint -> predict PNG files, on a tiny model."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from src.data import DATASETS
from src.errors import ConfigError
from src.main import cli_main
from src.options import Guidance, Sampling

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "fashion_mnist.yaml")

needs_fashion_mnist = pytest.mark.skipif(
    not any(Path(d).is_dir() for d in DATASETS["fashion_mnist"].system_dirs),
    reason="Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)",
)

# A tiny network and few sampling steps so that the round trip takes seconds on a CPU.
TINY = [
    "--config", CONFIG,
    "--model.net.init_args.base_channels", "8",
    "--model.net.init_args.norm_groups", "4",
    "--model.net.init_args.attn_resolutions", "[7]",
    "--model.sampling.steps", "3",
    "--logger_backend", "csv",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]  # fmt: skip


CALLBACKS = json.dumps(
    [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"save_last": True, "save_top_k": 0},
        },
        {"class_path": "src.callbacks.sampling.SampleGrid", "init_args": {"every_n_steps": 0, "num_samples": 4}},
    ]
)


def _fit(root: Path, steps: int = 4, *extra: str) -> Path:
    cli_main(["fit", *TINY, "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(steps),
              "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
              "--data.batch_size", "8", "--data.val_size", "16",
              "--trainer.callbacks", CALLBACKS, *extra])  # fmt: skip
    (ckpt,) = root.glob("*/version_*/checkpoints/last.ckpt")
    return ckpt


def _predict(ckpt: Path, root: Path, out: Path, *extra: str) -> None:
    cli_main(["predict", *TINY, "--ckpt_path", str(ckpt), "--trainer.default_root_dir", str(root),
              "--data.num_samples", "5", "--data.predict_batch_size", "2", "--output_dir", str(out), *extra])  # fmt: skip


@pytest.mark.slow
@needs_fashion_mnist
def test_fit_then_predict_round_trip(tmp_path: Path) -> None:
    ckpt = _fit(tmp_path / "runs")
    # fit leaves a checkpoint and a final sample grid.
    grids = sorted((tmp_path / "runs").glob("*/version_*/samples/step_*.png"))
    assert grids, "fit wrote no sample grid"
    assert Image.open(grids[-1]).size[0] > 28

    out = tmp_path / "pngs"
    before_predict = sorted(p.relative_to(tmp_path) for p in (tmp_path / "runs").rglob("*"))
    _predict(ckpt, tmp_path / "runs", out)
    # predict writes its PNG files and nothing else: no config.yaml or log folder in the runs folder
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "runs").rglob("*")) == before_predict
    files = sorted(out.iterdir(), key=lambda p: int(p.stem))
    assert [p.name for p in files] == [f"{i}.png" for i in range(5)]
    first = np.asarray(Image.open(files[0]))
    assert first.shape == (28, 28) and first.dtype == np.uint8

    # Same checkpoint, same seed, other batch size: the same images (noise depends on the sample index only).
    # The network comes from the checkpoint, whatever the config says (here a wider one).
    out2 = tmp_path / "pngs2"
    _predict(
        ckpt, tmp_path / "runs", out2, "--data.predict_batch_size", "5", "--model.net.init_args.base_channels", "16"
    )
    for a, b in zip(files, sorted(out2.iterdir(), key=lambda p: int(p.stem))):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))

    # A folder that already holds files is never overwritten without --overwrite.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="--overwrite"):
        _predict(ckpt, tmp_path / "runs", out, "--model.sampling.seed", "1")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    _predict(ckpt, tmp_path / "runs", out, "--model.sampling.seed", "1", "--overwrite", "true")
    assert any(p.read_bytes() != before[p.name] for p in out.iterdir())

    # --ckpt_path last resumes the newest run in its own folder (not a fresh, empty version_1).
    _fit(tmp_path / "runs", 6, "--ckpt_path", "last")
    assert [p.name for p in (tmp_path / "runs" / "fashion_mnist").iterdir()] == ["version_0"]
    resumed = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert resumed["global_step"] == 6


def test_help_and_print_config_show_every_model_option() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "src.main", "fit", "--config", CONFIG, "--print_config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for key in (
        "sampler:",
        "sampling_steps:",
        "eta:",
        "skip:",
        "ema_decay:",
        "warmup_steps:",
        "base_channels:",
        "dataset: fashion_mnist",
        "run_name: fashion_mnist",
    ):
        assert key in result.stdout


# Every shipped recipe: each file of configs/ alone, and each data set's diffusion config with each overlay.
CONFIG_FILES = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
OVERLAYS = sorted(f"overlays/{p.name}" for p in (REPO / "configs" / "overlays").glob("*.yaml"))
RECIPES = [[name] for name in CONFIG_FILES] + [
    [name, overlay]
    for name in CONFIG_FILES
    # A concat-conditioned net takes an image, not labels: the cond overlay does not apply to super-resolution.
    if not any(kind in name for kind in ("classifier", "_cond", "autoencoder", "super_resolution"))
    for overlay in OVERLAYS
    # The sampler overlay on the CPU recipes; the GPU ones (100M-parameter nets: every parse in this process keeps
    # its model alive, about 1 GB each) are composed with it below with their nets shrunk.
    if overlay != "overlays/dpm_solver.yaml" or name.startswith(("fashion_mnist", "folder32"))
]


@functools.cache
def _tiny_autoencoder(channels: int = 1, levels: int = 3) -> str:
    """A tiny stand-in for the autoencoder a latent config reads: configs/fashion_mnist_latent.yaml's 28x28x1 ->
    7x7x4 (f = 4, 3 levels), configs/folder256_latent.yaml's 256x256x3 -> 32x32x4 (f = 8, 4 levels)."""
    from src.models.autoencoder import AutoencoderKL, save_autoencoder

    path = Path(tempfile.mkdtemp(prefix="tiny-autoencoder-")) / "autoencoder.pt"
    return str(save_autoencoder(AutoencoderKL(channels, channels, (8,) * levels, 1, 4, 4, False), path))


def _parse(*files: str, extra: tuple[str, ...] = ()):
    from src.autoencoder_module import AutoencoderModule
    from src.classifier_module import ClassifierModule
    from src.module import DiffusionModule

    model_class = ClassifierModule if "classifier" in files[0] else DiffusionModule
    model_class = AutoencoderModule if "autoencoder" in files[0] else model_class
    args = [arg for name in files for arg in ("--config", str(REPO / "configs" / name))]
    if "latent" in files[0]:  # its autoencoder file is a run's output: a stand-in here
        stand_in = _tiny_autoencoder(3, 4) if files[0].startswith("folder") else _tiny_autoencoder()
        args += ["--model.first_stage.init_args.path", stand_in]
    return cli_main([*args, *extra], run=False, model_class=model_class)


@pytest.mark.parametrize("recipe", RECIPES, ids=" + ".join)
def test_every_config_parses(recipe: list[str]) -> None:
    cli = _parse(*recipe)
    data = cli.datamodule
    if hasattr(cli.model, "model"):  # a diffusion model: the images its first stage decodes to (the net's without one)
        assert tuple(cli.model.model.image_shape) == (data.num_channels, data.image_size, data.image_size)
        return
    # The autoencoder is fully convolutional: its module holds the image size.
    assert getattr(cli.model.net, "image_size", cli.model.hparams.get("image_size")) == data.image_size
    net = cli.model.net
    assert getattr(net, "in_channels", getattr(net, "config", {}).get("in_channels")) == data.num_channels


def test_a_dropped_cli_frees_its_model() -> None:
    """A process that builds several CLIs (a notebook, this test suite) holds one model, not one per CLI: the signal
    watcher's list of processes to kill held each CLI's trainer, and with it its model, for the life of the process."""
    import gc
    import weakref

    small = ("--model.net.init_args.base_channels", "8", "--trainer.logger", "false")
    first = _parse("fashion_mnist.yaml", extra=small)
    model, trainer = weakref.ref(first.model), weakref.ref(first.trainer)
    del first
    second = _parse("fashion_mnist.yaml", extra=small)  # jsonargparse keeps the last parser (and its model) itself
    del second
    gc.collect()
    assert trainer() is None and model() is None


def _differing_options(a, b) -> set[str]:
    """The dotted option names whose parsed values differ between two CLIs (the list of config files aside)."""

    def flat(value: object, prefix: str = "") -> dict[str, object]:
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}.").items()}
        return {prefix[:-1]: value}

    first, second = flat(a.config.as_dict()), flat(b.config.as_dict())
    return {key for key in first.keys() | second.keys() if key != "config" and first.get(key) != second.get(key)}


def test_the_cond_files_are_their_data_set_file_plus_the_cond_overlay() -> None:
    """A file includes one other (`config:`), so cifar10_cond.yaml and fashion_mnist_cond.yaml restate the overlay's
    values; they must not drift from it. They differ only where their comments say."""
    cond = _parse("cifar10_cond.yaml")
    assert _differing_options(cond, _parse("cifar10.yaml", "overlays/cond.yaml")) == {"run_name"}
    assert cond.model.net.num_classes == 10 and cond.model.hparams["guidance"]["scale"] == 1.3
    quickstart = _differing_options(
        _parse("fashion_mnist_cond.yaml"), _parse("fashion_mnist.yaml", "overlays/cond.yaml")
    )
    # `make train`: guidance at s = 5 limited to sigma in (0.2, 2.0] in 10 steps, EDM's log-normal noise levels with
    # the loss unweighted (its comment; docs/quality.md)
    distribution = {f"model.timestep_distribution.{key}" for key in ("class_path", "init_args.mean", "init_args.std")}
    assert quickstart == {"run_name", "model.guidance.scale", "model.guidance.interval", "model.sampling.steps",
                          "model.training.loss_weighting", *distribution}  # fmt: skip


def test_the_gpu_folder_recipes_are_the_cifar10_recipe_plus_their_differences() -> None:
    """folder64.yaml and folder256.yaml read cifar10.yaml (`config:`) and override only what differs: the trainer,
    callbacks, EMA and FID blocks are written once. The dpm_solver overlay swaps the sampler and nothing else, on
    every GPU recipe (their nets shrunk to 8 base channels on both sides of each comparison: memory)."""
    small = ("--model.net.init_args.base_channels", "8", "--model.net.init_args.norm_groups", "4")
    cifar10 = _parse("cifar10.yaml", extra=small)
    assert {key.split(".")[0] for key in _differing_options(cifar10, _parse("folder256.yaml", extra=small))} == {
        "run_name", "trainer", "model", "data", "fid"
    }  # fmt: skip
    folder64 = _parse("folder64.yaml", extra=small)
    assert folder64.model.hparams["training"]["objective"] == "hybrid" and folder64.model.net.out_channels == 6
    assert folder64.trainer.callbacks[0].__class__.__name__ == "TQDMProgressBar"  # cifar10.yaml's
    for name in ("cifar10.yaml", "cifar10_cond.yaml", "cifar10_vdm.yaml", "folder256.yaml", "mnist.yaml"):
        fast = _differing_options(_parse(name, extra=small), _parse(name, "overlays/dpm_solver.yaml", extra=small))
        sampling = {"model.sampling.sampler", "model.sampling.steps", "model.sampling.skip"}
        assert fast <= sampling and "model.sampling.sampler" in fast, name
    with pytest.raises(ConfigError, match="dpmpp_2m does not read --model.sampling.variance learned"):
        _parse("folder64.yaml", "overlays/dpm_solver.yaml", extra=small)
    _parse("folder64.yaml", "overlays/dpm_solver.yaml", extra=(*small, "--model.sampling.variance", "fixed_small"))


def test_bad_sampler_option_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="--model.sampling.eta must be in"):
        cli_main(["--config", CONFIG, "--model.sampling.eta", "1.5"], run=False)


@pytest.mark.slow
@needs_fashion_mnist
def test_classifier_cli_trains_a_guidance_classifier(tmp_path: Path, tiny_unet) -> None:
    from src.classifier_module import ClassifierModule
    from src.models.classifier import NoisyClassifier
    from src.module import DiffusionModule

    cli_main(["fit", "--config", str(REPO / "configs" / "fashion_mnist_classifier.yaml"),
              "--model.net.init_args.base_channels", "8", "--model.net.init_args.norm_groups", "4",
              "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1",
              "--data.batch_size", "8", "--data.val_size", "16", "--trainer.default_root_dir", str(tmp_path),
              "--logger_backend", "csv", "--trainer.enable_progress_bar", "false"],
             model_class=ClassifierModule)  # fmt: skip
    (path,) = tmp_path.glob("fashion_mnist_classifier/version_0/classifier.pt")
    classifier = NoisyClassifier.load(str(path))
    assert classifier.num_classes == 10 and classifier.config["base_channels"] == 8
    # The file is what --model.guidance.classifier_path takes: classifier guidance samples with it.
    net = tiny_unet(channel_mult=(1, 2, 2), image_size=28, mid_attention=True)
    module = DiffusionModule(
        net, sampling=Sampling(steps=2), guidance=Guidance(classifier_path=str(path), classifier_scale=1.0)
    )
    images = module.model.sample(module.model.initial_noise(torch.arange(2)))
    assert images.shape == (2, 1, 28, 28) and torch.isfinite(images).all()


# ------------------------------------------------------------------------------------------------ review fixes
@pytest.mark.slow
@needs_fashion_mnist
def test_classifier_guided_predict_through_the_cli(tmp_path: Path) -> None:
    """Lightning predicts under torch.inference_mode(), where the classifier's gradient needs care."""
    from src.models.classifier import NoisyClassifier

    ckpt = _fit(tmp_path / "runs", 2)
    classifier = tmp_path / "classifier.pt"
    NoisyClassifier(num_classes=10, in_channels=1, base_channels=8, channel_mult=(1, 2), image_size=28,
                    norm_groups=4).save(str(classifier))  # fmt: skip
    out = tmp_path / "guided"
    _predict(ckpt, tmp_path / "runs", out, "--model.guidance.classifier_path", str(classifier),
             "--model.guidance.classifier_scale", "2", "--model.sampling.sampler", "ddpm_respaced")  # fmt: skip
    # An unconditional net guided by a classifier: labels in turn, in the file names.
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{i % 10}_{i}.png" for i in range(5))


@pytest.mark.slow
@needs_fashion_mnist
@pytest.mark.parametrize("sampler", ["ddim", "ddpm_respaced"])
def test_stochastic_predict_is_the_same_at_every_batch_size(tmp_path: Path, sampler: str) -> None:
    """Sample i depends on (seed, i) alone, also for samplers that add noise at every step (DDIM with eta = 1;
    ddpm_respaced always, and it does not read --model.sampling.eta)."""
    ckpt = _fit(tmp_path / "runs", 2)
    files = {}
    eta = ["--model.sampling.eta", "1"] if sampler == "ddim" else []
    for batch in ("2", "5"):
        out = tmp_path / f"batch{batch}"
        _predict(
            ckpt, tmp_path / "runs", out, "--model.sampling.sampler", sampler, *eta, "--data.predict_batch_size", batch
        )
        files[batch] = {p.name: p.read_bytes() for p in out.iterdir()}
    assert files["2"] == files["5"] and len(set(files["2"].values())) == 5


def continued_equals_uninterrupted(tmp_path: Path, *extra: str) -> Path:
    """Train 6 steps (mid-epoch: 4 batches of 4 per epoch), then continue the same run to 10 steps from the last.ckpt
    written when max_steps ended it, and assert it equals the 10-step run bit for bit (weights, every state-dict
    entry, optimizer state). `extra`: options of both runs. Returns the 10-step run's last.ckpt."""
    data = ["--data.data_dir", str(_fake_data(tmp_path)), "--trainer.val_check_interval", "4",
            "--trainer.limit_val_batches", "1", "--data.batch_size", "4", "--data.val_size", "8",
            "--trainer.callbacks", json.dumps([{"class_path": "src.callbacks.checkpoint.ModelCheckpoint",
                                                 "init_args": {"save_last": True, "save_top_k": 0,
                                                               "every_n_train_steps": 4}}])]  # fmt: skip

    def fit(root: Path, steps: int, *more: str) -> Path:
        cli_main(["fit", *TINY, *extra, *data, "--trainer.default_root_dir", str(root), "--trainer.max_steps",
                  str(steps), *more])  # fmt: skip
        (ckpt,) = root.glob("*/version_0/checkpoints/last.ckpt")
        return ckpt

    straight_path = fit(tmp_path / "straight", 10)
    straight = torch.load(straight_path, weights_only=False, map_location="cpu")
    first = torch.load(fit(tmp_path / "continued", 6), weights_only=False, map_location="cpu")
    assert first["global_step"] == 6  # not the periodic step-4 checkpoint: the steps after it are kept
    continued = torch.load(fit(tmp_path / "continued", 10, "--ckpt_path", "last"), weights_only=False,
                           map_location="cpu")  # fmt: skip
    assert continued["global_step"] == straight["global_step"] == 10
    assert continued["epoch"] == straight["epoch"]
    assert continued["state_dict"].keys() == straight["state_dict"].keys()
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, continued["state_dict"][key]), key
    for (i, a), (_, b) in zip(straight["optimizer_states"][0]["state"].items(),
                              continued["optimizer_states"][0]["state"].items()):  # fmt: skip
        for name in a:
            assert torch.equal(torch.as_tensor(a[name]), torch.as_tensor(b[name])), (i, name)
    return straight_path


@pytest.mark.slow
@needs_fashion_mnist
def test_continuing_a_finished_run_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    continued_equals_uninterrupted(tmp_path)


def _fake_data(tmp_path: Path) -> Path:
    from test_faults import write_fake_fashion_mnist

    return write_fake_fashion_mnist(tmp_path / "data", n_train=24, n_test=8)


@pytest.mark.parametrize("subcommand", ["fit", "predict"])
def test_a_bad_sampler_option_is_one_line(subcommand: str, tmp_path: Path) -> None:
    # predict: --allow_untrained true, so that the option, not the missing checkpoint, is what fails.
    where = ["--output_dir", str(tmp_path / "x"), "--allow_untrained", "true"]
    where = where if subcommand == "predict" else ["--run_name", str(tmp_path / "x")]
    result = subprocess.run([sys.executable, "-m", "src.main", subcommand, "--config", CONFIG, "--model.sampling.eta", "7",
                             *where],
                            cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode != 0
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert lines == ["error: --model.sampling.eta must be in [0, 1], got 7.0"], lines


@pytest.mark.slow
@needs_fashion_mnist
def test_bf16_mixed_with_clipping_and_the_fused_optimizer(tmp_path: Path) -> None:
    """The GPU configs' combination (Lightning's mixed-precision plugin refuses to clip for fused optimizers)."""
    ckpt = _fit(tmp_path / "runs", 2, "--trainer.precision", "bf16-mixed", "--trainer.gradient_clip_val", "0.5")
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert state["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
