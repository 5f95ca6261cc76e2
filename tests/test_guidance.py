"""Classifier-free and classifier guidance (src/diffusion/guidance.py) on toy conditional models, and a tiny
class-conditional DiffusionModule trained with label dropout and sampled with guidance."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from src.diffusion.continuous import vp_sigmas
from src.diffusion.guidance import (
    ClassifierGuidance,
    check_interval,
    classifier_free_guidance,
    drop_labels,
    guidance_scale_from_w,
    timestep_sigma,
)
from src.diffusion.samplers import sample
from src.diffusion.schedule import NoiseSchedule
from src.module import DiffusionModule
from src.optim import LinearWarmup
from src.options import Guidance, Sampling, Schedule

NUM_CLASSES = 3
NULL = NUM_CLASSES


class ToyConditional:
    """eps(x, t, y): smooth, label-dependent, float64; records the batch size of every call."""

    num_classes = NUM_CLASSES

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []

    def __call__(self, x, t, y):
        self.batch_sizes.append(x.shape[0])
        shape = (-1,) + (1,) * (x.ndim - 1)
        yy = y.to(x.dtype).reshape(shape)
        return torch.tanh(x * (1 + 0.3 * yy)) + 0.01 * t.to(x.dtype).reshape(shape) * (yy - 1.5)


X = torch.randn(5, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
T_ = torch.tensor([0, 10, 100, 500, 999])
Y = torch.tensor([0, 1, 2, 1, 0])


def test_w0_is_the_conditional_and_w_minus_1_the_unconditional_model() -> None:
    model = ToyConditional()
    assert torch.equal(classifier_free_guidance(model, Y, w=0.0)(X, T_), model(X, T_, Y))
    assert torch.equal(classifier_free_guidance(model, Y, w=-1.0)(X, T_), model(X, T_, torch.full_like(Y, NULL)))
    assert torch.equal(classifier_free_guidance(model, Y, guidance_scale=1.0)(X, T_), model(X, T_, Y))


@pytest.mark.parametrize("w", [0.5, 3.0, -0.25])
def test_guided_eps_formula_in_one_batched_forward(w: float) -> None:
    model = ToyConditional()
    guided = classifier_free_guidance(model, Y, guidance_scale=guidance_scale_from_w(w))
    out = guided(X, T_)
    assert model.batch_sizes == [2 * X.shape[0]]  # conditional and unconditional in one forward of size 2B
    expected = (1 + w) * model(X, T_, Y) - w * model(X, T_, torch.full_like(Y, NULL))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(classifier_free_guidance(model, Y, w=w)(X, T_), out, rtol=0, atol=0)


def test_extra_channels_are_not_guided() -> None:
    def model(x, t, y):
        return torch.cat([ToyConditional()(x, t, y), y.to(x.dtype).reshape(-1, 1, 1, 1).expand_as(x)], dim=1)

    out = classifier_free_guidance(model, Y, guidance_scale=4.0, null_label=NULL)(X, T_)
    assert out.shape[1] == 4 and torch.equal(out[:, 2:], model(X, T_, Y)[:, 2:])


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        classifier_free_guidance(ToyConditional(), Y, guidance_scale=2.0, w=1.0)
    with pytest.raises(ValueError, match="one label per image"):
        classifier_free_guidance(ToyConditional(), Y[:2], w=1.0)(X, T_)


def test_drop_labels_rate() -> None:
    y = torch.zeros(20000, dtype=torch.int64)
    dropped = drop_labels(y, 0.1, NULL, torch.Generator().manual_seed(0))
    assert set(dropped.unique().tolist()) == {0, NULL}
    assert abs((dropped == NULL).double().mean().item() - 0.1) < 0.01
    assert torch.equal(drop_labels(y, 0.0, NULL), y)


def test_classifier_guidance_shifts_eps_by_the_log_prob_gradient() -> None:
    """Linear classifier logits = x W: grad log p(y | x) = W_y - sum_k p_k W_k, in closed form."""
    schedule = NoiseSchedule.linear(1000)
    weight = torch.randn(18, NUM_CLASSES, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def classifier(x, t):
        return x.flatten(1) @ weight

    def eps_model(x, t):
        return 0.5 * x

    out = ClassifierGuidance(eps_model, classifier, Y, 2.0, schedule)(X, T_)
    probs = torch.softmax(classifier(X, T_), dim=-1)
    grad = (weight.T[Y] - probs @ weight.T).reshape(X.shape)
    sigma = schedule.sqrt_one_minus_alphas_cumprod[T_].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(out, 0.5 * X - sigma * 2.0 * grad, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------- DiffusionModule
@pytest.fixture
def tiny_conditional(tiny_module, tiny_unet):
    """A factory of tiny class-conditional modules: `tiny_conditional(out_channels=None, **module_overrides)`."""

    def make(out_channels: int | None = None, **kwargs) -> DiffusionModule:
        net = tiny_unet(num_classes=NUM_CLASSES, out_channels=out_channels)
        return tiny_module(
            net,
            **{"lr_scheduler": partial(LinearWarmup, warmup_steps=1), "ema_decay": 0.5, "ema_warmup": False, **kwargs},
        )

    return make


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(24, 1, 8, 8, generator=g) * 2 - 1
    labels = torch.randint(0, NUM_CLASSES, (24,), generator=g)
    return DataLoader(list(zip(images, labels, strict=True)), batch_size=8)


def fit(module: DiffusionModule, root: Path, steps: int = 3) -> None:
    L.Trainer(default_root_dir=root, max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False).fit(module, loader())  # fmt: skip


# The learned variance is read by the DDPM samplers only (a ddim module with it is refused): configured with one.
LEARNED = dict(prediction="v", out_channels=2, ddpm_variance="learned", sampler="ddpm_respaced", objective="hybrid")


@pytest.mark.parametrize("extra", [dict(), LEARNED])
def test_conditional_module_trains_with_label_dropout_and_samples_with_guidance(
    tmp_path: Path, extra, tiny_conditional
) -> None:
    module = tiny_conditional(p_uncond=0.5, guidance_scale=3.0, **extra)
    seen = []
    forward = module.net.forward
    module.net.forward = lambda x, t, y=None: seen.append(y.clone()) or forward(x, t, y)
    fit(module, tmp_path)
    labels_seen = torch.cat(seen)
    assert (labels_seen == NULL).any() and (labels_seen < NULL).any()  # p_uncond dropped some labels, not all
    with torch.no_grad():  # make the EMA net depend on its inputs (the zero-initialised output conv hides them)
        for p in module.model.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x_T = module.model.initial_noise(torch.arange(4))
    labels = torch.tensor([0, 1, 2, 0])
    for sampler in ("ddim", "dpmpp_2m", "ddpm_respaced"):
        guided = module.model.sample(x_T, sampler=sampler, labels=labels, generator=torch.Generator().manual_seed(0))
        assert guided.shape == (4, 1, 8, 8) and torch.isfinite(guided).all()
    plain = module.model.sample(x_T, labels=labels, guidance_scale=1.0, sampler="ddim")
    # guidance_scale = 1 is exactly the conditional EMA model, sampled with the same sampler.
    from src.diffusion.parameterization import EpsPredictor
    from src.diffusion.samplers import ddim_sample

    def conditional(x, t):
        return EpsPredictor(module.model.net, module.schedule, module.hparams.prediction)(x, t, labels)[:, :1]

    torch.testing.assert_close(plain, ddim_sample(conditional, x_T, module.schedule, steps=5), rtol=0, atol=1e-6)
    assert not torch.allclose(module.model.sample(x_T, labels=labels, sampler="ddim"), plain)  # s = 3 vs s = 1


def test_predict_step_returns_labels_in_turn_or_as_configured(tiny_conditional) -> None:
    module = tiny_conditional()
    out = module.predict_step(torch.arange(5), 0)
    assert out["labels"].tolist() == [0, 1, 2, 0, 1] and out["images"].shape == (5, 1, 8, 8)
    module = tiny_conditional(sample_labels=[2])
    assert module.predict_step(torch.arange(3), 0)["labels"].tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="sampling.labels"):
        tiny_conditional(sample_labels=[3])


def test_module_forward_takes_the_labels_of_a_conditional_net(tiny_conditional) -> None:
    module = tiny_conditional()
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 7]), torch.tensor([0, 2])
    with torch.no_grad():
        torch.testing.assert_close(module(x, t, y), module.model.net(x, t, y))
    with pytest.raises(ValueError, match="class-conditional"):
        module(x, t)


# ---------------------------------------------------------------------------------------------- command line
REPO = Path(__file__).resolve().parents[1]


def test_conditional_config_fits_and_predicts_labelled_pngs(tmp_path: Path) -> None:
    """fit -> checkpoint -> predict with configs/fashion_mnist_cond.yaml on a tiny net: <label>_<index>.png."""
    from src.data import DATASETS
    from src.main import cli_main

    if not any(Path(d).is_dir() for d in DATASETS["fashion_mnist"].system_dirs):
        pytest.skip("Fashion-MNIST not installed")
    tiny = ["--config", str(REPO / "configs" / "fashion_mnist_cond.yaml"), "--model.net.init_args.base_channels", "8",
            "--model.net.init_args.norm_groups", "4", "--model.sampling.steps", "3", "--logger_backend", "csv",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    callbacks = '[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": true}}]'
    cli_main(["fit", *tiny, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--data.batch_size", "8",
              "--data.val_size", "16", "--trainer.callbacks", callbacks])  # fmt: skip
    (ckpt,) = tmp_path.glob("*/version_*/checkpoints/last.ckpt")
    out = tmp_path / "samples"
    cli_main(["predict", *tiny, "--ckpt_path", str(ckpt), "--data.num_samples", "5", "--data.predict_batch_size", "3",
              "--model.guidance.scale", "3.0", "--model.sampling.labels", "[4, 7]", "--output_dir", str(out)])  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["4_0.png", "4_2.png", "4_4.png", "7_1.png", "7_3.png"]


def test_noisy_classifier_and_classifier_guided_module(tmp_path: Path, tiny_unet) -> None:
    from src.classifier_module import noisy_classifier_loss
    from src.models.classifier import NoisyClassifier

    classifier = NoisyClassifier(num_classes=4, in_channels=1, base_channels=8, channel_mult=(1, 2), image_size=8,
                                 norm_groups=4, attn_resolutions=(4,))  # fmt: skip
    x0 = torch.rand(6, 1, 8, 8) * 2 - 1
    loss = noisy_classifier_loss(classifier, x0, torch.arange(6) % 4, NoiseSchedule.linear(50))
    loss.backward()
    assert loss.isfinite() and classifier.head.weight.grad.abs().sum() > 0
    classifier.save(str(tmp_path / "clf.pt"))
    loaded = NoisyClassifier.load(str(tmp_path / "clf.pt"))
    t = torch.tensor([0, 5, 10, 20, 30, 49])
    torch.testing.assert_close(loaded(x0, t), classifier(x0, t))

    net = tiny_unet()
    plain = DiffusionModule(net, schedule=Schedule(timesteps=50), sampling=Sampling(steps=5))
    guided = DiffusionModule(
        net,
        schedule=Schedule(timesteps=50),
        sampling=Sampling(steps=5),
        guidance=Guidance(classifier_path=str(tmp_path / "clf.pt"), classifier_scale=5.0),
    )
    guided.model.net.load_state_dict(plain.model.net.state_dict())
    out = guided.predict_step(torch.arange(5), 0)
    assert out["labels"].tolist() == [0, 1, 2, 3, 0]  # the classifier's classes in turn
    assert not torch.allclose(out["images"], plain.predict_step(torch.arange(5), 0)["images"])
    with pytest.raises(ValueError, match="classifier_path"):
        DiffusionModule(
            net, schedule=Schedule(timesteps=50), sampling=Sampling(steps=5), guidance=Guidance(classifier_scale=1.0)
        )


def test_guidance_accuracy_benchmark_help() -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "guidance_accuracy.py"), "--help"],
                            capture_output=True, text=True, timeout=120, env={"OMP_NUM_THREADS": "1", "PATH": ""})  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "--ckpt" in result.stdout and "guidance" in result.stdout


def test_guidance_takes_a_v_net_wrapped_as_an_eps_predictor(tiny_conditional) -> None:
    """classifier_free_guidance(EpsPredictor(net, ...), y, w=w) finds the null label through the wrapper and gives eq. 6
    of Ho & Salimans on the converted outputs (what notebook 04 does with a v-prediction checkpoint)."""
    from src.diffusion.parameterization import EpsPredictor

    module = tiny_conditional(prediction="v")
    net = module.model.net
    with torch.no_grad():  # make the output depend on the inputs (the zero-initialised output conv hides them)
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    eps_net = EpsPredictor(net, module.schedule, "v")
    x_t, t, labels = torch.randn(3, 1, 8, 8), torch.tensor([1, 25, 49]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        eps_cond = eps_net(x_t, t, labels)
        eps_null = eps_net(x_t, t, torch.full_like(labels, net.num_classes))
        guided = classifier_free_guidance(eps_net, labels, w=2.0)(x_t, t)
    assert not torch.allclose(eps_cond, net(x_t, t, labels))  # converted: v is not eps
    torch.testing.assert_close(guided, 3.0 * eps_cond - 2.0 * eps_null, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- guidance interval
SCHEDULE = NoiseSchedule.linear(1000)
SIGMAS = vp_sigmas(SCHEDULE)


def _run(sampler: str, guided, x_T: torch.Tensor) -> torch.Tensor:
    extra = {"steps": 8, "quantize": False} if sampler == "heun" else {"steps": 12}  # heun: fractional t
    return sample(guided, x_T, SCHEDULE, sampler=sampler, **extra)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "heun"])
def test_an_interval_covering_every_noise_level_is_plain_guidance_bit_for_bit(sampler: str) -> None:
    x_T = torch.randn(3, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    labels = Y[:3]
    plain_net, interval_net = ToyConditional(), ToyConditional()
    plain = _run(sampler, classifier_free_guidance(plain_net, labels, guidance_scale=3.0), x_T)
    everywhere = classifier_free_guidance(interval_net, labels, guidance_scale=3.0, interval=(0.0, math.inf),
                                          schedule=SCHEDULE)  # fmt: skip
    assert torch.equal(_run(sampler, everywhere, x_T), plain)
    assert interval_net.batch_sizes == plain_net.batch_sizes and set(plain_net.batch_sizes) == {6}


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "heun"])
def test_an_empty_interval_is_the_conditional_model_with_one_evaluation_per_step(sampler: str) -> None:
    x_T = torch.randn(3, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    labels = Y[:3]
    conditional_net, interval_net = ToyConditional(), ToyConditional()
    conditional = _run(sampler, classifier_free_guidance(conditional_net, labels, guidance_scale=1.0), x_T)
    nowhere = classifier_free_guidance(interval_net, labels, guidance_scale=3.0, interval=(1e6, 1e6), schedule=SCHEDULE)
    assert torch.equal(_run(sampler, nowhere, x_T), conditional)
    assert interval_net.batch_sizes == conditional_net.batch_sizes and set(interval_net.batch_sizes) == {3}


class RecordingConditional(ToyConditional):
    """Also records each call's timesteps."""

    def __init__(self) -> None:
        super().__init__()
        self.timesteps: list[torch.Tensor] = []

    def __call__(self, x, t, y):
        self.timesteps.append(t.clone())
        return super().__call__(x, t, y)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "heun"])
