"""Training-data attribution: inverse-Hessian-vector products and influence scores against the exact Hessian of a
tiny model, both scores against what they claim to predict (the loss change of a training step, of a retraining with
an upweighted image), and a planted duplicate ranked first."""

from __future__ import annotations

import itertools
import math
from functools import partial

import pytest
import torch
from torch.func import functional_call

from src.attribution.influence import (
    LossProbe,
    batch_hvp,
    conjugate_gradient,
    hessian_vector_product,
    influence_on_loss,
    largest_eigenvalue,
    lissa,
    make_probe,
    per_example_gradients,
    probe_loss,
    select_parameters,
    top_k,
    tracin_scores,
)
from src.diffusion.schedule import NoiseSchedule
from src.models.unet import UNet
from src.optim import AdamW, LinearWarmup
from src.options import Sampling, Schedule, Training

SCHEDULE = NoiseSchedule.linear(100, 1e-3, 0.1)


def tiny_net(dtype: torch.dtype = torch.float64) -> UNet:
    torch.manual_seed(0)
    net = UNet(in_channels=1, base_channels=4, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
               dropout=0.0, image_size=8, norm_groups=2, mid_attention=True)  # fmt: skip
    # The UNet zero-initialises its output layer (as DDPM does); random weights there make every gradient
    # non-trivial.
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net.to(dtype).eval()


def smooth_images(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, 2, 2, generator=generator) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=8, mode="bilinear", align_corners=False).to(dtype)


def loss_fn_for(net, probe: LossProbe):
    return lambda images, labels: probe_loss(net, images, SCHEDULE, probe, labels)


def exact_hessian(net, names: list[str], loss) -> torch.Tensor:
    """d^2 loss / d theta^2 over the named parameters, by torch.autograd.functional.hessian on a flat vector."""
    params = dict(net.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])

    def f(flat: torch.Tensor) -> torch.Tensor:
        chunks = dict(zip(names, (c.view(s) for c, s in zip(flat.split(sizes), shapes, strict=True)), strict=True))
        return loss(lambda x, t: functional_call(net, chunks, (x, t), strict=False))

    return torch.autograd.functional.hessian(f, theta)


@pytest.fixture(scope="module")
def setup():
    net = tiny_net()
    probe = make_probe(SCHEDULE.num_timesteps, (1, 8, 8), num_t=3, num_draws=2, seed=1)
    probe = LossProbe(probe.timesteps, probe.noise.double())
    train = smooth_images(6, seed=2)
    query = smooth_images(2, seed=3)
    return net, probe, train, query


# ------------------------------------------------------------------------------------------------ the loss


def test_probe_loss_is_l_simple_averaged_over_the_probe(setup) -> None:
    net, probe, train, _ = setup
    assert probe.timesteps.tolist() == [16, 50, 83] * 2  # midpoints of three equal bins of [0, 100)
    expected = []
    for image in train[:3]:
        terms = []
        for t, noise in zip(probe.timesteps, probe.noise, strict=True):
            abar = SCHEDULE.alphas_cumprod[t]
            x_t = abar.sqrt() * image + (1 - abar).sqrt() * noise
            terms.append((net(x_t[None], t[None]) - noise).pow(2).mean())
        expected.append(torch.stack(terms).mean())
    torch.testing.assert_close(probe_loss(net, train[:3], SCHEDULE, probe), torch.stack(expected), rtol=1e-12, atol=0)


def test_select_parameters_by_pattern_and_one_line_error() -> None:
    net = tiny_net()
    names = [n for n, _ in select_parameters(net, ["conv_out.*"])]
    assert names == ["conv_out.weight", "conv_out.bias"]
    with pytest.raises(ValueError, match=r"^no parameter matches \['nope\.\*'\]; names look like temb") as error:
        select_parameters(net, ["nope.*"])
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------------ H^-1 v


