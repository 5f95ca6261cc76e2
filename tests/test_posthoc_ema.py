"""Post-hoc EMA (Karras et al. 2024, EDM2): the sigma_rel <-> gamma relation, the profiles' inner products against
quadrature, the warm-up EMA as a gamma = 8 power function, reconstruction on a synthetic trajectory, and the
callback and command through the CLI (snapshots, exact resume, exports that DiffusionModel.load reads)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from scipy import integrate
from test_faults import TINY_CLI, write_fake_fashion_mnist
from test_resume import SyntheticData

from src.callbacks.posthoc_ema import PROCESS_PREFIX, PostHocEMA
from src.callbacks.rng_state import RNGStateCallback
from src.diffusion.schedule import NoiseSchedule
from src.errors import ConfigError
from src.main import cli_main
from src.models.diffusion import CHECKPOINT_EMA_PREFIX, DiffusionModel
from src.models.ema import ema_decay, update_ema
from src.models.posthoc_ema import (
    combine_state_dicts,
    gamma_to_sigma_rel,
    posthoc_coefficients,
    power_ema_beta,
    profile_error,
    profile_inner_product,
    sigma_rel_to_gamma,
    update_power_ema,
    warmup_ema_weights,
)
from src.models.unet import UNet
from src.posthoc_ema import early_ema_guide, parse_early_ema, read_headers, reconstruct, snapshot_files
from src.posthoc_ema import main as posthoc_main


def test_sigma_rel_gamma_round_trip() -> None:
    # EDM2 Section 3: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94.
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    for sigma_rel in (0.01, 0.03, 0.0905, 0.2, 0.29):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-10)
    for gamma in (0.5, 8.0, 50.0):
        assert sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)) == pytest.approx(gamma, rel=1e-9)
    # The profile's std / t by quadrature: sigma_rel is what the name says.
    gamma = 6.94
    p = lambda tau: (gamma + 1) * tau**gamma  # noqa: E731  (t = 1)
    mean = integrate.quad(lambda tau: tau * p(tau), 0, 1)[0]
    var = integrate.quad(lambda tau: (tau - mean) ** 2 * p(tau), 0, 1)[0]
    assert np.sqrt(var) == pytest.approx(gamma_to_sigma_rel(gamma), rel=1e-8)
    for bad in (0.0, -0.1, 0.31):
        with pytest.raises(ValueError, match="sigma_rel must be in"):
            sigma_rel_to_gamma(bad)


def test_profile_inner_product_matches_quadrature() -> None:
    def profile(t: float, gamma: float):
        return lambda tau: (gamma + 1) * tau**gamma / t ** (gamma + 1) if tau <= t else 0.0

    for t_a, g_a, t_b, g_b in [(100, 6.94, 100, 16.97), (40, 3.0, 100, 16.97), (100, 8.0, 37, 0.5), (5, 1, 5, 1)]:
        expected = integrate.quad(lambda tau: profile(t_a, g_a)(tau) * profile(t_b, g_b)(tau), 0, min(t_a, t_b),
                                  epsabs=0, epsrel=1e-12)[0]  # fmt: skip
        assert float(profile_inner_product(t_a, g_a, t_b, g_b)) == pytest.approx(expected, rel=1e-9)
        assert float(profile_inner_product(t_b, g_b, t_a, g_a)) == pytest.approx(expected, rel=1e-12)


def test_power_ema_tracks_the_power_profile() -> None:
    # Unrolled on one-hot weights, EDM2 Eq. 3 gives each step's weight in the average; the first step copies.
    steps, gamma = 400, 6.94
    average = torch.zeros(steps, dtype=torch.float64)
    for t in range(1, steps + 1):
        update_power_ema([average], [torch.nn.functional.one_hot(torch.tensor(t - 1), steps).double()], t, gamma)
    assert power_ema_beta(1, gamma) == 0.0
    assert average.sum().item() == pytest.approx(1.0, abs=1e-12)
    tau = np.arange(1, steps + 1)
    continuous = (gamma + 1) * tau**gamma / steps ** (gamma + 1)
    late = tau > steps // 4  # the discrete and continuous profiles agree where tau >> 1
    np.testing.assert_allclose(average.numpy()[late], continuous[late], rtol=0.05)


def test_warmup_ema_is_a_power_function_ema_with_gamma_8() -> None:
    # The module's EMA (src/module.py: decay ema_decay(global_step) after each optimizer step, global_step = 1, 2,
    # ...) unrolled on one-hot weights: theta_0 (the initial copy) and theta_1..theta_N.
    num_steps = 300
    basis = torch.eye(num_steps + 1, dtype=torch.float64)
    average, trained = torch.nn.Linear(num_steps + 1, 1, bias=False).double(), torch.nn.Linear(1, 1).double()
    average.weight.data = basis[0:1].clone()
    trained = torch.nn.Linear(num_steps + 1, 1, bias=False).double()
    for step in range(1, num_steps + 1):
        trained.weight.data = basis[step : step + 1].clone()
        update_ema(average, trained, ema_decay(step, decay=1.0, warmup=True))
    np.testing.assert_allclose(average.weight.data[0].numpy(), warmup_ema_weights(num_steps), rtol=1e-10, atol=1e-15)
    # A degree-8 polynomial: the tau^8 profile of gamma = 8 (sigma_rel 0.0905) on (0, T] with tau = n + 5.5 (the
    # middle of n + 2 .. n + 9) and T = N + 6 (of N + 2 .. N + 10): the time origin shifted by about 6 steps.
    n = np.arange(num_steps // 2, num_steps + 1)
    power = 9 * (n + 5.5) ** 8 / (num_steps + 6) ** 9
    np.testing.assert_allclose(warmup_ema_weights(num_steps)[n], power, rtol=2e-3)
    assert gamma_to_sigma_rel(8.0) == pytest.approx(0.0905, abs=5e-5)


def synthetic_trajectory(steps: int, dim: int = 256, seed: int = 0) -> torch.Tensor:
    """Weights of a noisy optimisation: a decaying drift towards a moving target plus per-step noise (float64)."""
    generator = torch.Generator().manual_seed(seed)
    target = torch.randn(dim, generator=generator, dtype=torch.float64)
    theta = torch.zeros(dim, dtype=torch.float64)
    path = [theta.clone()]
    for t in range(1, steps + 1):
        lr = 0.02 / (1 + t / 1000) ** 0.5
        target += 0.002 * torch.randn(dim, generator=generator, dtype=torch.float64)
        theta += lr * (target - theta) + 0.03 * torch.randn(dim, generator=generator, dtype=torch.float64)
        path.append(theta.clone())
    return torch.stack(path)  # path[t]: the weights after step t


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_reconstruction_from_16_snapshots_matches_a_tracked_ema(dtype: torch.dtype) -> None:
    """Two tracked lengths (0.05, 0.10) snapshotted at 8 steps (16 snapshots) reconstruct a third length tracked
    directly, and the warm-up EMA, to within 2% of their distance from the raw weights."""
    steps, every = 4096, 512
    path = synthetic_trajectory(steps)
    tracked = {s: path[0].clone() for s in (0.05, 0.10, 0.07, 0.15)}
    warmup = path[0].clone()
    snapshots: list[tuple[int, float, torch.Tensor]] = []
    for t in range(1, steps + 1):
        for sigma_rel, average in tracked.items():
            update_power_ema([average], [path[t]], t, sigma_rel_to_gamma(sigma_rel))
        warmup.lerp_(path[t], 1 - ema_decay(t, decay=1.0, warmup=True))
        if t % every == 0:
            snapshots += [(t, sigma_rel_to_gamma(s), tracked[s].to(dtype, copy=True)) for s in (0.05, 0.10)]
    assert len(snapshots) == 16
    # Lengths between the tracked ones within 2% (measured: 0.9% and 0.4% in float64); 0.15 lies beyond them, an
    # extrapolation the snapshots express less well (2.7%; 0.3% with 32 snapshots).
    targets = [(0.07, tracked[0.07], 0.02), (gamma_to_sigma_rel(8.0), warmup, 0.02), (0.15, tracked[0.15], 0.04)]
    for sigma_rel, expected, tolerance in targets:
        x = posthoc_coefficients(
            [s[0] for s in snapshots], [s[1] for s in snapshots], steps, sigma_rel_to_gamma(sigma_rel)
        )
        state = combine_state_dicts((c, {"w": s[2]}) for c, s in zip(x, snapshots, strict=True))
        distance = (state["w"].double() - expected).norm() / (expected - path[-1]).norm()
        assert distance < tolerance, (sigma_rel, distance.item())
        assert float(x.sum()) == pytest.approx(
            1.0, abs=0.02
        )  # about mass 1 (not a constraint of the least-squares fit)
        assert profile_error([s[0] for s in snapshots], [s[1] for s in snapshots], x, steps,
                             sigma_rel_to_gamma(sigma_rel)) < 0.05  # fmt: skip
    # A snapshot's own profile is reproduced exactly: coefficient 1 on it, 0 elsewhere.
    t_last, g_last = snapshots[-1][0], snapshots[-1][1]
    x = posthoc_coefficients([s[0] for s in snapshots], [s[1] for s in snapshots], t_last, g_last)
    np.testing.assert_allclose(x, np.eye(16)[-1], atol=1e-6)


POSTHOC = [
    {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True, "save_top_k": 0}},
    {"class_path": "src.callbacks.posthoc_ema.PostHocEMA",
     "init_args": {"sigma_rels": [0.05, 0.10], "every_n_steps": 2, "dtype": "float32"}},
]  # fmt: skip


def test_cli_fit_writes_snapshots_and_the_command_exports_them(tmp_path: Path, capsys, caplog) -> None:
    root = tmp_path / "runs"
    data = ["--data.data_dir", str(write_fake_fashion_mnist(tmp_path / "data", n_train=24, n_test=8))]
    cli_main(["fit", *TINY_CLI, *data, "--trainer.default_root_dir", str(root), "--trainer.max_steps", "7",
              "--trainer.limit_val_batches", "0", "--trainer.callbacks", json.dumps(POSTHOC)])  # fmt: skip
    (run,) = root.glob("*/version_*")
    files = snapshot_files(run)
    assert [f.name for f in files] == [f"step_{s:08d}.pt" for s in (2, 4, 6, 7)]  # every 2 steps and the last
    headers = read_headers(files)
    assert [h["gammas"] for h in headers] == [[sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)]] * 4

    # At a snapshot's own length and step the reconstruction is that snapshot.
    state, summary = reconstruct(headers, 0.10, step=6)
    snapshot = torch.load(files[2], weights_only=True)["averages"][1]
    for key, value in snapshot.items():
        torch.testing.assert_close(state[key], value.float(), rtol=1e-5, atol=1e-6)
    assert summary["snapshots"] == 3

    out = tmp_path / "phema"
    posthoc_main([str(run), "--sigma_rel", "0.07", "0.1", "--out_dir", str(out)])
    posthoc_main([str(run), "--sigma_rel", "0.1", "--out_dir", str(out), "--format", "ckpt"])
    printed = capsys.readouterr().out
    assert "sigma_rel 0.070" in printed and "profile error" in printed
    exported = DiffusionModel.load(out / "sigma_rel_0.100")
    final = torch.load(files[-1], weights_only=True)["averages"][1]
    for key, value in exported.net.state_dict().items():
        torch.testing.assert_close(value, final[key].float(), rtol=1e-5, atol=1e-6)
    # The .ckpt copy samples through predict like any checkpoint, with the reconstructed weights as its EMA.
    ckpt = out / "sigma_rel_0.100.ckpt"
    weights = torch.load(ckpt, weights_only=True)["state_dict"]
    for key, value in final.items():
        torch.testing.assert_close(weights[CHECKPOINT_EMA_PREFIX + key], value.float(), rtol=1e-5, atol=1e-6)
    cli_main(["predict", *TINY_CLI, *data, "--ckpt_path", str(ckpt), "--trainer.default_root_dir", str(root),
              "--data.num_samples", "2", "--output_dir", str(tmp_path / "pngs")])  # fmt: skip
    assert len(list((tmp_path / "pngs").glob("*.png"))) == 2
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        posthoc_main([str(run), "--sigma_rel", "0.07", "--out_dir", str(out)])
    with pytest.raises(SystemExit, match="no post-hoc EMA snapshots"):
        posthoc_main([str(tmp_path), "--sigma_rel", "0.07", "--out_dir", str(out)])

    # Autoguidance by the run's own early EMA (--model.guidance.model posthoc_ema@<fraction>): the snapshot step
    # nearest to the fraction of the run's 7 steps (0.5: 4, not 2), sigma_rel 0.05, reconstructed as the command does;
    # guided by it alone (a = 0), predict writes exactly what that guide's own checkpoint writes.
    last = run / "checkpoints" / "last.ckpt"
    guide, summary = early_ema_guide(last, 0.5)
    assert (summary["step"], summary["of_steps"], summary["sigma_rel"]) == (4, 7, 0.05)
    expected = reconstruct(headers, 0.05, step=4)[0]
    assert all(torch.equal(value, expected[key].float()) for key, value in guide.net.state_dict().items())
    posthoc_main([str(run), "--sigma_rel", "0.05", "--step", "4", "--out_dir", str(out), "--format", "ckpt"])

    def predict(name: str, ckpt: Path, *extra: str) -> list[bytes]:
        cli_main(["predict", *TINY_CLI, *data, "--ckpt_path", str(ckpt), "--trainer.default_root_dir", str(root),
                  "--data.num_samples", "2", "--output_dir", str(tmp_path / name), *extra])  # fmt: skip
        return [p.read_bytes() for p in sorted((tmp_path / name).iterdir())]

    early = ["--model.guidance.model", "posthoc_ema@0.5", "--model.guidance.autoguidance_scale"]
    assert predict("guide_alone", last, *early, "0") == predict("guide_file", out / "sigma_rel_0.050.ckpt")
    assert predict("guided", last, *early, "2") != predict("unguided", last)
    assert "this run's EMA (sigma_rel 0.05) at step 4 of 7" in caplog.text
    for command, ckpt, message in [
        (
            "predict",
            ckpt,
            r"no post-hoc EMA snapshots in \S+phema/posthoc_ema .* --model.guidance.autoguidance_scale 1\)",
        ),
        ("fit", None, r"posthoc_ema@0.5 guides a trained run's sampling \(predict, validate or test"),
    ]:
        more = ["--ckpt_path", str(ckpt), "--output_dir", str(tmp_path / "bad")] if ckpt else []
        with pytest.raises(ConfigError, match=message) as error:
            cli_main(
                [command, *TINY_CLI, *data, "--trainer.default_root_dir", str(tmp_path / "bad"), *more, *early, "2"]
            )
        assert "\n" not in str(error.value) and not (tmp_path / "bad").exists()


def test_a_learned_process_is_averaged_and_reconstructed_with_the_network(tmp_path: Path) -> None:
    """A learned schedule (tests/my_extensions.py's LearnedLinearLogSNR) is trained beside the network, so its post-hoc
    average belongs in the snapshots: the export, the .ckpt copy and the early-EMA guide get the network and the
    schedule of the same average, not the reconstructed network with the run's own EMA of the schedule."""
    root = tmp_path / "runs"
    data = ["--data.data_dir", str(write_fake_fashion_mnist(tmp_path / "data", n_train=24, n_test=8))]
    cli_main(["fit", *TINY_CLI, *data, "--trainer.default_root_dir", str(root), "--trainer.max_steps", "4",
              "--trainer.limit_val_batches", "0", "--trainer.callbacks", json.dumps(POSTHOC),
              "--model.process", "my_extensions.LearnedLinearLogSNR", "--model.evaluation.bpd_timesteps", "0"])  # fmt: skip
    (run,) = root.glob("*/version_*")
    files = snapshot_files(run)
    snapshot = torch.load(files[-1], weights_only=True)["averages"][1]  # sigma_rel 0.10 at the last step
    assert sorted(k for k in snapshot if "::" in k) == [PROCESS_PREFIX + "endpoints"]
    endpoints = snapshot[PROCESS_PREFIX + "endpoints"]
    last = run / "checkpoints" / "last.ckpt"
    weights = torch.load(last, weights_only=True)["state_dict"]
    assert not torch.equal(endpoints, weights["model.process.endpoints"])  # not the run's own EMA
    assert not torch.equal(endpoints, torch.tensor([9.0, -10.0]))  # trained

    out = tmp_path / "phema"
    posthoc_main([str(run), "--sigma_rel", "0.1", "--out_dir", str(out)])
    posthoc_main([str(run), "--sigma_rel", "0.1", "--out_dir", str(out), "--format", "ckpt"])
    exported = DiffusionModel.load(out / "sigma_rel_0.100")
    torch.testing.assert_close(exported.process.endpoints, endpoints, rtol=1e-5, atol=1e-6)
    copied = torch.load(out / "sigma_rel_0.100.ckpt", weights_only=True)["state_dict"]
    torch.testing.assert_close(copied["model.process.endpoints"], endpoints, rtol=1e-5, atol=1e-6)
    assert torch.equal(copied["process.endpoints"], weights["process.endpoints"])  # the trained one, untouched
    guide, summary = early_ema_guide(last, 0.5)
    assert summary["step"] == 2
    expected = reconstruct(read_headers(files), 0.05, step=2)[0]
    assert torch.equal(guide.process.endpoints.detach(), expected[PROCESS_PREFIX + "endpoints"])


def test_early_ema_guide_names() -> None:
    assert parse_early_ema("posthoc_ema@0.25") == (0.25, 0.05)
    assert parse_early_ema("posthoc_ema@.3,0.1") == (0.3, 0.1)
    assert parse_early_ema("runs/guides/sigma_rel_0.050.ckpt") is None and parse_early_ema(None) is None
    with pytest.raises(ConfigError, match=r"the fraction of the run is in \(0, 1\)"):
        parse_early_ema("posthoc_ema@1.5")
    net = UNet(in_channels=1, image_size=8, base_channels=8, channel_mult=[1], num_res_blocks=1, attn_resolutions=[],
               dropout=0.0, norm_groups=4)  # fmt: skip
    model = DiffusionModel(net, NoiseSchedule.linear(100), guidance_model="posthoc_ema@0.25", autoguidance_scale=2.0)
    with pytest.raises(ConfigError, match=r"in Python, pass it with set_guide\(src.posthoc_ema.early_ema_guide"):
        model.guide()


def test_bad_options_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="sigma_rel must be in"):
        PostHocEMA(sigma_rels=[0.5])
    with pytest.raises(ConfigError, match="every_n_steps >= 1"):
        PostHocEMA(every_n_steps=0)


