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
(--model.guidance.interval [LO, HI]); at scale 1 there is no guidance to limit, so only `none` runs there. A guide
is `cfg` (classifier-free guidance at the scale: away from the same net without the label) or the path of a weaker
model (autoguidance at the scale, Karras et al. 2024: --model.guidance.model PATH --model.guidance.autoguidance_scale s, e.g.
a `python -m src.posthoc_ema --step N --format ckpt` copy of the same run stopped early; classifier-free guidance
off unless `--predict-args` turn it on); at scale 1 only the first guide runs. docs/samplers.md describes the
options.

    python benchmarks/guidance_quality.py --ckpt CKPT --extractor CLASSIFIER --scales 1 1.5 2 3 \
        --thresholds static --intervals none --guides cfg runs/guides/step_600.ckpt
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
        return ["--model.sampling.clip_denoised", "false"]
    if threshold == "static":
        return ["--model.sampling.clip_denoised", "true"]
    percentile, _, max_value = threshold.partition(":")
    args = [
        "--model.sampling.clip_denoised",
        "true",
        "--model.sampling.dynamic_threshold_percentile",
        str(float(percentile)),
    ]
    return args + (["--model.sampling.dynamic_threshold_max", str(float(max_value))] if max_value else [])


def interval_args(interval: str) -> list[str]:
    """The predict options of an interval name: none (guidance at every step, whatever the config sets) or LO:HI."""
    if interval == "none":
        return ["--model.guidance.interval", "null"]
    lo, hi = (float(v) for v in interval.split(":"))
    return ["--model.guidance.interval", f"[{lo}, {hi}]"]


def variants(
    scales: list[float], thresholds: list[str], intervals: list[str], guides: list[str] | None = None
) -> list[tuple[float, str, str, str]]:
    """(scale, threshold, interval, guide) of every combination; an interval and a guide only where there is
    guidance (scale != 1): there only no interval and the first guide. A guide's path runs without classifier-free
    guidance, so without an interval: once per scale and threshold, not once per interval."""
    guides = guides or ["cfg"]
    combinations = [
        (s, th, iv if g == "cfg" else "none", g)
        for s in scales
        for th in thresholds
        for iv in intervals
        for g in guides
        if s != 1.0 or (iv == "none" and g == guides[0])
    ]
    return list(dict.fromkeys(combinations))


def predict_args(scale: float, threshold: str, interval: str, guide: str = "cfg") -> list[str]:
    """The predict options of a variant: the scale is classifier-free guidance's, or with a guide's path
    autoguidance's (classifier-free guidance then off: scale 1, no interval)."""
    if guide == "cfg" or scale == 1.0:
        return ["--model.guidance.scale", str(float(scale)), *threshold_args(threshold), *interval_args(interval)]
    autoguidance = ["--model.guidance.model", guide, "--model.guidance.autoguidance_scale", str(float(scale))]
    return ["--model.guidance.scale", "1.0", *threshold_args(threshold), *interval_args("none"), *autoguidance]


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
    parser.add_argument("--guides", nargs="+", default=["cfg"],
                        help="cfg (classifier-free guidance) or a weaker model's checkpoint / export (autoguidance)")  # fmt: skip
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--predict-args", default="", help="more predict options, e.g. '--model.sampling.steps 10'")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (scale, threshold, interval, guide) in enumerate(
            variants(args.scales, args.thresholds, args.intervals, args.guides)
        ):
            out = Path(tmp) / f"{i}_s{scale}_{threshold}_{interval}".replace(":", "-")
            options = [*predict_args(scale, threshold, interval, guide), *shlex.split(args.predict_args)]
            seconds = predict_samples(args.config, args.ckpt, out, args.num_samples, args.batch_size, options)
            fd, scores = evaluate_samples(out, args.ref, args.extractor, ["--prc"])
            # The guide's path as given: src.posthoc_ema names every file sigma_rel_<value>.ckpt, only folders differ.
            rows.append((scale, guide if scale != 1.0 else "-", threshold, interval, *quality_cells(fd, scores),
                         seconds))  # fmt: skip
            print(rows[-1], flush=True)
    print(
        f"\n| guidance s | guide | x_0 bound | guidance interval | {fd} | precision | recall | label agreement "
        "| predict seconds |"
    )
    print("|---:|---|---|---|---:|---:|---:|---:|---:|")
    for scale, guide, threshold, interval, value, precision, recall, accuracy, seconds in rows:
        cells = [f"{v:.3f}" if v is not None else "-" for v in (value, precision, recall, accuracy)]
        print(f"| {scale:g} | {guide} | {threshold} | {interval} | {' | '.join(cells)} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
