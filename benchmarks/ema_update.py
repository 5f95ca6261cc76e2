"""EMA of the weights: ours (src/models/ema.py) against torch.optim.swa_utils.AveragedModel and Lightning's
WeightAveraging / EMAWeightAveraging callbacks, on the criteria that decide which one the template uses.

For every candidate, in one process:
- numbers: the average after N updates of a net whose weights move every step, against ours with the same decay
  rule (max abs difference; 0 is bit-identical). The decay warm-up min(decay, (1 + n) / (10 + n)) is expressed for
  AveragedModel / WeightAveraging as a `multi_avg_fn`; their built-in EMA functions have a fixed decay, so they are
  compared with ours at a fixed decay;
- host reads per update: calls that read a tensor's value into Python (`Tensor.__bool__`, `item`, `__int__`,
  `__float__`, `__index__`, `tolist`, `numpy`), counted by wrapping them. On a CUDA tensor each one waits until
  the GPU has run everything queued before it (a device sync, what `torch.cuda.set_sync_debug_mode` reports);
  the same Python code runs on the CPU, so they are counted here on any device;
- exact resume: the state saved after k updates (state_dict, for the callbacks their checkpoint hooks) and loaded
  into a fresh copy built from other weights, continued to N updates, equal bit for bit to the run never stopped;
- time per update (median over interleaved rounds), as a ratio to ours, on the quickstart net
  (configs/fashion_mnist.yaml) and the CIFAR-10 net (configs/cifar10.yaml, DDPM's 35.7M parameters).

    python benchmarks/ema_update.py [--threads 1] [--updates 40] [--rounds 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import io
import os
from collections.abc import Callable
from types import SimpleNamespace

import lightning as L
import torch
from common import cpu_name, median_seconds, our_unet, unet_settings
from lightning.pytorch.callbacks import EMAWeightAveraging, WeightAveraging
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from src.models.ema import ema_decay, update_ema

HOST_READS = ("__bool__", "item", "__int__", "__float__", "__index__", "tolist", "numpy")


class CountHostReads:
    """Counts the Tensor -> Python value reads (HOST_READS) made inside the `with` block."""

    def __enter__(self) -> CountHostReads:
        self.count = 0
        self._saved = {name: torch.Tensor.__dict__.get(name) for name in HOST_READS}
        for name in HOST_READS:
            original = getattr(torch.Tensor, name)

            def counted(tensor: Tensor, *args, _original=original, **kwargs):
                self.count += 1
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc) -> None:
        for name, saved in self._saved.items():
            if saved is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, saved)


def warmup_multi_avg_fn(decay: float, offset: int, host_read: bool) -> Callable:
    """A `multi_avg_fn` with ours' decay warm-up: update n (0-based) uses min(decay, (1 + n) / (10 + n)), where
    n = num_averaged - offset. `host_read`: n read into Python (one host read) and a float weight, as ours; else the
    weight computed on the device in float64 from the `num_averaged` tensor (no read) and given as a tensor."""

    @torch.no_grad()
    def update(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        if host_read:
            n = int(num_averaged) - offset
            torch._foreach_lerp_(averaged, current, 1.0 - min(decay, (1.0 + n) / (10.0 + n)))
            return
        n = num_averaged.double() - offset
        weight = (1.0 - torch.clamp((1.0 + n) / (10.0 + n), max=decay)).to(averaged[0].dtype)
        torch._foreach_lerp_(averaged, current, weight)

    return update


class Holder(L.LightningModule):
    """The LightningModule the callbacks average: here only the net."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net


def _bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _load(blob: bytes) -> object:
    return torch.load(io.BytesIO(blob), weights_only=False)


class StateDictAverage:
    """A candidate whose whole state is `self.average`'s state_dict and whose copy of the net is `self.average.<copy>`."""

    average: nn.Module
    copy_name: str

    def params(self) -> list[Tensor]:
        return list(getattr(self.average, self.copy_name).parameters())

    def save(self) -> bytes:
        return _bytes(self.average.state_dict())

    def load(self, blob: bytes) -> None:
        self.average.load_state_dict(_load(blob))


