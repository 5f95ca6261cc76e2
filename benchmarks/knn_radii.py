"""The k-NN radii of improved precision/recall (src/metrics/scores.py knn_radii): topk against kthvalue.

    python benchmarks/knn_radii.py [--rows 1000] [--reference 60000] [--k 3]

One block of the computation for Fashion-MNIST's 60,000 reference features: the k+1-th smallest of each row of a
(rows x reference) float64 distance matrix. Prints both times and their ratio, measured in this process.
"""

from __future__ import annotations

import argparse

import torch
from common import cpu_name, median_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--reference", type=int, default=60000)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    distances = torch.rand(args.rows, args.reference, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    device = torch.device("cpu")
    kth = median_seconds(lambda: distances.kthvalue(args.k + 1, dim=1), args.repeats, device)
    top = median_seconds(lambda: distances.topk(args.k + 1, dim=1, largest=False), args.repeats, device)
    same = torch.equal(
        distances.kthvalue(args.k + 1, dim=1).values, distances.topk(args.k + 1, dim=1, largest=False).values[:, -1]
    )
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, {args.rows} x {args.reference} float64, k = {args.k}")
    print(f"kthvalue {kth:.3f} s, topk {top:.3f} s: topk is {kth / top:.1f}x faster; equal values: {same}")


if __name__ == "__main__":
    main()
