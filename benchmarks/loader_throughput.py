"""Folder loader throughput per process, from the decoded cache, against the training step it feeds.

For each image size, a synthetic folder of PNG files is decoded once into the uint8 cache (src/data/folder.py),
then the training DataLoader that `fit` uses (ImageDataModule's ResumableDataLoader: shuffled memory-mapped uint8
rows, random flips; by default in the training process itself, --num-workers 0) is timed over whole batches,
together with what follows on the device (the copy there and the scaling to float32 in [-1, 1],
`ImageDataModule.on_after_batch_transfer`); "host" is the loader alone, the part a GPU run leaves to the CPU. The training step is the config's UNet at that size (32: cifar10, 64: folder64, 256: folder256): forward, backward,
gradient clipping, fused AdamW and the EMA update, timed in the same process. Reports images/s of both and their
ratio; the goal is a loader at least 10x faster than the step, so that the accelerator never waits for data.

    python benchmarks/loader_throughput.py                        # 32, 64 and 256 pixels, on this machine
    python benchmarks/loader_throughput.py --sizes 64 --device cuda --precision bf16 --step-batch 64

On a CPU the step runs on a small batch (--step-batch) since images/s hardly depends on the batch there; the loader
runs on the config's global batch (one process). UNet options that this checkout's UNet does not take are dropped
and listed.

Without a GPU, the last column ESTIMATES what one GPU would consume: the step's counted FLOPs per image (forward and
backward, torch's FlopCounterMode) at --gpu-mfu of an H100/H200's dense bf16 peak. It is arithmetic, not a
measurement; run with --device cuda for the real ratio.
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import PEAK_TFLOPS, REPO, flops, median_seconds, unet_settings
from PIL import Image
from train_throughput import make_step

from src.data import ImageDataModule
from src.diffusion.schedule import NoiseSchedule
from src.models.unet import UNet

CONFIGS = {32: "cifar10", 64: "folder64", 256: "folder256"}
LOADER_BATCH = {32: 128, 64: 128, 256: 64}  # the configs' global batches
STEP_BATCH_CPU = {32: 8, 64: 4, 256: 1}


def write_folder(root: Path, size: int, count: int) -> None:
    """`count` PNG files 1.25x the target size (so they are resized and cropped): smooth colour ramps plus noise."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    side = int(size * 1.25)
    ramp = np.linspace(0, 1, side)
    for i in range(count):
        base = rng.uniform(0, 255, 3) * np.add.outer(ramp, ramp[::-1])[..., None] / 2
        pixels = np.clip(base + rng.normal(0, 20, (side, side, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{i:05d}.png", compress_level=1)


def loader_images_per_second(
    data: ImageDataModule, batches: int, device: torch.device, rounds: int = 7
) -> tuple[float, float]:
    """Median images/s over `rounds` runs of `batches` batches, after one warm-up run (first page touches, lazy
    initialisation): of the host loader alone, and of the loader plus the copy to `device` and the scaling there.
    Epochs restart as training restarts them."""
    loader = data.train_dataloader()
    it = iter(loader)

    def run(on_device: bool) -> float:
        nonlocal it
        start, seen = time.perf_counter(), 0
        for _ in range(batches):
            try:
                batch = next(it)
            except StopIteration:
                it = iter(loader)
                batch = next(it)
            if on_device:
                batch = data.on_after_batch_transfer((batch[0].to(device), batch[1].to(device)), 0)
            seen += batch[0].shape[0]
        if on_device and device.type == "cuda":
            torch.cuda.synchronize(device)
        return seen / (time.perf_counter() - start)

    run(True)
    # Interleaved, so that a load change on a shared machine hits both alike.
    host, full = zip(*((run(False), run(True)) for _ in range(rounds)), strict=True)
    return statistics.median(host), statistics.median(full)


def unet_for(size: int) -> tuple[UNet, list[str]]:
    settings = unet_settings(CONFIGS[size])
    accepted = inspect.signature(UNet).parameters
    dropped = sorted(k for k in settings if k not in accepted)
    return UNet(**{k: v for k, v in settings.items() if k in accepted}), dropped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 256], choices=sorted(CONFIGS))
    parser.add_argument("--images", type=int, default=512, help="images in each synthetic folder")
    parser.add_argument("--loader-batches", type=int, default=40)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (0: the training process)")
    parser.add_argument("--step-batch", type=int, default=None, help="training-step batch (default: small on CPU)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (the median counts)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--gpu-mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for the estimate")
    parser.add_argument("--work-dir", default=None, help="folder for the synthetic images and caches (default: temp)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    cpu = os.cpu_count()
    print(f"device: {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{cpu} CPU threads'}), "
          f"torch threads {torch.get_num_threads()}, precision {args.precision}")  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        for size in args.sizes:
            root = Path(work) / f"images{size}"
            write_folder(root, size, args.images)
            data = ImageDataModule("folder", str(root), batch_size=LOADER_BATCH[size], val_size=0, random_flip=True,
                                   num_workers=args.num_workers, image_size=size, num_channels=3,
                                   cache_dir=str(Path(work) / "cache"))  # fmt: skip
            start = time.perf_counter()
            data.setup("fit")
            decode = args.images / (time.perf_counter() - start)
            host, loader = loader_images_per_second(data, args.loader_batches, device)

            torch.manual_seed(0)
            net, dropped = unet_for(size)
            net = net.to(device)
            batch = args.step_batch or (STEP_BATCH_CPU[size] if device.type == "cpu" else LOADER_BATCH[size])
            x = torch.randn(batch, 3, size, size, device=device)
            schedule = NoiseSchedule.linear(1000).to(device)
            step = make_step(net, "ours", schedule, x, device, dtype, channels_last=False)
            step()  # warm-up
            seconds = median_seconds(step, args.steps, device)
            train = batch / seconds
            flops_per_image = flops(step) / batch
            gpu = args.gpu_mfu * PEAK_TFLOPS[("H100", torch.bfloat16)] * 1e12 / flops_per_image
            note = f" (dropped UNet options not in this checkout: {', '.join(dropped)})" if dropped else ""
            print(f"{size:>3} px: decode {decode:6.0f} img/s once | loader {loader:7.0f} img/s, host part {host:7.0f} "
                  f"img/s (batch {LOADER_BATCH[size]}) | train step {train:8.2f} img/s (batch {batch}, {CONFIGS[size]} UNet, "
                  f"{sum(p.numel() for p in net.parameters()) / 1e6:.1f}M params) | loader/step {loader / train:8.0f}x"
                  f" | estimate: {flops_per_image / 1e9:.0f} GFLOP per trained image, an H100/H200 at "
                  f"{args.gpu_mfu:.0%} MFU bf16 takes {gpu:.0f} img/s, host loader/that {host / gpu:.1f}x{note}",
                  flush=True)  # fmt: skip
            rows.append((size, loader, train))
    worst = min(loader / train for _, loader, train in rows)
    print(f"smallest measured loader/step ratio: {worst:.0f}x (goal >= 10x) {'OK' if worst >= 10 else 'BELOW GOAL'}")


if __name__ == "__main__":
    assert REPO.is_dir()
    main()