def _fit(root: Path, max_steps: int, ckpt_path: str | None, make_module) -> PostHocEMA:
    L.seed_everything(0)
    callback = PostHocEMA(sigma_rels=[0.05, 0.10], every_n_steps=3)
    checkpoints = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, save_top_k=0, every_n_train_steps=4)
    trainer = L.Trainer(default_root_dir=root, max_steps=max_steps, accelerator="cpu", logger=False,
                        callbacks=[checkpoints, RNGStateCallback(), callback], limit_val_batches=0, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    trainer.fit(make_module(), datamodule=SyntheticData(batch_size=8, val_size=8), ckpt_path=ckpt_path)
    return callback


def test_resumed_run_continues_the_averages_exactly(tmp_path: Path, tiny_module_28) -> None:
    reference = _fit(tmp_path / "reference", 10, None, tiny_module_28)
    _fit(tmp_path / "stopped", 4, None, tiny_module_28)
    resumed = _fit(tmp_path / "stopped", 10, str(tmp_path / "stopped" / "checkpoints" / "last.ckpt"), tiny_module_28)
    assert resumed.step == reference.step == 10
    for expected, got in zip(reference.averages, resumed.averages, strict=True):
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=0)
    names = sorted(p.name for p in (tmp_path / "stopped" / "posthoc_ema").glob("*.pt"))
    assert names == [f"step_{s:08d}.pt" for s in (3, 4, 6, 9, 10)]  # 4: the first run's end
