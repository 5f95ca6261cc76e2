"""Negative log-likelihood of a trained model in bits/dim, two ways on the same test images: the variational bound
(DDPM eq. 5, `likelihood.nll_bits_per_dim`, what `test/bpd` logs) and the exact likelihood through the
probability-flow ODE (Song et al. 2021, appendix D; `ode_likelihood.ode_nll_bits_per_dim`: RK45, Hutchinson
divergence, uniform dequantisation). Prints both, the ODE's function evaluations and the seconds each took.

    python benchmarks/ode_likelihood.py --ckpt runs/fashion_mnist/version_0/checkpoints/last.ckpt --num-images 16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from common import cpu_name

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from src.data import load_dataset, to_model_range  # noqa: E402
from src.diffusion.likelihood import nll_bits_per_dim  # noqa: E402
from src.diffusion.ode_likelihood import DIVERGENCES, ode_nll_bits_per_dim  # noqa: E402
from src.models.diffusion import DiffusionModel  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a .ckpt file, an exported folder or a diffusers folder")
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--num-images", type=int, default=16, help="the first N images of the test split")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--bound-timesteps", type=int, default=None, help="stratified KL terms (default: all)")
    parser.add_argument("--divergence", choices=DIVERGENCES, default="rademacher")
    parser.add_argument("--tol", type=float, default=1e-5, help="RK45 rtol = atol (the paper's 1e-5)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = DiffusionModel.load(args.ckpt)
    schedule, eps_net = model.schedule, model.eps_model()
    images = to_model_range(load_dataset(args.dataset, "test")[0][: args.num_images])
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads; "
          f"{len(images)} {args.dataset} test images, model {args.ckpt}")  # fmt: skip
    bound, ode, nfe = [], [], []
    t_bound = t_ode = 0.0
    for start in range(0, len(images), args.batch_size):
        x = images[start : start + args.batch_size]
        t0 = time.perf_counter()
        bound.append(nll_bits_per_dim(eps_net, x, schedule, args.bound_timesteps,
                                      generator=torch.Generator().manual_seed(start))["bpd"])  # fmt: skip
        t1 = time.perf_counter()
        out = ode_nll_bits_per_dim(model.net, x, schedule, model.prediction, args.divergence, args.tol, args.tol,
                                   generator=torch.Generator().manual_seed(start))  # fmt: skip
        t_bound, t_ode = t_bound + t1 - t0, t_ode + time.perf_counter() - t1
        ode.append(out["bpd"])
        nfe.append(out["nfe"])
    bound_bpd, ode_bpd = torch.cat(bound), torch.cat(ode)
    print(f"variational bound:     {bound_bpd.mean():.3f} bits/dim (std over images {bound_bpd.std():.3f}), "
          f"{t_bound:.0f} s")  # fmt: skip
    print(f"probability-flow ODE:  {ode_bpd.mean():.3f} bits/dim (std over images {ode_bpd.std():.3f}), "
          f"{t_ode:.0f} s, {sum(nfe) / len(nfe):.0f} evaluations per batch ({args.divergence} divergence)")  # fmt: skip


if __name__ == "__main__":
    main()