@pytest.mark.parametrize("patterns", [["conv_out.*"], ["up.4.0.conv2.*", "norm_out.*", "conv_out.*"]])
def test_hvp_cg_and_lissa_equal_the_exact_hessian(setup, patterns) -> None:
    net, probe, train, query = setup
    selected = select_parameters(net, patterns)
    names, params = [n for n, _ in selected], [p for _, p in selected]
    loss_fn = loss_fn_for(net, probe)
    hessian = exact_hessian(net, names, lambda model: probe_loss(model, train, SCHEDULE, probe).mean())
    dim = hessian.shape[0]
    eigenvalues = torch.linalg.eigvalsh(hessian)
    # Damping that makes H + damping I positive definite with a condition number of about 20.
    damping = max(0.0, -eigenvalues[0].item()) + eigenvalues[-1].item() / 20
    v = per_example_gradients(loss_fn, params, query[:1])[0]
    expected = torch.linalg.solve(hessian + damping * torch.eye(dim, dtype=hessian.dtype), v)

    full_batch = batch_hvp(loss_fn, params, itertools.repeat((train, None)))
    torch.testing.assert_close(full_batch(v), hessian @ v, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(conjugate_gradient(full_batch, v, damping, max_iter=2 * dim, rtol=1e-12), expected,
                               rtol=1e-7, atol=1e-10)  # fmt: skip
    # Power iteration finds the top of the spectrum LiSSA's scale must exceed (the largest |eigenvalue|).
    top = eigenvalues.abs().max().item()
    assert largest_eigenvalue(full_batch, v, iterations=200) == pytest.approx(top, rel=1e-3)
    scale = 1.05 * (eigenvalues[-1].item() + damping)
    depth = math.ceil(math.log(1e-9) / math.log(1 - (eigenvalues[0].item() + damping) / scale))
    torch.testing.assert_close(lissa(full_batch, v, damping, scale, depth), expected, rtol=1e-6, atol=1e-9)


def test_stochastic_lissa_with_minibatches_approaches_the_exact_solution(setup) -> None:
    net, probe, train, query = setup
    selected = select_parameters(net, ["conv_out.*"])
    names, params = [n for n, _ in selected], [p for _, p in selected]
    loss_fn = loss_fn_for(net, probe)
    hessian = exact_hessian(net, names, lambda model: probe_loss(model, train, SCHEDULE, probe).mean())
    eigenvalues = torch.linalg.eigvalsh(hessian)
    damping = eigenvalues[-1].item() / 20
    v = per_example_gradients(loss_fn, params, query[:1])[0]
    expected = torch.linalg.solve(hessian + damping * torch.eye(len(v), dtype=v.dtype), v)
    generator = torch.Generator().manual_seed(0)

    def minibatches():  # pairs of training images, reshuffled every pass: H_j is unbiased for H
        while True:
            for idx in torch.randperm(len(train), generator=generator).view(-1, 2):
                yield train[idx], None

    scale = 2.0 * (eigenvalues[-1].item() + damping)
    estimate = lissa(batch_hvp(loss_fn, params, minibatches()), v, damping, scale, depth=150, repeats=4)
    relative_error = torch.linalg.vector_norm(estimate - expected) / torch.linalg.vector_norm(expected)
    assert relative_error < 0.1, relative_error.item()


def test_lissa_and_cg_fail_with_a_clear_message_when_they_cannot_converge(setup) -> None:
    net, probe, train, query = setup
    params = [p for _, p in select_parameters(net, ["conv_out.*"])]
    hvp = batch_hvp(loss_fn_for(net, probe), params, itertools.repeat((train, None)))
    v = torch.ones(sum(p.numel() for p in params), dtype=torch.float64)
    with pytest.raises(FloatingPointError, match="LiSSA diverged .*raise --scale"):
        lissa(hvp, v, damping=0.0, scale=1e-6, depth=2000)
    with pytest.raises(ArithmeticError, match="not positive definite .*raise --damping"):
        conjugate_gradient(lambda x: -x, v, damping=0.0)


# ------------------------------------------------------------------------------------------------ scores


def test_influence_scores_equal_the_exact_computation(setup) -> None:
    net, probe, train, query = setup
    selected = select_parameters(net, ["up.4.0.conv2.*", "conv_out.*"])
    names, params = [n for n, _ in selected], [p for _, p in selected]
    loss_fn = loss_fn_for(net, probe)
    hessian = exact_hessian(net, names, lambda model: probe_loss(model, train, SCHEDULE, probe).mean())
    eigenvalues = torch.linalg.eigvalsh(hessian)
    damping = max(0.0, -eigenvalues[0].item()) + eigenvalues[-1].item() / 100
    query_grads = per_example_gradients(loss_fn, params, query)
    train_grads = per_example_gradients(loss_fn, params, train)
    hvp = batch_hvp(loss_fn, params, itertools.repeat((train, None)))
    s_test = torch.stack([conjugate_gradient(hvp, g, damping, max_iter=4 * len(g), rtol=1e-12) for g in query_grads])
    damped = hessian + damping * torch.eye(hessian.shape[0], dtype=hessian.dtype)
    expected = torch.stack([torch.stack([-(gq @ torch.linalg.solve(damped, gi)) for gi in train_grads])
                            for gq in query_grads])  # fmt: skip
    torch.testing.assert_close(influence_on_loss(s_test, train_grads), expected, rtol=1e-7, atol=1e-12)


def test_influence_predicts_the_effect_of_upweighting_and_retraining() -> None:
    # Koh & Liang's definition: dL(x, theta_eps) / d eps with theta_eps = argmin R + eps L(z). On the output layer
    # of an eps-predicting net the loss is quadratic in the parameters, so argmin is one exact Newton step.
    net = tiny_net()
    probe = make_probe(SCHEDULE.num_timesteps, (1, 8, 8), num_t=4, num_draws=2, seed=4)
    probe = LossProbe(probe.timesteps, probe.noise.double())
    train, query = smooth_images(12, seed=5), smooth_images(1, seed=6)
    selected = select_parameters(net, ["conv_out.*"])
    names, params = [n for n, _ in selected], [p for _, p in selected]
    loss_fn = loss_fn_for(net, probe)

    def set_params(flat: torch.Tensor) -> None:
        with torch.no_grad():
            for p, chunk in zip(params, flat.split([p.numel() for p in params]), strict=True):
                p.copy_(chunk.view_as(p))

    def risk_gradient(weights: torch.Tensor) -> torch.Tensor:  # grad of R + eps L(z) at the current parameters
        return per_example_gradients(loss_fn, params, train).mean(0) + weights

    hessian = exact_hessian(net, names, lambda model: probe_loss(model, train, SCHEDULE, probe).mean())
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    set_params(theta - torch.linalg.solve(hessian, risk_gradient(0)))  # theta_hat: the exact minimiser of R
    assert torch.linalg.vector_norm(risk_gradient(0)) < 1e-10
    theta_hat = torch.cat([p.detach().reshape(-1) for p in params])
    train_grads = per_example_gradients(loss_fn, params, train)
    query_loss = loss_fn(query, None).item()
    hvp = batch_hvp(loss_fn, params, itertools.repeat((train, None)))
    s_test = conjugate_gradient(hvp, per_example_gradients(loss_fn, params, query)[0], 0.0, 200, 1e-13)
    predicted = influence_on_loss(s_test[None], train_grads)[0]

    eps = 1e-5
    measured = []
    for i in range(len(train)):
        h_z = exact_hessian(net, names, lambda model, i=i: probe_loss(model, train[i : i + 1], SCHEDULE, probe).sum())
        # Newton step for R + eps L(z_i) from theta_hat, where grad R = 0: exact for a quadratic.
        set_params(theta_hat - torch.linalg.solve(hessian + eps * h_z, eps * train_grads[i]))
        measured.append((loss_fn(query, None).item() - query_loss) / eps)
        set_params(theta_hat)
    torch.testing.assert_close(predicted, torch.tensor(measured, dtype=predicted.dtype), rtol=1e-3, atol=1e-9)


def test_tracin_predicts_the_loss_change_of_a_gradient_step(setup) -> None:
    # TracIn's premise: an SGD step on z_i with learning rate eta changes the query's loss by -eta g(x) . g(z_i).
    net, probe, train, query = setup
    params = [p for _, p in select_parameters(net, ["up.*", "conv_out.*", "norm_out.*"])]
    loss_fn = loss_fn_for(net, probe)
    query_grads = per_example_gradients(loss_fn, params, query)
    train_grads = per_example_gradients(loss_fn, params, train)
    eta = 1e-4
    predicted = tracin_scores(query_grads, train_grads, eta)
    before = loss_fn(query, None).detach()
    for i in range(len(train)):
        with torch.no_grad():
            for p, g in zip(params, train_grads[i].split([p.numel() for p in params]), strict=True):
                p.sub_(eta * g.view_as(p))
        after = loss_fn(query, None).detach()
        with torch.no_grad():
            for p, g in zip(params, train_grads[i].split([p.numel() for p in params]), strict=True):
                p.add_(eta * g.view_as(p))
        torch.testing.assert_close(before - after, predicted[:, i], rtol=2e-3, atol=1e-12)


def test_top_k_is_descending_and_stable() -> None:
    values, indices = top_k(torch.tensor([[0.5, 2.0, 2.0, -1.0]]), 3)
    assert indices.tolist() == [[1, 2, 0]] and values.tolist() == [[2.0, 2.0, 0.5]]


def test_batched_hessian_vector_products_equal_one_at_a_time(setup) -> None:
    net, probe, train, query = setup
    params = [p for _, p in select_parameters(net, ["up.4.0.conv2.*", "conv_out.*"])]
    hvp = batch_hvp(loss_fn_for(net, probe), params, itertools.repeat((train, None)))
    vectors = per_example_gradients(loss_fn_for(net, probe), params, query)
    torch.testing.assert_close(hvp(vectors), torch.stack([hvp(v) for v in vectors]), rtol=1e-12, atol=1e-15)
    damping, scale = 0.05, 10.0
    torch.testing.assert_close(lissa(hvp, vectors, damping, scale, 20),
                               torch.stack([lissa(hvp, v, damping, scale, 20) for v in vectors]), rtol=1e-12, atol=1e-15)  # fmt: skip


def test_hessian_vector_product_of_a_quadratic() -> None:
    # Closed form: for f(w) = 1/2 w^T A w, H v = A v.
    a = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    w = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    v = torch.tensor([1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(hessian_vector_product(lambda: 0.5 * w @ a @ w, [w], v), a @ v)


# ------------------------------------------------------------------------------------------------ the command

PLANTED = 21  # index of the planted, distinctive image in the fake training file


def write_fake_fashion_mnist(root, n_train: int = 48, n_test: int = 8) -> None:
    """Smooth blobs, plus one distinctive image (a checkerboard ring) at PLANTED, as Fashion-MNIST idx files."""
    import numpy as np

    def blobs(n: int, seed: int) -> np.ndarray:
        images = (smooth_images(n, seed, torch.float32).numpy()[:, 0] + 1) * 127.5
        return np.kron(images, np.ones((4, 4)))[:, 2:30, 2:30].round().clip(0, 255).astype(np.uint8)  # 8 -> 28 px

    train = blobs(n_train, seed=10)
    yy, xx = np.mgrid[:28, :28]
    ring = (np.hypot(yy - 13.5, xx - 13.5) < 11) & (np.hypot(yy - 13.5, xx - 13.5) > 5)
    train[PLANTED] = np.where(ring & ((yy // 2 + xx // 2) % 2 == 0), 255, 0).astype(np.uint8)
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, images in (("train", train), ("t10k", blobs(n_test, seed=11))):
        labels = np.arange(len(images), dtype=np.uint8) % 10
        header = np.array([0x803, len(images), 28, 28], dtype=">u4").tobytes()
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        header = np.array([0x801, len(labels)], dtype=">u4").tobytes()
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(header + labels.tobytes())


def train_tiny(tiny_unet, root, num_classes: int | None = None, max_steps: int = 60):
    """A tiny model (`tiny_unet`: the conftest fixture) trained on the fake data in `root / "data"`, with checkpoints
    every 20 steps (for TracIn)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from src.data import ImageDataModule
    from src.module import DiffusionModule

    L.seed_everything(0)
    net = tiny_unet(image_size=28, num_classes=num_classes)
    module = DiffusionModule(
        net,
        optimizer=partial(AdamW, lr=2e-3),
        lr_scheduler=partial(LinearWarmup, warmup_steps=5),
        schedule=Schedule(timesteps=100),
        training=Training(ema_decay=0.9),
        sampling=Sampling(steps=5),
    )
    data = ImageDataModule("fashion_mnist", data_dir=str(root / "data"), batch_size=16, val_size=0)
    folder = root / ("checkpoints" if num_classes is None else "checkpoints_cond")
    checkpoints = ModelCheckpoint(dirpath=folder, save_top_k=-1, every_n_train_steps=20, filename="{step}")
    trainer = L.Trainer(default_root_dir=root, max_steps=max_steps, accelerator="cpu", logger=False,
                        callbacks=[checkpoints], limit_val_batches=0, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    trainer.fit(module, datamodule=data)
    return sorted(folder.glob("step=*.ckpt"))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_unet):
    root = tmp_path_factory.mktemp("attribution")
    write_fake_fashion_mnist(root / "data")
    return root, train_tiny(tiny_unet, root)


@pytest.mark.slow
@pytest.mark.parametrize(
    "method_args",
    [
        ["--method", "influence", "--solver", "lissa", "--depth", "30"],
        ["--method", "influence", "--solver", "cg", "--cg_iters", "20", "--weights", "net"],
        ["--method", "tracin"],
        ["--method", "tracin", "--normalize"],
    ],
    ids=["influence-lissa", "influence-cg", "tracin", "tracin-cosine"],
)
def test_planted_duplicate_is_ranked_first(trained_run, tmp_path, method_args) -> None:
    import json

    from src.attribute import main

    root, checkpoints = trained_run
    assert len(checkpoints) == 3
    if "tracin" in method_args:
        method_args = [*method_args, "--tracin_ckpts", *map(str, checkpoints)]
    out = tmp_path / "out"
    report = main(["--ckpt_path", str(checkpoints[-1]), "--queries", f"train:{PLANTED},3", "--output_dir", str(out),
                   "--top_k", "5", "--num_t", "4", "--hvp_batch_size", "8", *method_args])  # fmt: skip
    tops = [[entry["train_index"] for entry in query["top"]] for query in report["queries"]]
    assert tops[0][0] == PLANTED  # the query is a copy of the planted image
    if "--normalize" in method_args:  # gradient cosine: every training image is its own best match
        assert tops[1][0] == 3
    assert json.loads((out / "scores.json").read_text()) == report
    assert {p.name for p in out.iterdir()} == {"query_0.png", "query_1.png", "overview.png", "scores.json"}


def test_training_set_reads_a_cli_checkpoints_data_settings(trained_run, tmp_path) -> None:
    from src.attribute import training_set

    root, checkpoints = trained_run
    checkpoint = torch.load(checkpoints[-1], weights_only=True)
    checkpoint["datamodule_hyper_parameters"]["_instantiator"] = (
        "lightning.pytorch.cli.instantiate_module"  # as the CLI
    )
    path = tmp_path / "cli.ckpt"
    torch.save(checkpoint, path)
    images, labels, indices, dataset = training_set(str(path), None, limit=5)
    assert images.shape == (5, 1, 28, 28) and indices.tolist() == [0, 1, 2, 3, 4] and dataset == "fashion_mnist"


def test_attribution_command_refuses_a_non_empty_output_dir(trained_run, tmp_path, capsys) -> None:
    from src.attribute import main

    root, checkpoints = trained_run
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        main(["--ckpt_path", str(checkpoints[-1]), "--queries", "train:0", "--output_dir", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --output_dir {out} holds files; choose another folder or pass --overwrite"
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    with pytest.raises(SystemExit):
        main(["--ckpt_path", str(checkpoints[-1]), "--queries", "train:0", "--output_dir", str(tmp_path / "new"),
              "--params", "nope.*"])  # fmt: skip
    assert capsys.readouterr().err.startswith("error: --params: no parameter matches ['nope.*']")


@pytest.mark.slow
def test_conditional_model_uses_the_labels_of_queries_and_training_images(
    trained_run, tmp_path, capsys, tiny_unet
) -> None:
    from PIL import Image

    from src.attribute import main
    from src.data import load_dataset

    root, _ = trained_run
    checkpoint = train_tiny(tiny_unet, root, num_classes=10, max_steps=20)[-1]
    report = main(["--ckpt_path", str(checkpoint), "--queries", f"train:{PLANTED}", "--output_dir",
                   str(tmp_path / "a"), "--method", "tracin", "--num_t", "4"])  # fmt: skip
    assert report["queries"][0]["top"][0]["train_index"] == PLANTED
    # PNG queries: the label comes from the <label>_<index>.png name that predict writes.
    images, labels = load_dataset("fashion_mnist", "train", str(root / "data"))
    folder = tmp_path / "pngs"
    folder.mkdir()
    Image.fromarray(images[PLANTED, 0].numpy()).save(folder / f"{int(labels[PLANTED])}_0.png")
    report = main(["--ckpt_path", str(checkpoint), "--queries", str(folder), "--output_dir", str(tmp_path / "b"),
                   "--method", "tracin", "--num_t", "4"])  # fmt: skip
    assert report["queries"][0]["query"] == f"{int(labels[PLANTED])}_0"
    assert report["queries"][0]["top"][0]["train_index"] == PLANTED
    # Without labels a conditional model cannot be asked: one line saying how to name the files.
    (folder / f"{int(labels[PLANTED])}_0.png").rename(folder / "0.png")
    capsys.readouterr()  # the progress bars so far
    with pytest.raises(SystemExit):
        main(["--ckpt_path", str(checkpoint), "--queries", str(folder), "--output_dir", str(tmp_path / "c")])
    assert capsys.readouterr().err.strip() == (
        "error: this model is class-conditional: name query files <label>_<index>.png or use train:/test: queries"
    )
