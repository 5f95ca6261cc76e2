"""Sample quality against the EMA length, chosen after training (post-hoc EMA, Karras et al. 2024): for each
sigma_rel, `python -m src.posthoc_ema` reconstructs the average from the run's PostHocEMA snapshots into a .ckpt,
`python -m src.main predict` writes `--num-samples` PNG files from it (the same sample indices, so the same noise, for
every length) and `python -m src.evaluate` scores them; the run's own sampling EMA (`--model.training.ema_decay`, its
last.ckpt) is the first row. With a classifier file as `--extractor` the scores are `fd_classifier` (docs/quality.md;
NOT an FID), precision, recall and label agreement.

    python benchmarks/posthoc_ema_quality.py --run runs/fashion_mnist_cond/version_0 \
        --extractor runs/fashion_mnist_fd_classifier/version_0/classifier.pt --sigma-rels 0.03 0.05 0.09 0.15 0.25

`--predict-args` adds predict options to every row (e.g. '--model.guidance.scale 2'): EDM2 found that the best
length moves with the guidance scale, so sweep it at the scale you sample with.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, evaluate_samples, predict_samples, quality_cells


def reconstruct(run: str, sigma_rel: float, out_dir: Path) -> tuple[Path, float]:
    """The .ckpt of the post-hoc EMA of length `sigma_rel` and the relative error of its profile fit."""
    result = subprocess.run([sys.executable, "-m", "src.posthoc_ema", run, "--sigma_rel", str(sigma_rel),
                             "--out_dir", str(out_dir), "--format", "ckpt"],
                            cwd=REPO, check=True, capture_output=True, text=True)  # fmt: skip
    error = float(re.search(r"profile error ([0-9.]+)%", result.stdout).group(1)) / 100
    return out_dir / f"sigma_rel_{sigma_rel:.3f}.ckpt", error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="run folder with posthoc_ema/ and checkpoints/last.ckpt")
    parser.add_argument("--config", default="configs/fashion_mnist_cond.yaml")
    parser.add_argument("--extractor", required=True, help="classifier file, standin or inception")
    parser.add_argument("--ref", default="fashion_mnist")
    parser.add_argument("--sigma-rels", type=float, nargs="+", default=[0.03, 0.05, 0.09, 0.15, 0.25])
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--predict-args", default="", help="more predict options, e.g. '--model.guidance.scale 2'")
    args = parser.parse_args()

    options = shlex.split(args.predict_args)
    variants: list[tuple[str, float | None]] = [("run's EMA", None), *((f"{s:.3f}", s) for s in args.sigma_rels)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, sigma_rel in variants:
            error = None
            ckpt = Path(args.run) / "checkpoints" / "last.ckpt"
            if sigma_rel is not None:
                ckpt, error = reconstruct(args.run, sigma_rel, Path(tmp) / "ckpts")
            out = Path(tmp) / f"samples_{sigma_rel or 'run'}"
            seconds = predict_samples(args.config, ckpt, out, args.num_samples, args.batch_size, options)
            fd, scores = evaluate_samples(out, args.ref, args.extractor, ["--prc"])
            rows.append((name, error, *quality_cells(fd, scores), seconds))
            print(rows[-1], flush=True)
    print(f"\n| sigma_rel | profile error | {fd} | precision | recall | label agreement | predict seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, error, *values, seconds in rows:
        cells = [f"{v:.3f}" if v is not None else "-" for v in values]
        print(f"| {name} | {'-' if error is None else f'{error:.1%}'} | {' | '.join(cells)} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
