"""Improved precision/recall (Kynkaanniemi et al. 2019) against a brute-force numpy computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from src.metrics.scores import precision_recall


def brute_force(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x: np.ndarray) -> np.ndarray:
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def coverage(queries: np.ndarray, support: np.ndarray) -> float:
        d = np.linalg.norm(queries[:, None] - support[None], axis=-1)
        return float(np.mean((d <= radii(support)[None]).any(axis=1)))

    return coverage(fake, real), coverage(real, fake)


@pytest.mark.parametrize("k, shift", [(3, 0.0), (3, 1.0), (5, 0.5), (1, 2.0)])
def test_matches_brute_force(k: int, shift: float) -> None:
    rng = np.random.default_rng(k)
    real = rng.normal(size=(60, 4))
    fake = rng.normal(size=(45, 4)) * 0.7 + shift
    ours = precision_recall(real, fake, k=k, batch_size=16)  # several chunks
    assert ours == pytest.approx(brute_force(real, fake, k), abs=1e-12)


def test_extremes() -> None:
    rng = np.random.default_rng(0)
    real = rng.normal(size=(50, 3))
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)
    # A generator that covers only part of the data: high precision, low recall.
    precision, recall = precision_recall(real, real[real[:, 0] > 0.5])
    assert precision == 1.0 and recall < 0.6


def test_knn_radii_equal_the_sorted_distances_with_ties() -> None:
    from src.metrics.scores import knn_radii

    rng = np.random.default_rng(1)
    # Integer points on a small grid: many equal distances, and duplicated points (distance 0 to a neighbour).
    x = rng.integers(0, 3, size=(40, 2)).astype(np.float64)
    expected = np.sort(np.linalg.norm(x[:, None] - x[None], axis=-1), axis=1)[:, 3]
    assert np.array_equal(knn_radii(torch.as_tensor(x), k=3, batch_size=7).numpy(), expected)
