"""The built-in data sets (MNIST, Fashion-MNIST, CIFAR-10), read by `torchvision.datasets`.

torchvision reads the files and downloads them (`--data.download true`); this file only finds them (the Debian
package's gzipped Fashion-MNIST included), turns them into uint8 ``(N, C, H, W)`` tensors and explains, in one
line, what to put where when they are missing.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from src.errors import ConfigError, UserError

__all__ = [
    "DATASETS",
    "DEFAULT_DATA_DIR",
    "DatasetInfo",
    "DatasetNotFoundError",
    "check_data_dir",
    "dataset_info",
    "download_dataset",
    "load_dataset",
]

# Where the data sets go when no data_dir is given (downloads land here, and the loaders look here).
DEFAULT_DATA_DIR = "data"

Split = Literal["train", "test"]


class DatasetNotFoundError(UserError, FileNotFoundError):
    """A data set's files are not where we looked; the message (one line) says how to get them."""


@dataclass(frozen=True)
class DatasetInfo:
    """What we know about one built-in data set: shape, classes, and where torchvision and Debian keep it."""

    name: str  # key, as passed to --data.dataset
    title: str  # human name, for messages
    num_channels: int
    image_size: int
    class_names: tuple[str, ...]
    torchvision_class: str  # the class in torchvision.datasets
    folder: str  # torchvision's layout below data_dir
    files: dict[str, tuple[str, ...]]  # split -> file names the split needs (idx files: unpacked names)
    archive_url: str  # what to download by hand, for the not-found message
    system_dirs: tuple[str, ...] = ()  # where a distribution package puts the files
    apt_package: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

DATASETS: dict[str, DatasetInfo] = {
    "fashion_mnist": DatasetInfo(
        name="fashion_mnist",
        title="Fashion-MNIST",
        num_channels=1,
        image_size=28,
        class_names=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        torchvision_class="FashionMNIST",
        folder="FashionMNIST/raw",
        files=_MNIST_FILES,
        archive_url="https://github.com/zalandoresearch/fashion-mnist/tree/master/data/fashion",
        system_dirs=("/usr/share/datasets/fashion-mnist",),
        apt_package="dataset-fashion-mnist",
    ),
    "mnist": DatasetInfo(
        name="mnist",
        title="MNIST",
        num_channels=1,
        image_size=28,
        class_names=tuple(str(d) for d in range(10)),
        torchvision_class="MNIST",
        folder="MNIST/raw",
        files=_MNIST_FILES,
        archive_url="https://ossci-datasets.s3.amazonaws.com/mnist/",
    ),
    "cifar10": DatasetInfo(
        name="cifar10",
        title="CIFAR-10",
        num_channels=3,
        image_size=32,
        class_names=(
            "airplane",
            "automobile",
            "bird",
            "cat",
            "deer",
            "dog",
            "frog",
            "horse",
            "ship",
            "truck",
        ),
        torchvision_class="CIFAR10",
        folder="cifar-10-batches-py",
        # torchvision also reads the class names from batches.meta.
        files={
            "train": (*(f"data_batch_{i}" for i in range(1, 6)), "batches.meta"),
            "test": ("test_batch", "batches.meta"),
        },
        archive_url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    ),
}


def dataset_info(name: str) -> DatasetInfo:
    """The `DatasetInfo` of ``name``; a ConfigError (a ValueError) naming the valid choices for anything else."""
    try:
        return DATASETS[name]
    except KeyError:
        choices = ", ".join(map(repr, [*DATASETS, "folder"]))
        raise ConfigError(f"--data.dataset {name!r} is unknown; choose one of {choices}") from None


def _root(data_dir: str | os.PathLike | None) -> Path:
    return Path(data_dir if data_dir is not None else DEFAULT_DATA_DIR).expanduser().absolute()


def _candidate_dirs(info: DatasetInfo, data_dir: str | os.PathLike | None) -> list[Path]:
    root = _root(data_dir)
    user = [root / info.folder, root]
    # An explicit data_dir is the only place looked in: falling back to the system package's copy would train on
    # other data than the one asked for, and record the wrong folder in config.yaml. Without one, the system
    # package's copy comes first, then ./data.
    return user if data_dir is not None else [Path(d) for d in info.system_dirs] + user


