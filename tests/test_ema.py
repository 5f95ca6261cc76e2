"""EMA (src/models/ema.py) against the update rule written by hand."""

import copy

import pytest
import torch
from torch import nn

from src.models.ema import EMA


def tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(3, 2)


@torch.no_grad()
def step(model, seed):
    """A stand-in for an optimizer step: move every parameter."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("decay", [0.9, 0.5, 0.0, 1.0])
def test_update_is_the_ema_rule(decay):
    model = tiny()
    ema = EMA(model, decay=decay, warmup=False)
    expected = {name: p.detach().clone() for name, p in model.named_parameters()}
    for n in range(4):
        step(model, seed=n)
        ema.update(model, num_updates=n)
        for name, p in model.named_parameters():
            expected[name] = decay * expected[name] + (1 - decay) * p.detach()
    for name, p in ema.model.named_parameters():
        torch.testing.assert_close(p, expected[name], rtol=1e-6, atol=1e-6)


def test_warmup_decay():
    ema = EMA(tiny(), decay=0.9999, warmup=True)
    for n in (0, 1, 10, 100, 1000, 10_000, 100_000, 10**6):
        assert ema.decay_at(n) == pytest.approx(min(0.9999, (1 + n) / (10 + n)), rel=1e-15)
    assert ema.decay_at(0) == pytest.approx(0.1)
    assert ema.decay_at(10**6) == 0.9999
    assert EMA(tiny(), decay=0.9999, warmup=False).decay_at(0) == 0.9999

    # And update() uses it: update number n moves the average by 1 - min(d, (1 + n) / (10 + n)).
    model = tiny()
    ema = EMA(model, decay=0.99, warmup=True)
    expected = {name: p.detach().clone() for name, p in model.named_parameters()}
    for n in (0, 1, 2, 500):
        step(model, seed=n)
        ema.update(model, num_updates=n)
        d = min(0.99, (1 + n) / (10 + n))
        for name, p in model.named_parameters():
            expected[name] = d * expected[name] + (1 - d) * p.detach()
    for name, p in ema.model.named_parameters():
        torch.testing.assert_close(p, expected[name], rtol=1e-6, atol=1e-6)


def test_ema_is_a_frozen_copy():
    model = tiny()
    ema = EMA(model, decay=0.9)
    assert all(not p.requires_grad for p in ema.parameters())
    assert all(p.requires_grad for p in model.parameters())  # the original is untouched
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(ema.model.parameters(), model.parameters()))
    before = copy.deepcopy(ema.model.state_dict())
    step(model, seed=0)  # moving the model does not move the average until update()
    for name, value in ema.model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    # Weights are part of the owner's state_dict.
    assert set(ema.state_dict()) == {"model.weight", "model.bias"}


def test_ema_stays_in_eval_mode():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    ema = EMA(model, decay=0.9)
    assert not ema.model.training
    ema.train()
    assert ema.training and not ema.model.training
    assert all(not m.training for m in ema.model.modules())
    x = torch.randn(8, 4)
    torch.testing.assert_close(ema(x), ema(x), rtol=0, atol=0)  # no dropout
    ema.eval()
    assert not ema.model.training


def test_buffers_averaged_or_copied():
    model = nn.BatchNorm1d(3)
    ema = EMA(model, decay=0.5, warmup=False)
    model.train()
    model(torch.randn(16, 3, generator=torch.Generator().manual_seed(0)) + 2.0)
    ema.update(model, num_updates=0)
    torch.testing.assert_close(ema.model.running_mean, 0.5 * torch.zeros(3) + 0.5 * model.running_mean)
    assert ema.model.num_batches_tracked.item() == model.num_batches_tracked.item() == 1


@pytest.mark.parametrize("decay", [-0.1, 1.1])
def test_bad_decay_raises(decay):
    with pytest.raises(ValueError, match="decay"):
        EMA(tiny(), decay=decay)


def test_mismatched_models_raise():
    ema = EMA(tiny(), decay=0.9)
    with pytest.raises(RuntimeError):
        ema.update(nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2)), num_updates=0)


def test_update_reads_nothing_back_from_the_device_while_averaged_model_does(monkeypatch):
    """Why src/models/ema.py is ours (its docstring, benchmarks/ema_update.py): AveragedModel tests its n_averaged
    tensor in Python on every update, a GPU sync on CUDA; our update reads no tensor value. If torch drops those
    reads, this fails and the choice is worth measuring again."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    reads = []
    original = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: reads.append(t) or original(t))
    model = tiny()
    ours, theirs = EMA(model, decay=0.9), AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    theirs.update_parameters(model)  # the first update copies
    step(model, 1)
    reads.clear()
    ours.update(model, 1)
    assert reads == []
    theirs.update_parameters(model)
    assert len(reads) == 2  # bool(n_averaged == 0), n_averaged > 0
