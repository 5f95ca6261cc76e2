"""Multi-process runs through the command line, as a cluster job runs them: 2 CPU processes (DDP over gloo).

Each run has a time limit and is killed with its whole process group when it passes it, so a hang (a collective
that only some ranks call) fails the test instead of stalling the suite.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_faults import write_fake_fashion_mnist

REPO = Path(__file__).resolve().parents[1]
DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
TINY_NET = [
    "--model.net.init_args.base_channels", "8",
    "--model.net.init_args.norm_groups", "4",
    "--model.net.init_args.channel_mult", "[1, 2]",
    "--model.net.init_args.attn_resolutions", "[14]",
    "--model.sampling.steps", "2",
    "--data.batch_size", "4",
    "--data.val_size", "8",
    "--logger_backend", "csv",
    "--trainer.enable_model_summary", "false",
]  # fmt: skip

# Every callback class the shipped configs list (configs/**/*.yaml), at periods small enough to fire in a few steps;
# the periodic FID callback the README describes comes with the --fid options (with the offline stand-in extractor).
EVERY_CALLBACK = [
    {"class_path": "lightning.pytorch.callbacks.TQDMProgressBar", "init_args": {"refresh_rate": 50}},
    {"class_path": "src.callbacks.time_budget.TimeBudget", "init_args": {"duration": "00:00:30:00"}},
    {
        "class_path": "src.callbacks.checkpoint.ModelCheckpoint",
        "init_args": {"save_last": True, "save_top_k": -1, "every_n_train_steps": 2},
    },
    {"class_path": "src.callbacks.sampling.SampleGrid", "init_args": {"every_n_steps": 2, "num_samples": 4}},
    {"class_path": "src.callbacks.posthoc_ema.PostHocEMA", "init_args": {"every_n_steps": 3, "dtype": "float16"}},
]
FID_OPTIONS = ["--fid.extractor", "standin", "--fid.ref_split", "test", "--fid.batch_size", "4"]
PERIODIC_FID = ["--fid.every_n_steps", "2", "--fid.num_samples", "6"]


def config_callbacks() -> set[str]:
    """The callback classes of every shipped config."""
    import yaml

    names = set()
    for path in (REPO / "configs").rglob("*.yaml"):  # the data sets' files and the overlays
        for callback in (yaml.safe_load(path.read_text()).get("trainer") or {}).get("callbacks") or []:
            names.add(callback["class_path"])
    return names


def run(args: list[str], timeout: float, module: str = "src.main", env: dict | None = None) -> tuple[int, str]:
    """`python -m module args` in its own process group; (return code, output). A run past `timeout` is killed
    with all its processes and fails the test as a hang."""
    process = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})  # fmt: skip
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"hung: no exit within {timeout} s\n{output[-3000:]}")
    return process.returncode, output


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("data"), n_train=48, n_test=12)


@pytest.fixture(scope="module")
def ddp_fit(tmp_path_factory, data: Path) -> tuple[Path, str]:
    """A 2-process fit with every shipped callback (grids, checkpoints, periodic FID, signal handling), 4 steps."""
    root = tmp_path_factory.mktemp("runs")
    code, output = run(["fit", "--config", "configs/fashion_mnist.yaml", *TINY_NET, *DDP, *FID_OPTIONS, *PERIODIC_FID,
                        "--data.data_dir", str(data), "--trainer.default_root_dir", str(root),
                        "--fid.cache_dir", str(root / "fid_cache"),
                        "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
                        "--trainer.limit_val_batches", "1", "--trainer.callbacks", json.dumps(EVERY_CALLBACK)],
                       timeout=600)  # fmt: skip
    assert code == 0, output[-3000:]
    return root, output


@pytest.mark.slow
def test_the_callbacks_tested_here_are_those_the_configs_ship() -> None:
    assert config_callbacks() <= {c["class_path"] for c in EVERY_CALLBACK} | {"src.callbacks.fid.FIDCallback"}


@pytest.mark.slow
def test_two_process_fit_with_every_callback_ends_and_checkpoints_once(ddp_fit: tuple[Path, str]) -> None:
    root, output = ddp_fit
    (run_dir,) = root.glob("fashion_mnist/version_*")  # one run folder, not one per rank
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"], names
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["step_0000002.png", "step_0000004.png"]
    # Post-hoc EMA snapshots: rank 0 writes each once (step 3, and the last step), in the one run folder.
    snapshots = sorted(p.name for p in (run_dir / "posthoc_ema").iterdir())
    assert snapshots == ["step_00000003.pt", "step_00000004.pt"], snapshots
    assert torch.load(run_dir / "posthoc_ema" / snapshots[-1], weights_only=True)["step"] == 4
    metrics = (run_dir / "metrics.csv").read_text()
    assert "val/fid_standin" in metrics and "val/loss" in metrics


@pytest.mark.slow
def test_two_process_predict_writes_each_sample_once_as_one_process_does(ddp_fit: tuple[Path, str], tmp_path: Path,
                                                                         data: Path) -> None:  # fmt: skip
    root, _ = ddp_fit
    (ckpt,) = root.glob("fashion_mnist/version_*/checkpoints/last.ckpt")
    # DDIM with eta = 1: a stochastic sampler, whose per-step noise must also depend on the sample index alone (the
    # config's DPM-Solver++(2M) is deterministic and does not read --model.sampling.eta).
    common = ["predict", "--config", "configs/fashion_mnist.yaml", *TINY_NET, "--ckpt_path", str(ckpt),
              "--data.data_dir", str(data), "--model.sampling.sampler", "ddim", "--model.sampling.eta", "1", "--data.num_samples", "5",
              "--trainer.default_root_dir", str(tmp_path / "runs")]  # fmt: skip
    outputs = {}
    for name, extra in {
        "ddp": [*DDP, "--data.predict_batch_size", "2"],
        "one": ["--data.predict_batch_size", "5"],
    }.items():
        code, output = run([*common, *extra, "--output_dir", str(tmp_path / name), "--grid_path",
                            str(tmp_path / f"{name}.png")], timeout=300)  # fmt: skip
        assert code == 0, output[-3000:]
        outputs[name] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / name).iterdir()}
    assert sorted(outputs["ddp"]) == [f"{i}.png" for i in range(5)]
    assert len(set(outputs["ddp"].values())) == 5  # distinct samples
    assert outputs["ddp"] == outputs["one"]  # byte for byte, whatever the processes and batch size
    # One grid of all 5 samples (each process wrote its share; rank 0 tiles them), the same as one process's.
    assert (tmp_path / "ddp.png").read_bytes() == (tmp_path / "one.png").read_bytes()


@pytest.mark.slow
def test_validate_fid_equals_the_previous_implementation_on_one_and_two_processes(
    ddp_fit: tuple[Path, str], tmp_path: Path, data: Path
) -> None:
    """`validate --fid.num_samples N` (the torchmetrics FrechetDistance of FIDCallback) against the previous
    implementation's math on the same samples: `sample_indices` of 0..N-1, the stand-in features, pytorch-fid's
    statistics (`feature_statistics`: mean and np.cov) and `frechet_distance`, the reference being the test split."""
    from src.data import load_dataset
    from src.images import to_uint8
    from src.metrics.features import StandInFeatures
    from src.metrics.fid import feature_statistics, frechet_distance
    from src.module import DiffusionModule

    root, _ = ddp_fit
    (ckpt,) = root.glob("fashion_mnist/version_*/checkpoints/last.ckpt")
    num_samples = 7  # not divisible by the 2 processes
    logged = {}
    for name, extra in {"one": [], "ddp": DDP}.items():
        out = tmp_path / name
        code, output = run(["validate", "--config", "configs/fashion_mnist.yaml", *TINY_NET, *extra, *FID_OPTIONS,
                            "--ckpt_path", str(ckpt), "--fid.num_samples", str(num_samples),
                            "--fid.cache_dir", str(out / "fid_cache"), "--data.data_dir", str(data),
                            "--trainer.default_root_dir", str(out), "--trainer.limit_val_batches", "1"],
                           timeout=300)  # fmt: skip
        assert code == 0, output[-3000:]
        (metrics,) = out.glob("fashion_mnist/version_*/metrics.csv")
        (value,) = [row["val/fid_standin"] for row in csv.DictReader(metrics.open()) if row.get("val/fid_standin")]
        logged[name] = float(value)

    module = DiffusionModule.load_from_checkpoint(ckpt, map_location="cpu")
    extractor = StandInFeatures()
    with torch.no_grad():
        samples = to_uint8(module.model.sample_indices(torch.arange(num_samples)))
        pool = extractor(samples)["pool"].double().numpy()
        reference = extractor(load_dataset("fashion_mnist", "test", str(data))[0])["pool"].double().numpy()
    previous = frechet_distance(*feature_statistics(pool), *feature_statistics(reference))
    print(f"val/fid_standin: 1 process {logged['one']!r}, 2 processes {logged['ddp']!r}, previous math {previous!r}")
    assert previous > 0
    assert logged["one"] == pytest.approx(previous, rel=1e-6)
    assert logged["ddp"] == pytest.approx(previous, rel=1e-6)


@pytest.mark.slow
def test_two_process_classifier_training_ends_and_saves_the_classifier(tmp_path: Path, data: Path) -> None:
    code, output = run(["fit", "--config", "configs/fashion_mnist_classifier.yaml", *DDP,
                        "--model.net.init_args.base_channels", "8", "--model.net.init_args.norm_groups", "4",
                        "--model.net.init_args.channel_mult", "[1, 2]", "--model.net.init_args.attn_resolutions", "[]",
                        "--data.batch_size", "4", "--data.val_size", "8", "--data.data_dir", str(data),
                        "--logger_backend", "csv", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
                        "--trainer.default_root_dir", str(tmp_path)],
                       timeout=300, module="src.classifier_main")  # fmt: skip
    assert code == 0, output[-3000:]
    assert len(list(tmp_path.rglob("classifier.pt"))) == 1


@pytest.mark.slow
@pytest.mark.parametrize("to", ["rank0", "every_rank"])
def test_sigterm_stops_both_processes_after_one_checkpoint(tmp_path: Path, data: Path, to: str) -> None:
    """`timeout` signals rank 0 only; SLURM and Ctrl-C signal every rank: either way both ranks agree to stop after
    the same step."""
    callbacks = [{"class_path": "src.callbacks.checkpoint.ModelCheckpoint",
                  "init_args": {"save_last": True, "save_top_k": 0, "every_n_train_steps": 1}}]  # fmt: skip
    args = ["fit", "--config", "configs/fashion_mnist.yaml", *TINY_NET, *DDP, "--data.data_dir", str(data),
            "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "100000",
            "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks", json.dumps(callbacks)]  # fmt: skip
    process = subprocess.Popen([sys.executable, "-m", "src.main", *args], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not list(tmp_path.glob("*/version_0/checkpoints/last.ckpt")):  # training is under way
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0][-3000:]
            time.sleep(0.2)
        if to == "rank0":
            process.send_signal(signal.SIGTERM)
        else:
            os.killpg(process.pid, signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"hung after SIGTERM\n{process.communicate()[0][-3000:]}")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, output[-3000:]
    assert output.count("Stopping on a signal after step") == 1  # rank 0's message, once
    (last,) = tmp_path.glob("*/version_0/checkpoints/last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] >= 1


WAITS_IN_A_COLLECTIVE = """
import signal, sys, datetime
import torch.distributed as dist
from src.signals import exit_on_second_signal
exit_on_second_signal()
signal.signal(signal.SIGTERM, lambda *a: None)  # like Lightning's: only sets a flag
print("waiting", flush=True)
# Rank 0 of 2: waits in C++ for a peer that never comes, where no Python signal handler can run.
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=2,
                        timeout=datetime.timedelta(seconds=600))