class Ours(StateDictAverage):
    """`update_ema` / `ema_decay` on a frozen copy, as DiffusionModule runs them (its sampling model's net)."""

    copy_name = "net"

    def __init__(self, net: nn.Module, decay: float, warmup: bool) -> None:
        self.average = nn.Module()
        self.average.net = copy.deepcopy(net).eval().requires_grad_(False)
        self.decay, self.warmup = decay, warmup

    def update(self, net: nn.Module, n: int) -> None:
        # n: the trainer's global step, saved by Lightning's loop state
        update_ema(self.average.net, net, ema_decay(n, self.decay, self.warmup))


class Averaged(StateDictAverage):
    """torch.optim.swa_utils.AveragedModel. It copies the weights at its first update; one update at construction
    makes it start, as ours, from the initial weights, so update n is its (n + 1)-th."""

    copy_name = "module"

    def __init__(self, net: nn.Module, multi_avg_fn: Callable) -> None:
        self.average = AveragedModel(net, multi_avg_fn=multi_avg_fn, use_buffers=True)
        self.average.update_parameters(net)

    def update(self, net: nn.Module, n: int) -> None:
        self.average.update_parameters(net)


class Callback:
    """Lightning's WeightAveraging callback, driven through its own hooks: setup, on_train_batch_end after each
    optimizer step, and the checkpoint hooks for save and resume. It averages the whole LightningModule and, like
    AveragedModel, starts from the weights after the first step (it copies them at its first update)."""

    def __init__(self, net: nn.Module, make: Callable[[], WeightAveraging]) -> None:
        self.module, self.callback = Holder(net).to(next(net.parameters()).device), make()
        self.callback.setup(None, self.module, "fit")  # type: ignore[arg-type]

    def update(self, net: nn.Module, n: int) -> None:
        trainer = SimpleNamespace(global_step=n + 1)  # after the (n + 1)-th optimizer step
        self.callback.on_train_batch_end(trainer, self.module, None, None, n)  # type: ignore[arg-type]

    def params(self) -> list[Tensor]:
        return list(self.callback._average_model.module.parameters())  # type: ignore[union-attr]

    def save(self) -> bytes:
        checkpoint = {"state_dict": self.module.state_dict()}
        self.callback.on_save_checkpoint(None, self.module, checkpoint)  # type: ignore[arg-type]
        return _bytes({"checkpoint": checkpoint, "callback": self.callback.state_dict()})

    def load(self, blob: bytes) -> None:
        # As Lightning resumes: the module from checkpoint["state_dict"], then the callback's hooks.
        saved = _load(blob)
        self.module.load_state_dict(saved["checkpoint"]["state_dict"])
        self.callback.on_load_checkpoint(None, self.module, saved["checkpoint"])  # type: ignore[arg-type]
        self.callback.load_state_dict(saved["callback"])


def candidates(decay: float) -> dict[str, tuple[Callable[[nn.Module], object], str]]:
    """name -> (factory taking the net, the ours-variant its numbers are compared with)."""

    def lightning_warmup() -> WeightAveraging:
        return WeightAveraging(multi_avg_fn=warmup_multi_avg_fn(decay, offset=0, host_read=False))

    return {
        "ours, warm-up": (lambda net: Ours(net, decay, True), "ours, warm-up"),
        "ours, fixed decay": (lambda net: Ours(net, decay, False), "ours, fixed decay"),
        "AveragedModel get_ema_multi_avg_fn": (
            lambda net: Averaged(net, get_ema_multi_avg_fn(decay)),
            "ours, fixed decay",
        ),
        "AveragedModel warm-up fn, int(n)": (
            lambda net: Averaged(net, warmup_multi_avg_fn(decay, offset=1, host_read=True)),
            "ours, warm-up",
        ),
        "AveragedModel warm-up fn, n on device": (
            lambda net: Averaged(net, warmup_multi_avg_fn(decay, offset=1, host_read=False)),
            "ours, warm-up",
        ),
        "Lightning EMAWeightAveraging": (
            lambda net: Callback(net, lambda: EMAWeightAveraging(decay=decay)),
            "ours, fixed decay",
        ),
        "Lightning WeightAveraging warm-up fn": (lambda net: Callback(net, lightning_warmup), "ours, warm-up"),
    }