def _find_file(directory: Path, name: str, info: DatasetInfo) -> Path | None:
    # idx files: unpacked first (torchvision leaves both, and the unpacked one reads faster), then gzipped.
    candidates = [directory / name] if info.name == "cifar10" else [directory / name, directory / f"{name}.gz"]
    return next((p for p in candidates if p.is_file()), None)


def _how_to_place(info: DatasetInfo, root: Path) -> str:
    """Which files to fetch by hand and where to put them below `root` (the data_dir)."""
    if info.name == "cifar10":
        return (
            f"download {info.archive_url} and extract it in {root} (which makes {root / info.folder}"
            " with data_batch_1 ... data_batch_5, test_batch and batches.meta)"
        )
    names = [f"{n}.gz" for split in ("train", "test") for n in info.files[split]]
    return (
        f"put {', '.join(names[:-1])} and {names[-1]} (gzipped or not; from {info.archive_url}) in"
        f" {root / info.folder} (or point --data.data_dir at them)"
    )


def _holds_images(root: Path) -> bool:
    """Whether `root` or one of its subfolders holds an image file (a look at two levels, not a full scan)."""
    suffixes = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
    try:
        entries = list(root.iterdir())
        if any(e.suffix.lower() in suffixes for e in entries if e.is_file()):
            return True
        return any(f.suffix.lower() in suffixes for d in entries if d.is_dir() for f in d.iterdir())
    except OSError:
        return False


def _not_found_message(info: DatasetInfo, dirs: list[Path], data_dir: str | os.PathLike | None, partial: str) -> str:
    looked = ", ".join(map(str, dirs[:-1])) + f" and {dirs[-1]}" if len(dirs) > 1 else str(dirs[0])
    root = _root(data_dir)
    msg = f"{info.title} not found: looked in {looked}{partial}."
    if data_dir is not None and _holds_images(root):
        # The usual cause: a folder of one's own images given to a built-in data set's config.
        msg += (
            f" {root} holds image files: to train on them, use the folder recipe (--config configs/folder32.yaml,"
            ' make train CONFIG=configs/folder32.yaml ARGS="--data.data_dir DIR") or --data.dataset folder.'
        )
    if info.apt_package and data_dir is None:
        msg += f" Install it with 'apt-get install -y {info.apt_package}', or"
    else:
        msg += " To get it,"
    msg += f" {_how_to_place(info, root)},"
    msg += " or pass --data.download true where there is a network"
    if info.system_dirs and data_dir is not None:
        system = " or ".join(info.system_dirs)
        install = f" ('apt-get install -y {info.apt_package}')" if info.apt_package else ""
        msg += f", or leave --data.data_dir unset to read the system copy in {system}{install}"
    return msg + "."


def check_data_dir(name: str, data_dir: str | os.PathLike | None) -> None:
    """Raise `DatasetNotFoundError` (one line) when an explicit ``data_dir`` for data set ``name`` does not exist:
    it is the only place looked in (see `_candidate_dirs`), so the mistake is named before anything runs."""
    if data_dir is None or Path(data_dir).expanduser().is_dir():
        return
    info = dataset_info(name)
    msg = f"--data.data_dir {data_dir}: no such folder. Fix the path, or {_how_to_place(info, _root(data_dir))}"
    msg += ", or add --data.download true to download it there"
    if info.system_dirs:
        msg += f", or leave --data.data_dir unset to read the system copy in {' or '.join(info.system_dirs)}"
    raise DatasetNotFoundError(msg)


