"""Shared pieces of the benchmarks: the same UNet built by us and by diffusers, FLOP counts, timing, peaks."""

from __future__ import annotations

import inspect
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from src.models.unet import UNet  # noqa: E402

# Dense peak TFLOP/s per device for MFU (vendor data sheets, no sparsity): bf16 / tf32 tensor cores.
PEAK_TFLOPS = {
    ("H100", torch.bfloat16): 989.0,
    ("H100", torch.float32): 494.5,  # TF32
    ("H200", torch.bfloat16): 989.0,
    ("H200", torch.float32): 494.5,
    ("A100", torch.bfloat16): 312.0,
    ("A100", torch.float32): 156.0,
}


def unet_settings(config: str) -> dict:
    """Every UNet argument of configs/<config>.yaml: its init_args over the defaults of those it leaves out."""
    defaults = {name: p.default for name, p in inspect.signature(UNet).parameters.items()}
    with open(REPO / "configs" / f"{config}.yaml") as f:
        return {**defaults, **yaml.safe_load(f)["model"]["net"]["init_args"]}


def our_unet(s: dict) -> UNet:
    return UNet(**s)


def diffusers_unet(s: dict) -> torch.nn.Module:
    """diffusers' UNet2DModel with the same architecture as `UNet(**s)` (DDPM-style options, one attention head)."""
    from diffusers import UNet2DModel

    resolutions = [s["image_size"] // 2**i for i in range(len(s["channel_mult"]))]
    attn = [r in s["attn_resolutions"] for r in resolutions]
    return UNet2DModel(
        sample_size=s["image_size"],
        in_channels=s["in_channels"],
        out_channels=s["in_channels"],
        block_out_channels=tuple(s["base_channels"] * m for m in s["channel_mult"]),
        layers_per_block=s["num_res_blocks"],
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        norm_num_groups=s["norm_groups"],
        norm_eps=1e-6,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
        attention_head_dim=None,  # one head of all channels, as DDPM
        dropout=s["dropout"],
        add_attention=s.get("mid_attention", True),
    )


def as_eps_fn(name: str, net: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`model(x, t) -> eps` for either network (diffusers returns an output object)."""
    if name == "diffusers":
        return lambda x, t: net(x, t).sample
    return net


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call (matmuls and convolutions, as torch's FlopCounterMode counts them)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def peak_tflops(device: torch.device, dtype: torch.dtype, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for (key, key_dtype), value in PEAK_TFLOPS.items():
        if key in name and key_dtype == dtype:
            return value
    return None


def predict_samples(
    config: str, ckpt: str | Path, out: Path, num_samples: int, batch_size: int, options: list[str]
) -> float:
    """Write `num_samples` PNG files of `ckpt` to `out` through `python -m src.main predict` (what `make sample`
    runs), with `options` added; return the seconds it took (process start included, as a user waits for it)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "src.main", "predict", "--config", config, "--ckpt_path", str(ckpt),
                    *options, "--data.num_samples", str(num_samples), "--data.predict_batch_size", str(batch_size),
                    "--output_dir", str(out), "--trainer.default_root_dir", str(out.parent / "runs"),
                    "--trainer.enable_progress_bar", "false"],
                   cwd=REPO, check=True, capture_output=True)  # fmt: skip
    return time.perf_counter() - start


def evaluate_samples(folder: Path, ref: str, extractor: str, flags: list[str]) -> tuple[str, dict]:
    """`python -m src.evaluate` of a folder of samples: (the distance's key, all scores). The key is `fd_classifier`
    with a classifier file as `extractor` (docs/quality.md; NOT an FID), `fid`, or `fid_standin`."""
    result = subprocess.run([sys.executable, "-m", "src.evaluate", "--samples", str(folder), "--ref", ref,
                             "--extractor", extractor, *flags],
                            cwd=REPO, check=True, capture_output=True, text=True)  # fmt: skip
    scores = json.loads(result.stdout[result.stdout.index("{") :])
    return next(k for k in ("fd_classifier", "fid", "fid_standin") if k in scores), scores


def quality_cells(fd: str, scores: dict) -> tuple[float, float | None, float | None, float | None]:
    """(distance, precision, recall, label agreement) of `evaluate_samples(..., ["--prc"])`'s scores: precision and
    recall in the same features (their keys carry the distance's suffix), the label agreement None unless the
    extractor is a classifier and the file names carry labels."""
    suffix = fd.removeprefix("fd").removeprefix("fid")
    return scores[fd], scores.get(f"precision{suffix}"), scores.get(f"recall{suffix}"), scores.get("label_agreement")