def training_weights(net: nn.Module, step: int) -> None:
    """Move the net's weights as an optimizer step would, the same way for every candidate."""
    generator = torch.Generator().manual_seed(1000 + step)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=generator).to(p.device))


def run(factory: Callable[[nn.Module], object], base: nn.Module, updates: int, resume_at: int | None) -> list[Tensor]:
    """The averaged parameters after `updates` updates; with `resume_at`, saved there and continued in a fresh
    copy made from other weights."""
    net = copy.deepcopy(base)
    average = factory(net)
    for n in range(updates):
        if n == resume_at:
            blob = average.save()
            stranger = copy.deepcopy(base)
            training_weights(stranger, -1)  # other weights: only the saved state may carry the average
            average = factory(stranger)
            average.load(blob)
            if isinstance(average, Callback):
                average.module.net = net  # the resumed module trains on
        training_weights(net, n)
        average.update(net, n)
    return [p.detach().clone() for p in average.params()]


def max_difference(a: list[Tensor], b: list[Tensor]) -> float:
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b, strict=True))


def time_updates(factories: dict[str, Callable], net: nn.Module, rounds: int, repeats: int, device) -> dict:
    averages = {name: factory(net) for name, factory in factories.items()}
    steps = {name: 100 for name in factories}

    def step_fn(name: str) -> Callable[[], None]:
        def step() -> None:
            averages[name].update(net, steps[name])
            steps[name] += 1

        return step

    fns = {name: step_fn(name) for name in factories}
    for fn in fns.values():
        median_seconds(fn, 2, device)  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in factories}
    for _ in range(rounds):
        for name, fn in fns.items():
            seconds[name].append(median_seconds(fn, repeats, device))
    return {name: min(ts) for name, ts in seconds.items()}  # best round's median: least disturbed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decay", type=float, default=0.999)
    parser.add_argument("--updates", type=int, default=40, help="updates of the numbers and resume checks")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--repeats", type=int, default=5, help="timed updates per candidate and round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device={device} cpu={cpu_name()} ({os.cpu_count()} cores) threads={torch.get_num_threads()} "
          f"torch={torch.__version__} lightning={L.__version__} decay={args.decay}")  # fmt: skip

    table = candidates(args.decay)
    torch.manual_seed(0)
    quickstart = our_unet(unet_settings("fashion_mnist")).to(device)
    reference: dict[str, list[Tensor]] = {}
    rows = {}
    for name, (factory, compare) in table.items():
        straight = run(factory, quickstart, args.updates, resume_at=None)
        resumed = run(factory, quickstart, args.updates, resume_at=args.updates // 2)
        reference.setdefault(name, straight)
        with CountHostReads() as reads:
            probe = factory(copy.deepcopy(quickstart))
            probe.update(quickstart, 5)  # not the first update: the steady state
            before = reads.count
            probe.update(quickstart, 6)
        rows[name] = {
            "diff": max_difference(straight, reference[compare]),
            "resume": all(torch.equal(a, b) for a, b in zip(straight, resumed, strict=True)),
            "reads": reads.count - before,
        }

    nets = {"quickstart": quickstart}
    torch.manual_seed(0)
    nets["cifar10"] = our_unet(unet_settings("cifar10")).to(device)
    factories = {name: factory for name, (factory, _) in table.items()}
    times = {}
    for net_name, net in nets.items():
        n_params = sum(p.numel() for p in net.parameters())
        times[net_name] = time_updates(factories, net, args.rounds, args.repeats, device)
        print(f"{net_name}: {n_params:,} parameters, ours {times[net_name]['ours, warm-up'] * 1e3:.2f} ms per update")

    header = (f"| {'candidate':38} | compared with     | max abs diff | resume exact | host reads/update "
              f"| time/ours quickstart | time/ours cifar10 |")  # fmt: skip
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, row in rows.items():
        ratios = [times[n][name] / times[n]["ours, warm-up"] for n in nets]
        print(f"| {name:38} | {table[name][1]:17} | {row['diff']:12.3g} | {str(row['resume']):12} "
              f"| {row['reads']:17d} | {ratios[0]:20.2f} | {ratios[1]:17.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