"""


@pytest.mark.slow
def test_a_second_sigterm_ends_a_process_that_waits_in_a_collective(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-c", WAITS_IN_A_COLLECTIVE.format(port=port)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        assert process.stdout.readline().strip() == "waiting"
        time.sleep(2)
        process.send_signal(signal.SIGTERM)
        time.sleep(2)
        assert process.poll() is None  # the first SIGTERM asks, it does not kill
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM
    assert "second termination signal" in process.stdout.read()


@pytest.mark.slow
def test_one_sigterm_ends_a_running_predict(ddp_fit: tuple[Path, str], tmp_path: Path, data: Path) -> None:
    """Lightning's predict loop never looks at its SIGTERM flag; predict has nothing to save, so it ends at once."""
    root, _ = ddp_fit
    (ckpt,) = root.glob("fashion_mnist/version_*/checkpoints/last.ckpt")
    out = tmp_path / "pngs"
    args = ["predict", "--config", "configs/fashion_mnist.yaml", *TINY_NET, "--ckpt_path", str(ckpt),
            "--data.data_dir", str(data), "--data.num_samples", "100000", "--data.predict_batch_size", "2",
            "--model.sampling.steps", "50", "--output_dir", str(out), "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    process = subprocess.Popen([sys.executable, "-m", "src.main", *args], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not (out.is_dir() and any(out.iterdir())):  # sampling is under way
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0][-3000:]
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert all(p.suffix == ".png" for p in out.iterdir())  # whole files only (each written atomically)


