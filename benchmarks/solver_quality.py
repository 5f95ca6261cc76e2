"""Sample quality of every sampler at (about) the same number of model evaluations, on a trained model: each
sampler writes `--num-samples` PNG files through `python -m src.main predict`, then `python -m src.evaluate` scores
them. With a classifier file as `--extractor` (configs/fashion_mnist_fd_classifier.yaml trains one) the score is
`fd_classifier` (docs/quality.md; NOT an FID), with the real-vs-real and noised-real values beside it.

    python benchmarks/solver_quality.py --ckpt runs/fashion_mnist/version_0/checkpoints/last.ckpt \
        --extractor runs/fashion_mnist_fd_classifier/version_0/classifier.pt --nfe 10 --num-samples 1000

Evaluations per sample for N steps: N for DDIM, DPM-Solver++(2M) (log-SNR steps), Euler-Maruyama, DPM-Solver++(3M),
UniPC and iPNDM; 2N - 1 for EDM's Heun and 2N for predictor-corrector, which therefore get N = (nfe + 1) // 2.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import evaluate_samples, predict_samples

# sampler -> (extra predict options, evaluations per step). The SDE / ODE samplers run on Karras noise levels and
# do not read --model.sampling.skip, so they reset the config's (logsnr in fashion_mnist.yaml) to the default.
KARRAS = ["--model.sampling.skip", "uniform"]
SAMPLERS = {
    "ddim": ([], 1),
    "dpmpp_2m": (["--model.sampling.skip", "logsnr"], 1),
    "euler_maruyama": (KARRAS, 1),
    "pc": (KARRAS, 2),
    "heun": (KARRAS, 2),
    "dpmpp_3m": (KARRAS, 1),
    "unipc": (KARRAS, 1),
    "ipndm": (KARRAS, 1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--config", default="configs/fashion_mnist.yaml")
    parser.add_argument("--extractor", required=True, help="classifier file, standin or inception")
    parser.add_argument("--ref", default="fashion_mnist")
    parser.add_argument("--nfe", type=int, default=10)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--samplers", nargs="*", default=list(SAMPLERS))
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.samplers:
            extra, per_step = SAMPLERS[name]
            steps = args.nfe if per_step == 1 else (args.nfe + 1) // 2
            out = Path(tmp) / name
            options = ["--model.sampling.sampler", name, "--model.sampling.steps", str(steps), *extra]
            seconds = predict_samples(args.config, args.ckpt, out, args.num_samples, args.batch_size, options)
            fd, scores = evaluate_samples(out, args.ref, args.extractor, ["--reference_values"])
            rows.append((name, steps, steps * per_step - (1 if name == "heun" else 0), scores[fd],
                         scores.get(f"{fd}_real_vs_real"), scores.get(f"{fd}_noised_real"), seconds))  # fmt: skip
            print(rows[-1], flush=True)
    print(f"\n| sampler | steps | evaluations | {fd} | real vs real | noised real | predict seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, steps, nfe, value, real, noised, seconds in rows:
        print(f"| {name} | {steps} | {nfe} | {value:.3f} | {real:.3f} | {noised:.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
