"""Image data for diffusion training: MNIST, Fashion-MNIST, CIFAR-10 (via torchvision) or a folder of images.

Images stay uint8 ``(N, C, H, W)``, in memory (built-in sets) or memory-mapped from a decoded cache (folders,
`src/data/folder.py`), and become float32 in ``[-1, 1]`` one whole batch at a time
(`InMemoryImageDataset.__getitems__`), so the loader stays far ahead of the training step.

- `builtin.py`: the built-in sets, read by `torchvision.datasets` (`load_dataset`, `DATASETS`).
- `folder.py`: a folder of images, decoded once into a memory-mapped uint8 cache (`folder_images`).
- `datasets.py`: the uint8-array dataset and the predict set of sample indices.
- `datamodule.py`: `ImageDataModule`, the LightningDataModule the command line builds.
"""

from src.data.builtin import (
    DATASETS,
    DEFAULT_DATA_DIR,
    DatasetInfo,
    DatasetNotFoundError,
    dataset_info,
    download_dataset,
    find_dataset_files,
    load_dataset,
)
from src.data.datamodule import FOLDER, ImageDataModule
from src.data.datasets import InMemoryImageDataset, SampleIndexDataset, passthrough_collate, to_model_range
from src.data.folder import FolderImages, convert_image, folder_images, scan_folder

__all__ = [
    "DATASETS",
    "DEFAULT_DATA_DIR",
    "FOLDER",
    "DatasetInfo",
    "DatasetNotFoundError",
    "FolderImages",
    "ImageDataModule",
    "InMemoryImageDataset",
    "SampleIndexDataset",
    "convert_image",
    "dataset_info",
    "download_dataset",
    "find_dataset_files",
    "folder_images",
    "load_dataset",
    "passthrough_collate",
    "scan_folder",
    "to_model_range",
]