@pytest.mark.slow
def test_two_process_fit_with_a_learned_schedule_and_a_first_stage(tmp_path: Path, data: Path) -> None:
    """The core's seams under DDP: a learned schedule (its parameters all-reduced with the net's) and a frozen first
    stage (no gradients, which DDP would otherwise wait for), both defined outside src/ (tests/my_extensions.py);
    predict then writes image-sized PNGs."""
    parts = ["--model.process", "my_extensions.LearnedLinearLogSNR", "--model.first_stage",
             "my_extensions.PixelUnshuffleStage", "--model.net.init_args.in_channels", "4",
             "--model.net.init_args.image_size", "14", "--model.net.init_args.attn_resolutions", "[7]"]  # fmt: skip
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    code, output = run(["fit", "--config", "configs/fashion_mnist.yaml", *TINY_NET, *DDP, *parts,
                        "--data.data_dir", str(data), "--trainer.default_root_dir", str(tmp_path / "runs"),
                        "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0", "--trainer.callbacks",
                        json.dumps(EVERY_CALLBACK)], timeout=600, env=env)  # fmt: skip
    assert code == 0, output[-3000:]
    (ckpt,) = (tmp_path / "runs").glob("fashion_mnist/version_*/checkpoints/last.ckpt")
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert not torch.equal(state["process.endpoints"], torch.tensor([9.0, -10.0]))
    code, output = run(["predict", "--config", "configs/fashion_mnist.yaml", *TINY_NET, *DDP, *parts, "--ckpt_path",
                        str(ckpt), "--data.data_dir", str(data), "--data.num_samples", "3", "--output_dir",
                        str(tmp_path / "pngs"), "--trainer.default_root_dir", str(tmp_path / "runs")],
                       timeout=300, env=env)  # fmt: skip
    assert code == 0, output[-3000:]
    from PIL import Image

    sizes = {Image.open(p).size for p in (tmp_path / "pngs").glob("*.png")}
    assert len(list((tmp_path / "pngs").glob("*.png"))) == 3 and sizes == {(28, 28)}


