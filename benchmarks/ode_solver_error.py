"""Error of each probability-flow ODE solver against a high-accuracy solution of the same ODE, at 5, 10 and 20 model
evaluations, on data whose exact denoiser is closed form (a Gaussian and a 3-component Gaussian mixture, both
image-shaped 2 x 4 x 4; tests/ode_reference.py). Prints the tables of docs/samplers.md, "Accuracy on closed-form data".

Noise levels: the DDPM linear schedule's (T = 1000) sigma_max = 157.4 to sigma_min = 0.0100 on EDM's rho = 7 grid
(Karras et al. 2022, eq. 5) and on the grid uniform in log sigma (DPM-Solver's logSNR spacing), then 0. The reference: scipy RK45 at rtol = atol = 1e-10 in float64 down to sigma_min,
then the final jump x_0 = D(x; sigma_min) that every solver takes. Error: RMS over 64 samples x 32 dimensions.
DDIM is Euler's method in this parametrisation (tests/test_ode_samplers.py checks both DDIM and DPM-Solver++(2M)
against `samplers.ddim_sample` / `samplers.dpm_solver_pp_2m_sample` on integer-timestep grids).

    python benchmarks/ode_solver_error.py
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from ode_reference import DTYPE, SHAPE, gaussian_problem, mixture_problem, reference_solution  # noqa: E402

from src.diffusion import k_samplers as K  # noqa: E402
from src.diffusion.continuous import exponential_sigmas, karras_sigmas, vp_sigmas  # noqa: E402
from src.diffusion.schedule import NoiseSchedule  # noqa: E402

NFES = (5, 10, 20)
SOLVERS = {  # name: (function, evaluations per noise level, paper)
    "DDIM (= Euler)": (K.sample_euler, 1, "Song et al. 2021a, eq. 12"),
    "DPM-Solver++(2M)": (K.sample_dpmpp_2m, 1, "Lu et al. 2022, Alg. 2"),
    "EDM Heun": (K.sample_heun, 2, "Karras et al. 2022, Alg. 1-2"),
    "DPM-Solver++(3M)": (K.sample_dpmpp_3m, 1, "Lu et al. 2022"),
    "UniPC-2 (bh2)": (lambda m, x, s: K.sample_unipc(m, x, s, order=2), 1, "Zhao et al. 2023"),
    "UniPC-3 (bh2)": (lambda m, x, s: K.sample_unipc(m, x, s, order=3), 1, "Zhao et al. 2023"),
    "iPNDM": (K.sample_ipndm, 1, "Zhang & Chen 2023"),
}


def main() -> None:
    torch.set_num_threads(1)
    sigmas = vp_sigmas(NoiseSchedule.linear(1000))
    sigma_min, sigma_max = float(sigmas[0]), float(sigmas[-1])
    x_T = torch.randn(64, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    x = x_T * math.sqrt(1 + sigma_max**2)
    problems = {"Gaussian": gaussian_problem(), "mixture": mixture_problem()}
    references = {name: reference_solution(p, x, sigma_max, sigma_min) for name, p in problems.items()}
    grids = {"Karras rho = 7": karras_sigmas, "uniform in log sigma": exponential_sigmas}
    for grid_name, grid in grids.items():
        header = " | ".join(f"{name} {n}" for name in problems for n in NFES)
        print(f"\nNoise levels: {grid_name}\n")
        print(f"| solver (paper) | {header} |")
        print("|---" * (1 + len(problems) * len(NFES)) + "|")
        for solver, (fn, per_level, paper) in SOLVERS.items():
            cells = []
            for name, problem in problems.items():
                for nfe in NFES:
                    levels = (nfe + 1) // 2 if per_level == 2 else nfe  # Heun: 2 N - 1 evaluations on N levels
                    used = 2 * levels - 1 if per_level == 2 else levels
                    out = fn(problem, x, grid(levels, sigma_min, sigma_max))
                    error = (out - references[name]).pow(2).mean().sqrt().item()
                    cells.append(f"{error:.2e}" + (f" ({used})" if used != nfe else ""))
            print(f"| {solver} ({paper}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
