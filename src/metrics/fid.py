"""Fréchet Inception Distance: feature statistics and the Fréchet distance between two Gaussians.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium",
eq. 6) is the Fréchet (2-Wasserstein) distance between Gaussians fitted to two sets of features:

    d^2 = ||mu_1 - mu_2||^2 + Tr(sigma_1 + sigma_2 - 2 (sigma_1 sigma_2)^{1/2})

Statistics are the mean and the unbiased (N - 1) covariance, as pytorch-fid and torch-fidelity compute them
(`np.cov(features, rowvar=False)`), always in float64. The torchmetrics `Metric`s `FeatureStatistics` and
`FrechetDistance` accumulate the sum and the sum of outer products, so the result does not depend on the batch
size, and torchmetrics sums them across processes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

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


class FeatureStatistics(Metric):
    """Mean and unbiased covariance of every feature vector passed to `update`, over all processes.

    The states are float64 sums, reduced across processes by torchmetrics' sync ("sum"), so the result depends
    neither on how the features were batched nor on how they were split over processes:

        mu = S1 / n,   sigma = (S2 - n mu mu^T) / (n - 1)   (S1 = sum x, S2 = sum x x^T; the unbiased covariance)

    `compute()` returns float64 tensors (mu (D,), sigma (D, D)). Every process must call it (it is a collective).
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, num_features: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_features = int(num_features)
        self.computed_num_samples = 0  # the count the last compute() saw, summed over the processes
        self.add_state("num_samples", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("feature_sum", torch.zeros(self.num_features, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state(
            "outer_sum", torch.zeros(self.num_features, self.num_features, dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(self, features: Tensor) -> None:
        """Add a batch of features (B, D)."""
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"features must be (B, {self.num_features}), got shape {tuple(features.shape)}")
        x = features.detach().to(self.feature_sum.device, torch.float64)
        self.num_samples += x.shape[0]
        self.feature_sum += x.sum(dim=0)
        self.outer_sum += x.T @ x

    def _mean_and_covariance(self) -> tuple[Tensor, Tensor]:
        n = float(self.num_samples)
        self.computed_num_samples = int(round(n))  # after compute(), `num_samples` is this process's count again
        if n < 2:
            raise ValueError(f"need at least 2 samples for a covariance, got {n:g}")
        mu = self.feature_sum / n
        sigma = (self.outer_sum - n * torch.outer(mu, mu)) / (n - 1)
        return mu, (sigma + sigma.T) / 2

    def compute(self) -> tuple[Tensor, Tensor]:
        return self._mean_and_covariance()


class FrechetDistance(FeatureStatistics):
    """Squared Fréchet distance (`frechet_distance`, FID's formula) between the Gaussian fitted to the features
    passed to `update` and a reference Gaussian (mu, sigma) loaded with `load_reference`.

    The reference statistics are fixed data, not an accumulation: they live in buffers (`reference_mean`,
    `reference_cov`, part of the metric's `state_dict`) that `reset()` keeps and the sync leaves alone, so every
    process holds the same reference and no D x D matrix is all-gathered at every evaluation for nothing.
    Load them from a pytorch-fid / torch-fidelity .npz, from the cache (`src.metrics.evaluation`), or from a
    `FeatureStatistics` of real features. `compute()` returns a float64 scalar tensor.
    """

    higher_is_better = False

    def __init__(self, num_features: int, reference: tuple[ArrayLike, ArrayLike] | None = None, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        # NaN until loaded: a state_dict carries the reference and whether there is one.
        self.register_buffer("reference_mean", torch.full((self.num_features,), torch.nan, dtype=torch.float64))
        self.register_buffer("reference_cov", torch.full((self.num_features,) * 2, torch.nan, dtype=torch.float64))
        if reference is not None:
            self.load_reference(*reference)

    def load_reference(self, mu: ArrayLike, sigma: ArrayLike) -> None:
        """Set the reference Gaussian (float64 copies of `mu` (D,) and `sigma` (D, D))."""
        mu, sigma = torch.as_tensor(_as_float64(mu)), torch.as_tensor(_as_float64(sigma))
        if mu.shape != (self.num_features,) or sigma.shape != (self.num_features,) * 2:
            raise ValueError(
                f"reference statistics have dimension {tuple(mu.shape)} / {tuple(sigma.shape)}, "
                f"the features {self.num_features}: were they computed with another feature extractor?"
            )
        self.reference_mean = mu.to(self.reference_mean.device)
        self.reference_cov = sigma.to(self.reference_cov.device)

    @property
    def has_reference(self) -> bool:
        return not bool(torch.isnan(self.reference_mean).any())

    def compute(self) -> Tensor:
        if not self.has_reference:
            raise RuntimeError("FrechetDistance has no reference statistics: call load_reference(mu, sigma) first")
        mu, sigma = self._mean_and_covariance()
        value = frechet_distance(mu, sigma, self.reference_mean, self.reference_cov)
        return torch.tensor(value, dtype=torch.float64)
