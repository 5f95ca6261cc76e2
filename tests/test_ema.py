"""The EMA of the weights (src/models/ema.py: `update_ema`, `ema_decay`) against the update rule written by hand, and
the averaged copy DiffusionModule keeps (its sampling model's net: frozen, in eval mode, in the state dict)."""

import copy

import pytest
import torch
from torch import nn

from src.models.ema import ema_decay, update_ema


def tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(3, 2)


def frozen_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).eval().requires_grad_(False)


@torch.no_grad()
def step(model, seed):
    """A stand-in for an optimizer step: move every parameter."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("decay", [0.9, 0.5, 0.0, 1.0])
def test_update_is_the_ema_rule(decay):
    model = tiny()
    average = frozen_copy(model)
    expected = {name: p.detach().clone() for name, p in model.named_parameters()}
    for n in range(4):
        step(model, seed=n)
        update_ema(average, model, ema_decay(n, decay, warmup=False))
        for name, p in model.named_parameters():
            expected[name] = decay * expected[name] + (1 - decay) * p.detach()
    for name, p in average.named_parameters():
        torch.testing.assert_close(p, expected[name], rtol=1e-6, atol=1e-6)


def test_warmup_decay():
    for n in (0, 1, 10, 100, 1000, 10_000, 100_000, 10**6):
        assert ema_decay(n, 0.9999, True) == pytest.approx(min(0.9999, (1 + n) / (10 + n)), rel=1e-15)
    assert ema_decay(0, 0.9999, True) == pytest.approx(0.1)
    assert ema_decay(10**6, 0.9999, True) == 0.9999
    assert ema_decay(0, 0.9999, False) == 0.9999

    # Update number n moves the average by 1 - min(d, (1 + n) / (10 + n)).
    model = tiny()
    average = frozen_copy(model)
    expected = {name: p.detach().clone() for name, p in model.named_parameters()}
    for n in (0, 1, 2, 500):
        step(model, seed=n)
        update_ema(average, model, ema_decay(n, 0.99, True))
        d = min(0.99, (1 + n) / (10 + n))
        for name, p in model.named_parameters():
            expected[name] = d * expected[name] + (1 - d) * p.detach()
    for name, p in average.named_parameters():
        torch.testing.assert_close(p, expected[name], rtol=1e-6, atol=1e-6)


def test_the_module_keeps_a_frozen_averaged_copy_in_eval_mode(tiny_module, tiny_unet):
    net = tiny_unet(dropout=0.5)
    module = tiny_module(net)
    average = module.model.net
    assert all(not p.requires_grad for p in average.parameters())
    assert all(p.requires_grad for p in module.net.parameters())  # the trained one is untouched
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(average.parameters(), module.net.parameters()))
    before = copy.deepcopy(average.state_dict())
    step(module.net, seed=0)  # moving the trained net does not move the average until update_ema
    for name, value in average.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    # Its weights are part of the owner's state dict, under the sampling model's name.
    assert {k.removeprefix("model.net.") for k in module.state_dict() if k.startswith("model.net.")} == set(
        net.state_dict()
    )
    module.train()  # the owner trains; the average never does (no dropout in the weights that sample)
    assert module.net.training and not any(m.training for m in average.modules())
    x, t = torch.randn(2, *module.model.latent_shape), torch.tensor([3, 30])
    with torch.no_grad():
        torch.testing.assert_close(average(x, t), average(x, t), rtol=0, atol=0)


def test_buffers_averaged_or_copied():
    model = nn.BatchNorm1d(3)
    average = frozen_copy(model)
    model.train()
    model(torch.randn(16, 3, generator=torch.Generator().manual_seed(0)) + 2.0)
    update_ema(average, model, ema_decay(0, 0.5, warmup=False))
    torch.testing.assert_close(average.running_mean, 0.5 * torch.zeros(3) + 0.5 * model.running_mean)
    assert average.num_batches_tracked.item() == model.num_batches_tracked.item() == 1


@pytest.mark.parametrize("decay", [-0.1, 1.1])
def test_bad_decay_raises(decay):
    with pytest.raises(ValueError, match="decay"):
        ema_decay(0, decay)


def test_mismatched_models_raise():
    with pytest.raises(RuntimeError):
        update_ema(frozen_copy(tiny()), nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2)), 0.9)


def test_update_reads_nothing_back_from_the_device_while_averaged_model_does(monkeypatch):
    """Why src/models/ema.py is ours (its docstring, benchmarks/ema_update.py): AveragedModel tests its n_averaged
    tensor in Python on every update, a GPU sync on CUDA; our update reads no tensor value. If torch drops those
    reads, this fails and the choice is worth measuring again."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    reads = []
    original = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: reads.append(t) or original(t))
    model = tiny()
    ours, theirs = frozen_copy(model), AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    theirs.update_parameters(model)  # the first update copies
    step(model, 1)
    reads.clear()
    update_ema(ours, model, ema_decay(1, 0.9))
    assert reads == []
    theirs.update_parameters(model)
    assert len(reads) == 2  # bool(n_averaged == 0), n_averaged > 0
