"""Fréchet Inception Distance: feature statistics and the Fréchet distance between two Gaussians.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium",
eq. 6) is the Fréchet (2-Wasserstein) distance between Gaussians fitted to two sets of features:

    d^2 = ||mu_1 - mu_2||^2 + Tr(sigma_1 + sigma_2 - 2 (sigma_1 sigma_2)^{1/2})

Statistics are the mean and the unbiased (N - 1) covariance, as pytorch-fid and torch-fidelity compute them
(`np.cov(features, rowvar=False)`), always in float64. `StreamingStatistics` accumulates the sum and the sum
of outer products, so the result does not depend on the batch size, and all-reduces them across processes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

ArrayLike = np.ndarray | Tensor


def _as_float64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def feature_statistics(features: ArrayLike) -> tuple[ArrayLike, ArrayLike]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64.

    Same as pytorch-fid's `np.mean(act, axis=0), np.cov(act, rowvar=False)`. Returns numpy arrays for a numpy
    input and CPU float64 tensors for a tensor input.
    """
    x = _as_float64(features)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {x.shape}")
    mu = x.mean(axis=0)
    sigma = np.cov(x, rowvar=False)
    if isinstance(features, Tensor):
        return torch.from_numpy(mu), torch.from_numpy(sigma)
    return mu, sigma


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix via its eigendecomposition;
    eigenvalues below zero (round-off) are clipped to zero."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((sigma1 sigma2)^{1/2}) for symmetric PSD sigma1, sigma2, in float64.

    sigma1 sigma2 is similar to the symmetric PSD matrix M = sigma1^{1/2} sigma2 sigma1^{1/2}
    (M = sigma1^{1/2} (sigma1 sigma2) sigma1^{-1/2}), so both have the same non-negative eigenvalues lambda_i
    and Tr((sigma1 sigma2)^{1/2}) = sum_i sqrt(lambda_i). Two symmetric eigendecompositions (LAPACK syevd)
    replace the general, non-symmetric Schur-based `scipy.linalg.sqrtm`: no complex round-off to discard and
    no failure on singular covariances (fewer samples than dimensions), hence no epsilon offset (pytorch-fid
    adds 1e-6 I to both covariances when sqrtm's result is not finite, which changes the value).
    """
    root1 = _sqrtm_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)  # symmetrise away round-off
    return float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (FID: Heusel et al. 2017, eq. 6).

    Accepts numpy arrays or tensors; computes in float64.
    """
    mu1, mu2, sigma1, sigma2 = (_as_float64(a) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"means must be 1-D of the same length, got {mu1.shape} and {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"covariances must be ({mu1.shape[0]}, {mu1.shape[0]}), got {sigma1.shape} and {sigma2.shape}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))


class StreamingStatistics:
    """Running count, sum and sum of outer products of features (float64), so that mean and covariance do not
    depend on how the features were batched, and can be summed over processes (`all_reduce`).

        mu = S1 / n,   sigma = (S2 - n mu mu^T) / (n - 1)   (the unbiased covariance)
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.dim = dim
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    @property
    def num_samples(self) -> int:
        return int(round(float(self.count)))

    def update(self, features: Tensor) -> None:
        """Add a batch of features (B, D)."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be (B, {self.dim}), got shape {tuple(features.shape)}")
        x = features.detach().to(self.sum.device, torch.float64)
        self.count += x.shape[0]
        self.sum += x.sum(dim=0)
        self.sum_outer += x.T @ x

    def merge(self, other: StreamingStatistics) -> None:
        """Add another accumulator's features (what all_reduce does across processes)."""
        self.count += other.count.to(self.count.device)
        self.sum += other.sum.to(self.sum.device)
        self.sum_outer += other.sum_outer.to(self.sum_outer.device)

    def all_reduce(self, group: object | None = None) -> None:
        """Sum the accumulators of all processes in place (no-op without torch.distributed). Every process
        must call it; the tensors must live on a device the backend supports (CUDA for NCCL)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            for tensor in (self.count, self.sum, self.sum_outer):
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)

    def compute(self) -> tuple[np.ndarray, np.ndarray]:
        """float64 numpy mean (D,) and unbiased covariance (D, D), pytorch-fid's format."""
        n = float(self.count)
        if n < 2:
            raise ValueError(f"need at least 2 samples for a covariance, got {n:g}")
        mu = self.sum.cpu().numpy() / n
        sigma = (self.sum_outer.cpu().numpy() - n * np.outer(mu, mu)) / (n - 1)
        return mu, (sigma + sigma.T) / 2
