"""Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself"): a model extrapolated
away from a weaker model of the same task (src/diffusion/guidance.py `AutoGuidance`), in `DiffusionModel` and through
`python -m src.main predict --model.guidance.model`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_guidance import each_is_one_line, perturbed, tiny_checkpoint

from src.diffusion.continuous import vp_sigmas
from src.diffusion.guidance import AutoGuidance, timestep_sigma
from src.diffusion.parameterization import EpsPredictor
from src.diffusion.samplers import sample
from src.diffusion.schedule import NoiseSchedule
from src.errors import ConfigError
from src.models.diffusion import DiffusionModel
from src.models.unet import UNet

REPO = Path(__file__).resolve().parents[1]
SCHEDULE = NoiseSchedule.linear(1000, 1e-4, 0.02)
SIGMAS = vp_sigmas(SCHEDULE)
X = torch.randn(5, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
T_ = torch.tensor([0, 10, 100, 500, 999])
Y = torch.tensor([0, 1, 2, 1, 0])


class Toy:
    """A smooth label-dependent (or, with labels None, unconditional) eps(x, t[, y]) in float64 with a strength
    `a`; records the batch size of every call."""

    def __init__(self, a: float) -> None:
        self.a = a
        self.batch_sizes: list[int] = []

    def __call__(self, x, t, y=None):
        self.batch_sizes.append(x.shape[0])
        shape = (-1,) + (1,) * (x.ndim - 1)
        yy = torch.zeros(x.shape[0], dtype=x.dtype) if y is None else y.to(x.dtype)
        return torch.tanh(self.a * x * (1 + 0.3 * yy.reshape(shape))) + 0.01 * t.to(x.dtype).reshape(shape)


@pytest.mark.parametrize("labels", [Y, None], ids=["conditional", "unconditional"])
def test_autoguidance_is_the_guide_extrapolated_towards_the_model(labels) -> None:
    model, guide = Toy(1.0), Toy(0.7)
    for s in (2.5, 0.5, -1.0):
        expected = guide(X, T_, labels) + s * (model(X, T_, labels) - guide(X, T_, labels))  # eq. 2
        torch.testing.assert_close(AutoGuidance(model, guide, labels, s)(X, T_), expected, rtol=0, atol=1e-14)
    model.batch_sizes.clear(), guide.batch_sizes.clear()
    assert torch.equal(AutoGuidance(model, guide, labels, 1.0)(X, T_), model(X, T_, labels))
    assert guide.batch_sizes == []  # s = 1: the model alone, the guide never evaluated
    assert torch.equal(AutoGuidance(model, guide, labels, 0.0)(X, T_), guide(X, T_, labels))


def test_a_model_guided_by_itself_is_itself() -> None:
    model = Toy(1.0)
    x_T = torch.randn(3, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    plain = sample(lambda x, t: model(x, t, Y[:3]), x_T, SCHEDULE, sampler="dpmpp_2m", steps=12)
    guided = sample(AutoGuidance(model, model, Y[:3], 3.0), x_T, SCHEDULE, sampler="dpmpp_2m", steps=12)
    torch.testing.assert_close(guided, plain, rtol=1e-13, atol=0)


def test_autoguidance_in_an_interval_evaluates_the_guide_only_inside() -> None:
    model, guide = Toy(1.0), Toy(0.7)
    out = AutoGuidance(model, guide, Y, 2.5, interval=(0.2, 5.0), schedule=SCHEDULE)(X, T_)
    inside = torch.tensor([bool(0.2 < SIGMAS[t] <= 5.0) for t in T_])
    assert inside.tolist() == [False, False, True, True, False]
    assert model.batch_sizes == [5] and guide.batch_sizes == [2]
    expected = 2.5 * model(X, T_, Y) - 1.5 * guide(X, T_, Y)
    torch.testing.assert_close(out[inside], expected[inside], rtol=0, atol=1e-14)
    torch.testing.assert_close(out[~inside], model(X, T_, Y)[~inside], rtol=0, atol=0)
    # Every image outside: one evaluation of the model, none of the guide.
    model.batch_sizes.clear(), guide.batch_sizes.clear()
    AutoGuidance(model, guide, Y, 2.5, interval=(1e6, 1e7), schedule=SCHEDULE)(X, T_)
    assert model.batch_sizes == [5] and guide.batch_sizes == []
    assert 0.2 < timestep_sigma(SIGMAS, torch.tensor([400])).item() <= 5.0


def _net(seed: int, **extra) -> UNet:
    """A tiny 8x8 UNet with perturbed weights."""
    torch.manual_seed(seed)
    net = UNet(in_channels=1, image_size=8, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
               attn_resolutions=(), mid_attention=False, norm_groups=4, dropout=0.0, **extra)  # fmt: skip
    return perturbed(net).eval()


@pytest.mark.parametrize("sampler", ["ddim", "heun"])
@pytest.mark.parametrize("num_classes", [None, 3])
def test_diffusion_model_autoguidance_equals_the_guidance_of_its_two_nets(tmp_path: Path, sampler, num_classes) -> None:
    """DiffusionModel(guidance_model=an export) samples what AutoGuidance of the two nets samples, on the eps path
    (DDIM: both nets' v converted to eps) and on the continuous samplers' path (heun: the v outputs mixed, then
    converted at the exact noise levels)."""
    schedule = NoiseSchedule.linear(100, 1e-4, 0.02)
    weak = DiffusionModel(_net(1, num_classes=num_classes), schedule, "v")
    weak.save(tmp_path / "weak")
    model = DiffusionModel(_net(0, num_classes=num_classes), schedule, "v", autoguidance_scale=2.0,
                           guidance_model=str(tmp_path / "weak"))  # fmt: skip
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    labels = None if num_classes is None else torch.tensor([0, 1, 2, 0])
    options = {"sampler": sampler, "steps": 6}
    got = model.sample(x_T, labels=labels, **options)
    strong_net, weak_net = model.net, model.guide().net
    if sampler == "ddim":
        strong_net, weak_net = (EpsPredictor(n, schedule, "v") for n in (strong_net, weak_net))
    prediction = {} if sampler == "ddim" else {"prediction": "v"}
    expected = sample(AutoGuidance(strong_net, weak_net, labels, 2.0), x_T, schedule, **options, **prediction)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    unguided = DiffusionModel(model.net, schedule, "v").sample(x_T, labels=labels, **options)
    assert not torch.allclose(got, unguided, atol=1e-3)
    assert not any(k.startswith("_guide") for k in model.state_dict())  # the guide's weights are not the model's


def test_autoguidance_on_top_of_classifier_free_guidance(tmp_path: Path) -> None:
    """Both at once: the classifier-free guided model (in its interval) extrapolated away from the guide,
    D_guide + a (CFG(D) - D_guide), three network evaluations per step inside the interval."""
    from src.diffusion.guidance import classifier_free_guidance

    schedule = NoiseSchedule.linear(100, 1e-4, 0.02)
    DiffusionModel(_net(1, num_classes=3), schedule, "eps").save(tmp_path / "weak")
    model = DiffusionModel(_net(0, num_classes=3), schedule, "eps", guidance_scale=3.0, guidance_interval=(0.2, 2.0),
                           guidance_model=str(tmp_path / "weak"), autoguidance_scale=1.5)  # fmt: skip
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2, 0])
    got = model.sample(x_T, labels=labels, sampler="ddim", steps=6)
    cfg = classifier_free_guidance(model.net, labels, 3.0, 3, interval=(0.2, 2.0), schedule=schedule)
    both = AutoGuidance(lambda x, t, y: cfg(x, t), model.guide().net, labels, 1.5)
    torch.testing.assert_close(got, sample(both, x_T, schedule, sampler="ddim", steps=6), rtol=0, atol=1e-6)
    cfg_only = DiffusionModel(model.net, schedule, "eps", guidance_scale=3.0, guidance_interval=(0.2, 2.0))
    assert not torch.allclose(got, cfg_only.sample(x_T, labels=labels, sampler="ddim", steps=6), atol=1e-3)


def test_a_guide_of_another_task_is_one_line(tmp_path: Path) -> None:
    schedule = NoiseSchedule.linear(100, 1e-4, 0.02)
    DiffusionModel(_net(1), schedule, "eps").save(tmp_path / "eps")
    DiffusionModel(_net(1), NoiseSchedule.cosine(100), "v").save(tmp_path / "cosine")
    DiffusionModel(_net(1, num_classes=3), schedule, "v").save(tmp_path / "conditional")
    model = DiffusionModel(_net(0), schedule, "v", autoguidance_scale=2.0)
    for folder, message in [("eps", r"its prediction: v here, eps there$"),
                            ("cosine", r"its noise schedule: the alphas_cumprod differ$"),
                            ("conditional", r"its classes: None here, 3 there$")]:  # fmt: skip
        model.guidance_model, model._guide = str(tmp_path / folder), {}
        with pytest.raises(
            ConfigError, match=rf"^--model.guidance.model \S+/{folder} cannot guide this model: " + message
        ):
            model.guide()


def test_autoguidance_through_the_command_line(tmp_path: Path) -> None:
    """An unconditional checkpoint guided by another (the weaker model) with predict: other images than unguided;
    options that cannot work are one-line errors that write nothing."""
    from test_sample import TINY

    from src.main import cli_main

    ckpt = tiny_checkpoint(tmp_path / "model.ckpt", 0, "v")
    weak = tiny_checkpoint(tmp_path / "weak.ckpt", 1, "v")

    def predict(out: str, *extra: str) -> list[bytes]:
        cli_main(["predict", "--config", str(REPO / "configs" / "fashion_mnist.yaml"), *TINY,
                  "--ckpt_path", str(ckpt), "--data.num_samples", "3", "--output_dir", str(tmp_path / out),
                  "--trainer.default_root_dir", str(tmp_path / "runs"), *extra])  # fmt: skip
        return [p.read_bytes() for p in sorted((tmp_path / out).iterdir())]

    plain = predict("plain")
    guided = predict("guided", "--model.guidance.model", str(weak), "--model.guidance.autoguidance_scale", "2.0")
    assert len(guided) == 3 and guided != plain
    assert predict(
        "guide_alone", "--model.guidance.model", str(weak), "--model.guidance.autoguidance_scale", "0"
    ) == predict("weak", "--ckpt_path", str(weak))
    bad = [
        (["--model.guidance.model", str(weak)],
         r"--model.guidance.model \S+ is the weaker model of autoguidance, which is off \(--model.guidance.autoguidance_scale 1\)"),
        (["--model.guidance.autoguidance_scale", "2"], r"--model.guidance.autoguidance_scale 2.0 needs the weaker model to guide with"),
        (["--model.guidance.model", str(tmp_path / "nothing.ckpt"), "--model.guidance.autoguidance_scale", "2"],
         r"nothing.ckpt: no such checkpoint or export folder"),
        (["--model.guidance.scale", "2"], r"classifier-free guidance needs a class-conditional net.*--model.guidance.model"),
    ]  # fmt: skip
    each_is_one_line(predict, bad, tmp_path / "bad")