def find_dataset_files(name: str, split: Split, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Paths of the files that make up ``split`` of data set ``name`` (idx: images then labels).

    Looks in ``<data_dir>/<torchvision folder>`` and in ``data_dir`` itself; without a ``data_dir``, first in the
    Debian package's folder (Fashion-MNIST), then in ``./data``. Raises `DatasetNotFoundError` with a one-line
    how-to when no folder has them all.
    """
    info = dataset_info(name)
    if split not in info.files:
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    dirs = _candidate_dirs(info, data_dir)
    partial = ""
    for directory in dirs:
        found = [_find_file(directory, n, info) for n in info.files[split]]
        if all(p is not None for p in found):
            return found  # type: ignore[return-value]
        missing = [n for n, p in zip(info.files[split], found, strict=True) if p is None]
        if len(missing) < len(found) and not partial:
            partial = f" ({directory} lacks {', '.join(missing)})"
    raise DatasetNotFoundError(_not_found_message(info, dirs, data_dir, partial))


def _torchvision_root(info: DatasetInfo, files: list[Path], tmp: Path) -> Path:
    """A root folder in torchvision's layout holding ``files``: their own folder's parent when it already is one
    (with every file torchvision checks for), else ``tmp`` with links to them, gzipped idx files unpacked there
    (torchvision reads only unpacked ones)."""
    folder = files[0].parent
    every = [folder / name for names in info.files.values() for name in names]
    if folder.as_posix().endswith(info.folder) and all(p.is_file() for p in every):
        return Path(folder.as_posix()[: -len(info.folder)])
    target = tmp / info.folder
    target.mkdir(parents=True)
    for path in files:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as src, open(target / path.stem, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        else:
            (target / path.name).symlink_to(path.absolute())
    # torchvision insists that both splits exist, though it reads only one: the other split's files when they are
    # there (CIFAR-10 checks their md5 sums), else empty stand-ins that are never read.
    for name in (n for names in info.files.values() for n in names):
        if not (target / name).exists():
            if (folder / name).is_file():
                (target / name).symlink_to((folder / name).absolute())
            else:
                (target / name).touch()
    return tmp


def load_dataset(name: str, split: Split, data_dir: str | os.PathLike | None = None) -> tuple[Tensor, Tensor]:
    """Load a whole split with torchvision: uint8 images ``(N, C, H, W)`` and int64 labels ``(N,)``.

    Args:
        name: ``"fashion_mnist"``, ``"mnist"`` or ``"cifar10"``.
        split: ``"train"`` or ``"test"`` (the official test set).
        data_dir: folder holding the data in torchvision's layout, or the raw files directly (idx files gzipped
            or not); None: the system package's folder (Fashion-MNIST) and ``./data``.
    """
    import torchvision.datasets as tvd

    info = dataset_info(name)
    files = find_dataset_files(name, split, data_dir)
    with tempfile.TemporaryDirectory(prefix="ddim-data-") as tmp:
        root = _torchvision_root(info, files, Path(tmp))
        try:
            data = getattr(tvd, info.torchvision_class)(str(root), train=split == "train", download=False)
        except RuntimeError as error:  # torchvision: "Dataset not found or corrupted" (a CIFAR-10 md5 mismatch)
            raise DatasetNotFoundError(
                f"{info.title} in {files[0].parent} is incomplete or corrupt ({error}); "
                + _not_found_message(info, [files[0].parent], data_dir, "").split(". ", 1)[1]
            ) from None
        images, labels = data.data, data.targets
    if isinstance(images, np.ndarray):  # CIFAR-10: (N, H, W, C) numpy
        images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    else:  # (Fashion-)MNIST: (N, H, W) tensor
        images = images[:, None].contiguous()
    labels = torch.as_tensor(labels, dtype=torch.int64)
    expected = (info.num_channels, info.image_size, info.image_size)
    if tuple(images.shape[1:]) != expected or len(images) != len(labels):
        raise ValueError(
            f"{info.title} {split}: got images {tuple(images.shape)} and labels {tuple(labels.shape)}, "
            f"expected (N, {', '.join(map(str, expected))}) and (N,)"
        )
    return images.to(torch.uint8), labels


def download_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Download data set ``name`` into ``data_dir`` (default ``./data``) with torchvision, unless it is found
    already (Fashion-MNIST from the system package counts). Returns the folder holding the files."""
    import torchvision.datasets as tvd

    info = dataset_info(name)
    try:
        return [find_dataset_files(name, split, data_dir) for split in info.files][0][0].parent
    except DatasetNotFoundError:
        pass
    root = _root(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    try:
        for train in (True, False):
            getattr(tvd, info.torchvision_class)(str(root), train=train, download=True)
    except (OSError, RuntimeError) as error:  # no network (URLError), a mirror down, a checksum mismatch
        # torchvision's message lists every mirror it tried over several lines; the last line is the reason.
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise DatasetNotFoundError(
            f"--data.download true: downloading {info.title} failed ({lines[-1] if lines else type(error).__name__});"
            f" to install it by hand, {_how_to_place(info, root)} and drop --data.download"
        ) from error
    return root / info.folder
