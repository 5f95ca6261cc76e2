"""Datasets over uint8 image arrays (in memory or memory-mapped), served as whole float batches in [-1, 1]."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset


def to_model_range(images: Tensor) -> Tensor:
    """uint8 images in [0, 255] -> float32 in [-1, 1] (``x / 127.5 - 1``), the range the model works in."""
    # torch.div promotes uint8 to float32 and divides in one pass over a new tensor (the caller's is never
    # touched); 127.5 is exact in float32, so this equals converting first and dividing after.
    scaled = torch.div(images, 127.5) if images.dtype == torch.uint8 else images.to(torch.float32) / 127.5
    return scaled.sub_(1.0)


def passthrough_collate(batch: Any) -> Any:
    """Collate for datasets whose ``__getitems__`` already returns a whole stacked batch."""
    return batch


class InMemoryImageDataset(Dataset):
    """uint8 images ``(N, C, H, W)`` and labels ``(N,)``, served as float32 in [-1, 1].

    The images may be a memory-mapped array (the folder cache, `src/data/folder.py`): a batch reads only its own
    rows, and all processes share the operating system's page cache. Use with ``collate_fn=passthrough_collate``:
    the DataLoader then fetches a batch with one `__getitems__` call (one indexing op) instead of one
    `__getitem__` call per sample.

    Args:
        images: uint8 tensor (N, C, H, W).
        labels: int64 tensor (N,).
        indices: the rows of ``images`` this dataset serves (a split), without copying them; None: all rows.
        uint8: serve the images as uint8 (not scaled), for a loader whose batches are scaled after the
            copy to the device (`ImageDataModule.on_after_batch_transfer`): a quarter of the bytes to copy.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        indices: Tensor | None = None,
        uint8: bool = False,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels must have shape ({len(images)},), got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.indices = None if indices is None else torch.as_tensor(indices, dtype=torch.int64)
        self.uint8 = uint8

    def __len__(self) -> int:
        return len(self.images) if self.indices is None else len(self.indices)

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        """A stacked batch: float32 images (B, C, H, W) in [-1, 1] (uint8 with ``uint8``) and int64 labels (B,)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        if self.indices is not None:
            idx = self.indices[idx]
        x = self.images[idx]  # random flips are the training loader's (src/resume.py: ResumableDataLoader)
        return (x if self.uint8 else to_model_range(x)), self.labels[idx]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        """One sample: float32 image (C, H, W) in [-1, 1] and its int64 label (a 0-d tensor)."""
        x, y = self.__getitems__([index])
        return x[0], y[0]


class SampleIndexDataset(Dataset):
    """The predict set: the sample indices ``0 .. num_samples - 1``, batched as int64 tensors.

    The model derives each sample's noise from its index (and a seed), so the samples do not depend on
    the batch size or the number of processes.
    """

    def __init__(self, num_samples: int) -> None:
        self.num_samples = num_samples

    def __len__(self) -> int:
        return self.num_samples

    def __getitems__(self, indices: Sequence[int]) -> Tensor:
        return torch.as_tensor(indices, dtype=torch.int64)

    def __getitem__(self, index: int) -> Tensor:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"sample index {index} out of range for {self.num_samples} samples")
        return torch.tensor(index % self.num_samples, dtype=torch.int64)