def test_guidance_runs_twice_the_batch_only_inside_the_interval(sampler: str) -> None:
    x_T = torch.randn(3, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    labels, (lo, hi) = Y[:3], (0.2, 5.0)
    net = RecordingConditional()
    limited = _run(sampler, classifier_free_guidance(net, labels, guidance_scale=3.0, interval=(lo, hi),
                                                     schedule=SCHEDULE), x_T)  # fmt: skip
    inside = [bool(lo < timestep_sigma(SIGMAS, t[:1]) <= hi) for t in net.timesteps]
    assert net.batch_sizes == [6 if i else 3 for i in inside]
    assert 0 < sum(inside) < len(inside)  # both kinds of steps occur
    plain = _run(sampler, classifier_free_guidance(ToyConditional(), labels, guidance_scale=3.0), x_T)
    conditional = _run(sampler, classifier_free_guidance(ToyConditional(), labels, guidance_scale=1.0), x_T)
    assert not torch.allclose(limited, plain) and not torch.allclose(limited, conditional)


def test_a_batch_of_mixed_noise_levels_guides_only_the_images_inside() -> None:
    net = ToyConditional()
    guided = classifier_free_guidance(net, Y, guidance_scale=2.5, interval=(0.2, 5.0), schedule=SCHEDULE)
    out = guided(X, T_)
    inside = torch.tensor([bool(0.2 < SIGMAS[t] <= 5.0) for t in T_])
    assert inside.tolist() == [False, False, True, True, False]  # t = 0, 10: sigma < 0.2; t = 999: sigma = 157
    assert net.batch_sizes == [5 + 2]  # one forward: every image conditional, the two inside also unconditional
    expected = 2.5 * net(X, T_, Y) - 1.5 * net(X, T_, torch.full_like(Y, NULL))
    torch.testing.assert_close(out[inside], expected[inside], rtol=0, atol=1e-14)
    torch.testing.assert_close(out[~inside], net(X, T_, Y)[~inside], rtol=0, atol=0)


def test_timestep_sigma_is_the_schedule_at_integer_t_and_inverts_the_continuous_timestep() -> None:
    from src.diffusion.continuous import DiscreteVPDenoiser

    t = torch.tensor([0, 1, 10, 500, 999])
    assert torch.equal(timestep_sigma(SIGMAS, t), SIGMAS[t])
    assert torch.equal(timestep_sigma(SIGMAS, t.float()), SIGMAS[t])
    denoiser = DiscreteVPDenoiser(lambda x, t: x, SCHEDULE)
    sigma = torch.tensor([0.0101, 0.05, 0.3, 1.0, 7.0, 150.0], dtype=torch.float64)
    torch.testing.assert_close(timestep_sigma(SIGMAS, denoiser.sigma_to_t(sigma)), sigma, rtol=1e-12, atol=0)
    # sigma_t = sqrt((1 - a_t) / a_t)
    a = SCHEDULE.alphas_cumprod[t]
    torch.testing.assert_close(SIGMAS[t], ((1 - a) / a).sqrt(), rtol=1e-15, atol=0)


def test_bad_intervals_raise() -> None:
    with pytest.raises(ValueError, match="0 <= sigma_lo <= sigma_hi"):
        check_interval((5.0, 0.5))
    with pytest.raises(ValueError, match="0 <= sigma_lo <= sigma_hi"):
        check_interval((-1.0, 0.5))
    with pytest.raises(ValueError, match=r"\[sigma_lo, sigma_hi\]"):
        check_interval((0.5,))
    with pytest.raises(ValueError, match="pass the schedule"):
        classifier_free_guidance(ToyConditional(), Y, guidance_scale=2.0, interval=(0.5, 5.0))


def test_guidance_interval_through_the_command_line(tmp_path: Path) -> None:
    """predict with --model.guidance.interval: covering all noise levels it writes the same images as guidance at
    every step; a narrow one writes others; values or combinations that mean nothing are one-line errors."""
    from test_sample import TINY

    from src.main import cli_main

    # A tiny conditional net whose output depends on the label.
    ckpt = tiny_checkpoint(tmp_path / "conditional.ckpt", num_classes=10)

    def predict(out: str, *extra: str) -> list[bytes]:
        cli_main(["predict", "--config", str(REPO / "configs" / "fashion_mnist_cond.yaml"), *TINY,
                  "--ckpt_path", str(ckpt), "--data.num_samples", "3", "--output_dir", str(tmp_path / out),
                  "--trainer.default_root_dir", str(tmp_path / "runs"), *extra])  # fmt: skip
        return [p.read_bytes() for p in sorted((tmp_path / out).iterdir())]

    plain = predict("plain", "--model.guidance.scale", "3.0", "--model.guidance.interval", "null")
    assert predict("everywhere", "--model.guidance.scale", "3.0", "--model.guidance.interval", "[0, 1000]") == plain
    assert predict("limited", "--model.guidance.scale", "3.0", "--model.guidance.interval", "[0.3, 5.0]") != plain
    bad = [
        (["--model.guidance.scale", "3.0", "--model.guidance.interval", "[5.0, 0.3]"],
         r"--model.guidance.interval \[5.0, 0.3\] must have 0 <= sigma_lo < sigma_hi"),
        (["--model.guidance.scale", "1", "--model.guidance.interval", "[0.3, 5.0]"],
         r"--model.guidance.interval \[0.3, 5.0\] limits classifier-free guidance, which is off"),
        (["--model.guidance.scale", "1"],  # the quickstart config's own interval: the message says how to drop it
         r"off \(--model.guidance.scale 1\): for no guidance add --model.guidance.interval null"),
    ]  # fmt: skip
    each_is_one_line(predict, bad, tmp_path / "bad")


def perturbed(net: torch.nn.Module) -> torch.nn.Module:
    """`net` with every weight moved off its initialisation (by the global RNG, after the caller's seed): an
    untrained UNet's zero output convolution would hide what labels and guidance change."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def tiny_checkpoint(path: Path, seed: int = 0, prediction: str = "eps", num_classes: int | None = None) -> Path:
    """A DiffusionModule checkpoint of a tiny 28x28 UNet (test_sample's TINY_NET) with perturbed weights, as
    `--ckpt_path` reads it."""
    from test_sample import TINY_NET

    from src.models.unet import UNet

    torch.manual_seed(seed)
    net = UNet(in_channels=1, image_size=28, num_res_blocks=1, dropout=0.0, num_classes=num_classes, **TINY_NET)
    module = DiffusionModule(net, prediction=prediction)
    perturbed(module.model.net)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": L.__version__}, path)  # fmt: skip
    return path


def each_is_one_line(predict, bad: list[tuple[list[str], str]], out: Path) -> None:
    """Each (options, message) of `bad` makes `predict(out.name, *options)` raise a one-line ConfigError matching the
    message, and nothing is written to `out`."""
    from src.errors import ConfigError

    for extra, message in bad:
        with pytest.raises(ConfigError, match=message) as error:
            predict(out.name, *extra)
        assert "\n" not in str(error.value)
    assert not out.exists()