@pytest.mark.slow
def test_two_process_vdm_fit_trains_its_schedule_and_tests_its_bound(tmp_path: Path, data: Path) -> None:
    """configs/fashion_mnist_vdm.yaml under DDP: gamma' by autograd inside the step does not upset DDP's gradient
    reduction, the learned ends move identically on both processes (one checkpoint), and test's bound and its
    standard error are reduced over both."""
    vdm = ["--config", "configs/fashion_mnist_vdm.yaml", *TINY_NET, *DDP, "--data.data_dir", str(data),
           "--trainer.default_root_dir", str(tmp_path / "runs")]  # fmt: skip
    code, output = run(["fit", *vdm, "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0",
                        "--trainer.callbacks", json.dumps(EVERY_CALLBACK)], timeout=600)  # fmt: skip
    assert code == 0, output[-3000:]
    (ckpt,) = (tmp_path / "runs").glob("fashion_mnist_vdm/version_*/checkpoints/last.ckpt")
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert not torch.equal(state["process.bias"], torch.tensor([-13.3]))
    code, output = run(["test", *vdm, "--ckpt_path", str(ckpt), "--model.evaluation.bpd_timesteps", "2",
                        "--logger_backend", "csv"], timeout=600)  # fmt: skip
    assert code == 0, output[-3000:]
    assert "test/bpd_se" in output and "test/diffusion_bpd" in output


