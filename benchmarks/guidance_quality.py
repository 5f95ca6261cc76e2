"""Sample quality against guidance strength, for the ways of bounding x_0-hat (none, the static clip to [-1, 1],
Imagen's dynamic thresholding) and for guidance limited to an interval of noise levels, on a trained class-conditional
model: each variant writes `--num-samples` PNG files through `python -m src.main predict` (what `make sample` runs),
then `python -m src.evaluate` scores them. With a classifier file as `--extractor` (configs/fashion_mnist_fd_classifier.yaml
trains one) the scores are `fd_classifier` (docs/quality.md; NOT an FID) with precision and recall in the same
features, and the label agreement: how often the same classifier gives a sample the label it was drawn with (the
`<label>_<index>.png` file names; real test images agree as often as the classifier's accuracy, its ceiling).

    python benchmarks/guidance_quality.py --ckpt runs/fashion_mnist_cond/version_0/checkpoints/last.ckpt \
        --extractor runs/fashion_mnist_fd_classifier/version_0/classifier.pt --scales 1 2 3 5 \
        --thresholds static 0.995:1.5 0.995:2 0.995:3 --num-samples 1000

Variants are every (scale, threshold, interval) of the lists: a threshold is `none` (clip_denoised false), `static`
(clip_denoised true) or `P:MAX` / `P` (dynamic thresholding at percentile P, s capped at MAX / uncapped); an interval
is `none` (guidance at every step, overriding the config's interval) or `LO:HI` in noise levels sigma
(--model.guidance_interval [LO, HI]); at scale 1 there is no guidance to limit, so only `none` runs there.
docs/samplers.md describes the options.
"""

from __future__ import annotations

import argparse
import shlex
import tempfile
from pathlib import Path

from common import evaluate_samples, predict_samples, quality_cells


def threshold_args(threshold: str) -> list[str]:
    """The predict options of a threshold name: none, static, P or P:MAX."""
    if threshold == "none":
        return ["--model.clip_denoised", "false"]
    if threshold == "static":
        return ["--model.clip_denoised", "true"]
    percentile, _, max_value = threshold.partition(":")
    args = ["--model.clip_denoised", "true", "--model.dynamic_threshold_percentile", str(float(percentile))]
    return args + (["--model.dynamic_threshold_max", str(float(max_value))] if max_value else [])


def interval_args(interval: str) -> list[str]:
    """The predict options of an interval name: none (guidance at every step, whatever the config sets) or LO:HI."""
    if interval == "none":
        return ["--model.guidance_interval", "null"]
    lo, hi = (float(v) for v in interval.split(":"))
    return ["--model.guidance_interval", f"[{lo}, {hi}]"]


def variants(scales: list[float], thresholds: list[str], intervals: list[str]) -> list[tuple[float, str, str]]:
    """(scale, threshold, interval) of every combination; an interval only where there is guidance (scale != 1)."""
    return [(s, th, iv) for s in scales for th in thresholds for iv in intervals if iv == "none" or s != 1.0]


def predict_args(scale: float, threshold: str, interval: str) -> list[str]:
    return ["--model.guidance_scale", str(float(scale)), *threshold_args(threshold), *interval_args(interval)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="a class-conditional DiffusionModule checkpoint")
    parser.add_argument("--config", default="configs/fashion_mnist_cond.yaml")
    parser.add_argument("--extractor", required=True, help="classifier file, standin or inception")
    parser.add_argument("--ref", default="fashion_mnist")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0],
                        help="guidance scales s = 1 + w")  # fmt: skip
    parser.add_argument("--thresholds", nargs="+", default=["static", "0.995:1.5", "0.995:2", "0.995:3"],
                        help="none, static, or P[:MAX] (dynamic thresholding)")  # fmt: skip
    parser.add_argument("--intervals", nargs="+", default=["none"], help="none or LO:HI (guidance interval, sigma)")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--predict-args", default="", help="more predict options, e.g. '--model.sampling_steps 10'")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scale, threshold, interval in variants(args.scales, args.thresholds, args.intervals):
            out = Path(tmp) / f"s{scale}_{threshold}_{interval}".replace(":", "-")
            options = [*predict_args(scale, threshold, interval), *shlex.split(args.predict_args)]
            seconds = predict_samples(args.config, args.ckpt, out, args.num_samples, args.batch_size, options)
            fd, scores = evaluate_samples(out, args.ref, args.extractor, ["--prc"])
            rows.append((scale, threshold, interval, *quality_cells(fd, scores), seconds))
            print(rows[-1], flush=True)
    print(
        f"\n| guidance s | x_0 bound | guidance interval | {fd} | precision | recall | label agreement | predict seconds |"
    )
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for scale, threshold, interval, value, precision, recall, accuracy, seconds in rows:
        cells = [f"{v:.3f}" if v is not None else "-" for v in (value, precision, recall, accuracy)]
        print(f"| {scale:g} | {threshold} | {interval} | {' | '.join(cells)} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
