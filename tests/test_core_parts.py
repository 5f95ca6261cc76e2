"""The core's seams: the diffusion process (src/diffusion/process.py) and the first stage (src/models/first_stage.py).

A fixed schedule seen as a process is the schedule itself (its float64 tables, bit for bit); a learned schedule
defined outside src/ (tests/my_extensions.py) trains through the command line and resumes exactly; an identity first
stage changes nothing, and a fixed invertible one (pixel-unshuffle, also outside src/) trains and predicts
image-sized PNGs through the command line, from checkpoints and exports alike.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from my_extensions import LearnedLinearLogSNR, PixelUnshuffleStage
from PIL import Image
from test_cli import _fit, _predict, continued_equals_uninterrupted, needs_fashion_mnist

from src.diffusion.continuous import DiscreteVPDenoiser
from src.diffusion.losses import l_simple
from src.diffusion.parameterization import training_target, x0_from_prediction
from src.diffusion.process import DiffusionProcess, DiscreteProcess
from src.diffusion.samplers import SAMPLER_ARGUMENTS, SAMPLERS, is_continuous
from src.diffusion.schedule import NoiseSchedule
from src.errors import ConfigError
from src.main import cli_main
from src.models.diffusion import DiffusionModel
from src.models.first_stage import FirstStage
from src.options import Guidance, Sampling, Schedule

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist.yaml")
SCHEDULES = {
    "linear": lambda: NoiseSchedule.linear(1000),
    "cosine": lambda: NoiseSchedule.cosine(1000),
    "scaled_linear": lambda: NoiseSchedule.from_diffusers(
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
    ),
    "given_betas": lambda: NoiseSchedule(torch.linspace(1e-3, 0.05, 50, dtype=torch.float64)),
}


class TableLogSNR(DiffusionProcess):
    """A generic process (no table access of its own) whose log SNR interpolates a schedule's: its discretization
    must give back that schedule."""

    def __init__(self, schedule: NoiseSchedule) -> None:
        super().__init__(schedule.num_timesteps)
        a = schedule.alphas_cumprod
        self.register_buffer("table", (a / (1 - a)).log())

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        return self.table[t.long()]


@pytest.mark.parametrize("name", SCHEDULES)
def test_a_fixed_schedule_as_a_process_is_the_schedule(name: str) -> None:
    schedule = SCHEDULES[name]()
    process = DiscreteProcess(schedule)
    t = torch.arange(schedule.num_timesteps)
    x = torch.zeros(t.numel(), 1, dtype=torch.float64)
    # Integer t: the schedule's own float64 tables, bit for bit.
    alpha, sigma = process.alpha_sigma(t, x)
    assert torch.equal(alpha.flatten(), schedule.sqrt_alphas_cumprod)
    assert torch.equal(sigma.flatten(), schedule.sqrt_one_minus_alphas_cumprod)
    a = schedule.alphas_cumprod
    torch.testing.assert_close(process.log_snr(t), (a / (1 - a)).log(), rtol=0, atol=1e-12)
    torch.testing.assert_close(process.snr_at(t), schedule.snr, rtol=1e-12, atol=0)
    # Fractional t: the continuous samplers' interpolation (linear in log sigma = -log SNR / 2).
    fractional = torch.tensor([0.25, 3.5, schedule.num_timesteps - 1.75], dtype=torch.float64)
    sigmas = DiscreteVPDenoiser(lambda x, t: x, schedule).t_to_sigma(fractional)
    torch.testing.assert_close((-process.log_snr(fractional) / 2).exp(), sigmas, rtol=1e-12, atol=0)
    alpha, sigma = process.alpha_sigma(fractional, torch.zeros(3, 1, dtype=torch.float64))
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(3, 1, dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(sigma.flatten() / alpha.flatten(), sigmas, rtol=1e-12, atol=0)
    # A generic process discretizes back to the same tables (alpha-bar_t = sigmoid(log SNR(t))).
    rebuilt = TableLogSNR(schedule).schedule
    torch.testing.assert_close(rebuilt.alphas_cumprod, a, rtol=1e-12, atol=0)
    torch.testing.assert_close(rebuilt.betas, schedule.betas, rtol=1e-9, atol=0)


def test_losses_and_conversions_read_a_process_as_the_schedule() -> None:
    schedule = NoiseSchedule.cosine(100)
    process = DiscreteProcess(schedule)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 1, 8, 8, generator=gen), torch.randn(4, 1, 8, 8, generator=gen)
    t = torch.tensor([0, 5, 50, 99])
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    model = lambda x, t: net(x)  # noqa: E731
    for prediction in ("eps", "x0", "v"):
        assert torch.equal(l_simple(model, x0, process, t, noise, prediction),
                           l_simple(model, x0, schedule, t, noise, prediction))  # fmt: skip
        assert torch.equal(training_target(prediction, x0, noise, process, t),
                           training_target(prediction, x0, noise, schedule, t))  # fmt: skip
        assert torch.equal(x0_from_prediction(prediction, noise, x0, process, t),
                           x0_from_prediction(prediction, noise, x0, schedule, t))  # fmt: skip


def test_a_learned_process_is_differentiable_and_its_schedule_follows_its_parameters() -> None:
    process = LearnedLinearLogSNR(timesteps=100)
    x0 = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.randint(0, 100, (8,), generator=torch.Generator().manual_seed(1))
    loss = l_simple(lambda x, t: x, x0, process, t, prediction="eps").mean()
    loss.backward()
    assert process.endpoints.grad is not None and bool((process.endpoints.grad != 0).all())
    before = process.schedule
    assert process.schedule is before  # cached while the parameters do not change
    torch.testing.assert_close((before.snr).log()[[0, -1]], process.endpoints.detach().double(), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        process.endpoints.add_(torch.tensor([0.5, -0.5]))
    after = process.schedule
    assert after is not before and after.alphas_cumprod[0] > before.alphas_cumprod[0]


def _state(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, weights_only=False)["state_dict"]


def _pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.iterdir())}


LEARNED = ["--model.process", "my_extensions.LearnedLinearLogSNR"]


@pytest.mark.slow
@needs_fashion_mnist
def test_a_learned_schedule_trains_through_the_cli_and_resumes_exactly(tmp_path: Path) -> None:
    """tests/test_cli.py's uninterrupted-run check with a learned schedule: 6 steps, continued to 10, equal bit for
    bit to the 10-step run (net, schedule parameters, their averages, optimizer state)."""
    straight = continued_equals_uninterrupted(tmp_path, *LEARNED)
    state = _state(straight)
    start = torch.tensor([9.0, -10.0])
    # Trained (the optimizer holds it), averaged into the sampling copy, both in the checkpoint.
    assert not torch.equal(state["process.endpoints"], start)
    assert not torch.equal(state["model.process.endpoints"], start)
    assert not torch.equal(state["model.process.endpoints"], state["process.endpoints"])
    # The checkpoint alone rebuilds the learned process (DiffusionModel.load, predict), and an export keeps it.
    model = DiffusionModel.load(straight)
    assert isinstance(model.process, LearnedLinearLogSNR)
    assert torch.equal(model.process.endpoints, state["model.process.endpoints"])
    _predict(straight, tmp_path / "r", tmp_path / "ckpt_pngs")
    export = model.save(tmp_path / "export")
    assert (export / "process.safetensors").is_file()
    again = DiffusionModel.load(export)
    assert torch.equal(again.process.endpoints, model.process.endpoints)
    torch.testing.assert_close(again.schedule.alphas_cumprod, model.schedule.alphas_cumprod, rtol=0, atol=0)
    indices = torch.arange(3)
    assert torch.equal(again.sample_indices(indices, steps=3), model.sample_indices(indices, steps=3))


@pytest.mark.slow
@needs_fashion_mnist
def test_an_identity_first_stage_trains_and_samples_bit_identically(tmp_path: Path) -> None:
    plain = _fit(tmp_path / "plain", 4)
    identity = _fit(tmp_path / "identity", 4, "--model.first_stage", "src.models.first_stage.FirstStage")
    a, b = _state(plain), _state(identity)
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key
    _predict(plain, tmp_path / "r", tmp_path / "plain_pngs")
    _predict(identity, tmp_path / "r", tmp_path / "identity_pngs")
    plain_pngs, identity_pngs = _pngs(tmp_path / "plain_pngs"), _pngs(tmp_path / "identity_pngs")
    assert plain_pngs.keys() == identity_pngs.keys() and len(plain_pngs) == 5
    for name, image in plain_pngs.items():
        assert np.array_equal(image, identity_pngs[name]), name


UNSHUFFLE = [
    "--model.first_stage", "my_extensions.PixelUnshuffleStage",
    "--model.net.init_args.in_channels", "4",
    "--model.net.init_args.image_size", "14",
    "--model.net.init_args.channel_mult", "[1, 2]",
]  # fmt: skip


@pytest.mark.slow
@needs_fashion_mnist
def test_an_invertible_first_stage_trains_and_predicts_image_sized_pngs(tmp_path: Path) -> None:
    ckpt = _fit(tmp_path / "runs", 4, *UNSHUFFLE)
    grids = sorted((tmp_path / "runs").glob("*/version_*/samples/step_*.png"))
    assert grids, "fit wrote no sample grid"
    _predict(ckpt, tmp_path / "runs", tmp_path / "pngs", *UNSHUFFLE)
    pngs = _pngs(tmp_path / "pngs")
    assert len(pngs) == 5 and all(image.shape == (28, 28) for image in pngs.values())
    model = DiffusionModel.load(ckpt)
    assert isinstance(model.first_stage, PixelUnshuffleStage)
    assert model.latent_shape == (4, 14, 14) and model.image_shape == (1, 28, 28)
    # The PNGs are the decoded samples: sample i from the checkpoint, in Python, equals predict's file.
    images = model.sample_indices(torch.arange(5))
    expected = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()
    by_index = {int(name.split(".")[0]): image for name, image in pngs.items()}
    assert max(int(np.abs(expected[i].astype(int) - by_index[i].astype(int)).max()) for i in range(5)) <= 1
    export = model.save(tmp_path / "export")
    assert (export / "first_stage.safetensors").is_file()
    again = DiffusionModel.load(export)
    assert isinstance(again.first_stage, PixelUnshuffleStage)
    assert torch.equal(again.sample_indices(torch.arange(2)), model.sample_indices(torch.arange(2)))


def test_a_first_stage_with_unbounded_latents_refuses_static_clipping(tiny_unet) -> None:
    class Unbounded(FirstStage):
        latent_range = None

    from src.diffusion.sampler_settings import SamplerSettings

    with pytest.raises(ConfigError, match="clip_denoised false"):
        DiffusionModel(tiny_unet(), NoiseSchedule.linear(10), settings=SamplerSettings(steps=5, clip_x0=True),
                       first_stage=Unbounded())  # fmt: skip
    model = DiffusionModel(tiny_unet(), NoiseSchedule.linear(10), settings=SamplerSettings(steps=5),
                           first_stage=Unbounded())  # fmt: skip
    assert model.first_stage is not None and not model.first_stage.training


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_step_callback_reaches_every_sampler_through_the_model(sampler: str, tiny_unet) -> None:
    from src.diffusion.sampler_settings import SamplerSettings

    steps = {"steps": 3} if "steps" in SAMPLER_ARGUMENTS[sampler] else {}
    model = DiffusionModel(tiny_unet(), NoiseSchedule.linear(20), "v", SamplerSettings(sampler=sampler, **steps))
    x_T = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    seen: list[dict] = []
    out = model.sample(x_T, generator=torch.Generator().manual_seed(1), callback=seen.append)
    assert seen, sampler
    assert [step["i"] for step in seen] == list(range(len(seen)))
    keys = {"x0", "t"} if not is_continuous(sampler) else {"denoised", "sigma"}
    assert all({"x", *keys} <= set(step) for step in seen), sampler
    assert torch.equal(out, model.sample(x_T, generator=torch.Generator().manual_seed(1)))  # watching changes nothing


# ---------------------------------------------------------------------------------------------- the objective
def _gaussian_eps(schedule: NoiseSchedule, v_value: float | None = None):
    """The exact eps of N(0.1, 0.5^2) data, optionally with a constant learned-variance output v (2C channels)."""

    def model(x_t, t):
        a = schedule.alphas_cumprod[t].to(x_t.dtype).view(-1, 1, 1, 1)
        eps = (1 - a).sqrt() * (x_t - a.sqrt() * 0.1) / (a * 0.25 + 1 - a)
        return eps if v_value is None else torch.cat([eps, torch.full_like(eps, v_value)], dim=1)

    return model


def test_the_bound_of_a_learned_variance_at_its_ends_is_the_fixed_variances_bound() -> None:
    """One formula for every use of the bound: test/bpd of a learned variance (now reported) with v = -1 is the
    fixed_small bound, and with v = +1 the fixed_large one at every t >= 1 (they differ only in the decoder's
    variance at t = 0, beta_0 against beta-tilde_1, as in the improved-DDPM code)."""
    from src.diffusion.likelihood import nll_bits_per_dim, vb_terms

    schedule = NoiseSchedule.linear(50)
    x0 = (torch.randint(0, 256, (4, 1, 4, 4), generator=torch.Generator().manual_seed(0)) / 127.5 - 1).double()
    small = nll_bits_per_dim(_gaussian_eps(schedule), x0, schedule, None, "fixed_small",
                             generator=torch.Generator().manual_seed(1))  # fmt: skip
    learned = nll_bits_per_dim(_gaussian_eps(schedule, -1.0), x0, schedule, None, "learned",
                               generator=torch.Generator().manual_seed(1))  # fmt: skip
    for key in small:
        torch.testing.assert_close(learned[key], small[key], rtol=1e-12, atol=0)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for t in (1, 7, 49):
        tt = torch.full((4,), t)
        torch.testing.assert_close(vb_terms(_gaussian_eps(schedule, 1.0), x0, tt, schedule, noise, "learned"),
                                   vb_terms(_gaussian_eps(schedule), x0, tt, schedule, noise, "fixed_large"),
                                   rtol=1e-12, atol=0)  # fmt: skip


def test_the_bound_as_the_objective_is_the_likelihood_term_and_trains_the_mean() -> None:
    from src.diffusion.likelihood import vb_terms
    from src.diffusion.losses import l_hybrid, l_vlb, learned_variance_vb

    schedule = NoiseSchedule.linear(50)
    gen = torch.Generator().manual_seed(0)
    x0 = (torch.randint(0, 256, (4, 1, 4, 4), generator=gen) / 127.5 - 1).double()
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 3, 20, 49])
    dims_ln2 = x0[0].numel() * math.log(2.0)
    exact = lambda x, t: _gaussian_eps(schedule)(x.float(), t)  # noqa: E731  float32, as vb_terms feeds a model
    for variance in ("fixed_small", "fixed_large"):  # DDPM's "true bound": L_t / (D ln 2) of the likelihood's terms
        terms = l_vlb(exact, x0, schedule, t, noise, "eps", variance)
        torch.testing.assert_close(terms["vb"], vb_terms(exact, x0, t, schedule, noise, variance) / dims_ln2,
                                   rtol=1e-10, atol=0)  # fmt: skip
        torch.testing.assert_close(terms["loss"], 50 * terms["vb"], rtol=0, atol=0)
    # Learned variance: the vb of L_hybrid, but the gradient reaches the mean (L_hybrid detaches it).
    net = torch.nn.Conv2d(1, 2, 3, padding=1).double()
    model = lambda x, t: net(x)  # noqa: E731
    vlb = l_vlb(model, x0, schedule, t, noise, "eps", "learned")
    x_t = schedule.q_sample(x0, t, noise)
    out = net(x_t)
    torch.testing.assert_close(vlb["vb"], learned_variance_vb(out[:, :1], out[:, 1:], x0, x_t, t, schedule))
    mean_grad = torch.autograd.grad(vlb["loss"].sum(), net.weight)[0][0]
    hybrid_vb_grad = torch.autograd.grad(l_hybrid(model, x0, schedule, t, noise)["vb"].sum(), net.weight)[0][0]
    assert mean_grad.abs().sum() > 0 and hybrid_vb_grad.abs().sum() == 0


def test_the_objective_is_chosen_in_config_not_by_the_channel_count(tiny_module, tiny_unet) -> None:
    with pytest.raises(ConfigError, match="--model.training.objective hybrid .Improved DDPM. or vlb"):
        tiny_module(tiny_unet(out_channels=2))
    with pytest.raises(ConfigError, match="--model.training.objective hybrid trains a learned variance"):
        tiny_module(objective="hybrid")
    with pytest.raises(ConfigError, match="--model.training.loss_weighting min_snr weights L_simple"):
        tiny_module(objective="vlb", loss_weighting="min_snr")
    with pytest.raises(ConfigError, match="not a learned process"):
        tiny_module(objective="vlb", process=LearnedLinearLogSNR(timesteps=50))
    with pytest.raises(ConfigError, match="--model.training.objective"):
        tiny_module(objective="no_such_objective")
    assert tiny_module(tiny_unet(out_channels=2), objective="hybrid").objective == "hybrid"
    assert tiny_module(tiny_unet(out_channels=2), objective="vlb").objective == "vlb"


@pytest.mark.slow
@needs_fashion_mnist
def test_objectives_train_through_the_cli(tmp_path: Path) -> None:
    """An objective of one's own (tests/my_extensions.py) that writes L_simple out again trains bit for bit as the
    built-in simple objective; the bound trains too, and logs its term."""
    logged = ["--model.training.loss_weighting", "none", "--trainer.log_every_n_steps", "1"]
    plain = _state(_fit(tmp_path / "simple", 3, *logged))
    own = _state(_fit(tmp_path / "own", 3, *logged, "--model.training.objective", "my_extensions.l_simple_again"))
    assert plain.keys() == own.keys()
    for key, value in plain.items():
        assert torch.equal(value, own[key]), key
    metrics = (next((tmp_path / "own").rglob("metrics.csv"))).read_text().splitlines()[0]
    assert "train/t_mean" in metrics
    vlb = _state(_fit(tmp_path / "vlb", 3, *logged, "--model.training.objective", "vlb"))
    assert not torch.equal(vlb["net.conv_in.weight"], plain["net.conv_in.weight"])


# ---------------------------------------------------------------------------------------------- optimizer parts
@pytest.mark.parametrize(
    ("given", "line"),
    [
        (["--model.lr", "0.01"], "error: unrecognized arguments: --model.lr 0.01 (--model.lr moved to --model.optimizer.lr)"),
        (["--model.warmup_steps", "3"], "error: unrecognized arguments: --model.warmup_steps 3 (--model.warmup_steps moved "
                                        "to --model.lr_scheduler.warmup_steps)"),
        (["--config", "OLD"], "error: Group 'model' does not accept option 'fused_optimizer' (--model.fused_optimizer moved "
                              "to --model.optimizer.fused)"),
    ],
)  # fmt: skip
def test_the_old_optimizer_flags_fail_in_one_line_naming_the_new_ones(given, line, tmp_path: Path) -> None:
    import subprocess
    import sys

    old = tmp_path / "old.yaml"
    old.write_text("model:\n  fused_optimizer: false\n")
    given = [str(old) if arg == "OLD" else arg for arg in given]
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "src.main", "fit", "--config", "configs/fashion_mnist.yaml", *given,
                           "--print_config"], cwd=repo, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode != 0
    assert (done.stdout + done.stderr).strip().splitlines()[0] == line


def test_the_optimizer_and_schedule_are_parts_chosen_in_config() -> None:
    from src.optim import AdamW, LinearWarmup

    cli = cli_main(["--config", CONFIG, "--model.optimizer", "torch.optim.SGD",
                    "--model.optimizer.lr", "0.05", "--model.optimizer.momentum", "0.9",
                    "--model.lr_scheduler.warmup_steps", "7"], run=False)  # fmt: skip
    config = cli.model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert type(optimizer) is torch.optim.SGD and optimizer.defaults["momentum"] == 0.9
    assert isinstance(scheduler, LinearWarmup) and config["lr_scheduler"]["interval"] == "step"
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 / 7)  # the warm-up's first step
    # Every trained parameter, and only those: the net's (and a learned process's), never the EMA copy's.
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == {id(p) for p in cli.model.trained_parameters()}
    # The defaults: DDPM's AdamW (fused on the CPU) and the config's warm-up.
    default = cli_main(["--config", CONFIG], run=False).model.configure_optimizers()
    assert type(default["optimizer"]) is AdamW and default["optimizer"].defaults["fused"]
    assert default["optimizer"].defaults["lr"] == 0.002 and default["optimizer"].defaults["weight_decay"] == 0.0


# ---------------------------------------------------------------------------------------------- continuous time
def test_a_schedule_answers_at_fractional_timesteps_as_the_continuous_samplers_interpolate() -> None:
    schedule = NoiseSchedule.linear(1000)
    t = torch.tensor([0.0, 0.3, 17.5, 998.9, 999.0], dtype=torch.float64)
    x = torch.zeros(5, 1, dtype=torch.float64)
    alpha, sigma = schedule.alpha_sigma(t, x)
    sigmas = DiscreteVPDenoiser(lambda x, t: x, schedule).t_to_sigma(t)
    torch.testing.assert_close(sigma.flatten() / alpha.flatten(), sigmas, rtol=1e-12, atol=0)
    integer = torch.tensor([0, 17, 999])
    fractional = integer.to(torch.float64)  # integer-valued floats give the table values
    for a, b in zip(schedule.alpha_sigma(integer, x[:3]), schedule.alpha_sigma(fractional, x[:3]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-15, atol=0)
    torch.testing.assert_close(schedule.snr_at(fractional), schedule.snr[integer], rtol=1e-12, atol=0)


def test_every_wrapper_works_at_continuous_levels_so_nothing_rounds_by_type(tiny_unet) -> None:
    """EpsPredictor's conversion (and so classifier guidance's eps-model) at fractional t agrees with converting
    the raw output at each exact level; a classifier-guided module samples with heun at fractional timesteps."""
    from src.diffusion.parameterization import EpsPredictor
    from src.diffusion.samplers import sample

    schedule = NoiseSchedule.linear(50)
    net = tiny_unet().eval()
    x_T = torch.randn(2, *(1, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in net.parameters():  # a non-trivial output layer
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        exact = sample(net, x_T, schedule, sampler="heun", steps=4, prediction="v")
        wrapped = sample(EpsPredictor(net, schedule, "v"), x_T, schedule, sampler="heun", steps=4)
    torch.testing.assert_close(wrapped, exact, rtol=1e-4, atol=1e-4)


def test_classifier_guidance_runs_the_continuous_samplers_at_fractional_timesteps(tmp_path: Path, tiny_unet,
                                                                                   monkeypatch) -> None:  # fmt: skip
    from src.models.classifier import NoisyClassifier
    from src.module import DiffusionModule

    classifier = NoisyClassifier(num_classes=4, in_channels=1, base_channels=8, channel_mult=(1, 2), image_size=8,
                                 norm_groups=4, attn_resolutions=(4,))  # fmt: skip
    classifier.save(str(tmp_path / "clf.pt"))
    seen: list[float] = []
    forward = NoisyClassifier.forward

    def recording(self, x, t):
        seen.extend(t.flatten().tolist())
        return forward(self, x, t)

    monkeypatch.setattr(NoisyClassifier, "forward", recording)
    module = DiffusionModule(
        tiny_unet(),
        schedule=Schedule(timesteps=50),
        sampling=Sampling(sampler="heun", steps=3),
        guidance=Guidance(classifier_path=str(tmp_path / "clf.pt"), classifier_scale=2.0),
    )
    images = module.predict_step(torch.arange(3), 0)["images"]
    assert torch.isfinite(images).all()
    assert seen and any(t != round(t) for t in seen), "the classifier saw integer timesteps only"