@pytest.mark.slow
def test_two_process_sliced_score_matching_fit_ends(tmp_path: Path, data: Path) -> None:
    """configs/fashion_mnist_ncsn.yaml with --model.training.objective ssm under DDP: the double backward of its
    Jacobian-vector product inside the step, reduced across processes like any gradient; predict then runs annealed
    Langevin dynamics on both processes."""
    ncsn = ["--config", "configs/fashion_mnist_ncsn.yaml", *TINY_NET, *DDP, "--data.data_dir", str(data),
            "--trainer.default_root_dir", str(tmp_path / "runs")]  # fmt: skip
    code, output = run(["fit", *ncsn, "--model.training.objective", "ssm", "--trainer.max_steps", "3",
                        "--trainer.limit_val_batches", "0", "--trainer.callbacks", json.dumps(EVERY_CALLBACK)],
                       timeout=600)  # fmt: skip
    assert code == 0, output[-3000:]
    (ckpt,) = (tmp_path / "runs").glob("fashion_mnist_ncsn/version_*/checkpoints/last.ckpt")
    code, output = run(["predict", *ncsn, "--ckpt_path", str(ckpt), "--data.num_samples", "3", "--output_dir",
                        str(tmp_path / "pngs"), "--model.sampling.options", "{langevin_steps: 2}"], timeout=300)  # fmt: skip
    assert code == 0, output[-3000:]
    assert len(list((tmp_path / "pngs").glob("*.png"))) == 3


@pytest.mark.slow
def test_two_process_autoencoder_then_latent_diffusion(tmp_path: Path, data: Path) -> None:
    """Latent diffusion's two stages under DDP: the autoencoder with its discriminator (two optimizers, manual
    optimization; the discriminator starts at step 2), then configs/fashion_mnist_latent.yaml on its file, whose
    latent scale is measured on both processes' first batches; predict decodes image-sized PNG files."""
    autoencoder = ["--config", "configs/fashion_mnist_autoencoder.yaml", *DDP, "--data.data_dir", str(data),
                   "--trainer.default_root_dir", str(tmp_path / "runs"), "--data.batch_size", "4", "--data.val_size", "8",
                   "--logger_backend", "csv",
                   "--model.net.init_args.block_out_channels", "[8, 16, 16]", "--model.net.init_args.norm_num_groups",
                   "4", "--model.disc_start", "2", "--model.disc_layers", "2", "--model.disc_channels", "8"]  # fmt: skip
    code, output = run(["fit", *autoencoder, "--trainer.max_steps", "4", "--trainer.val_check_interval", "4",
                        "--trainer.limit_val_batches", "1"], timeout=600, module="src.autoencoder_main")  # fmt: skip
    assert code == 0, output[-3000:]
    (path,) = (tmp_path / "runs").glob("fashion_mnist_autoencoder/version_*/autoencoder.pt")
    latent = ["--config", "configs/fashion_mnist_latent.yaml", *TINY_NET, *DDP, "--data.data_dir", str(data),
              "--trainer.default_root_dir", str(tmp_path / "runs"), "--model.first_stage.init_args.path", str(path),
              "--model.net.init_args.attn_resolutions", "[4]"]  # fmt: skip
    code, output = run(["fit", *latent, "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0"], timeout=600)
    assert code == 0, output[-3000:]
    (ckpt,) = (tmp_path / "runs").glob("fashion_mnist_latent/version_*/checkpoints/last.ckpt")
    assert torch.isfinite(torch.load(ckpt, weights_only=True)["state_dict"]["model.first_stage.latent_std"]).all()
    code, output = run(["predict", *latent, "--ckpt_path", str(ckpt), "--data.num_samples", "3", "--output_dir",
                        str(tmp_path / "pngs")], timeout=300)  # fmt: skip
    assert code == 0, output[-3000:]
    assert len(list((tmp_path / "pngs").glob("*.png"))) == 3
