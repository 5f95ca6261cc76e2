"""Image data for diffusion training: MNIST, Fashion-MNIST and CIFAR-10, held in memory as uint8.

The raw files are read directly (idx files with numpy, CIFAR-10 pickles with `pickle`), so nothing here
needs torchvision. Images stay uint8 ``(N, C, H, W)`` in memory and become float32 in ``[-1, 1]`` one whole
batch at a time (see `InMemoryImageDataset.__getitems__`), which keeps the data loader far from being the
bottleneck.
"""

import gzip
import hashlib
import os
import pickle
import struct
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.request import Request, urlopen

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from src.resume import ResumableDataLoader

__all__ = [
    "DATASETS",
    "DEFAULT_DATA_DIR",
    "DatasetInfo",
    "DatasetNotFoundError",
    "ImageDataModule",
    "InMemoryImageDataset",
    "SampleIndexDataset",
    "dataset_info",
    "download_dataset",
    "find_dataset_files",
    "load_dataset",
    "passthrough_collate",
    "read_cifar_batch",
    "read_idx",
    "to_model_range",
]

# Where the data sets go when no data_dir is given (downloads land here, and the loaders look here).
DEFAULT_DATA_DIR = "data"


class DatasetNotFoundError(FileNotFoundError):
    """A data set's files are not where we looked; the message (one line) says how to get them."""


@dataclass(frozen=True)
class DatasetInfo:
    """What we know about one data set: shape, classes, file names and where to get them."""

    name: str  # key, as passed to --data.dataset
    title: str  # human name, for messages
    num_channels: int
    image_size: int
    class_names: tuple[str, ...]
    folder: str  # torchvision's layout below data_dir
    files: dict[str, tuple[str, ...]]  # split -> file names the split needs
    md5: dict[str, str]  # downloaded file -> md5
    mirrors: tuple[str, ...]  # base URLs, tried in order
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
        folder="FashionMNIST/raw",
        files=_MNIST_FILES,
        md5={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        mirrors=(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ),
        system_dirs=("/usr/share/datasets/fashion-mnist",),
        apt_package="dataset-fashion-mnist",
    ),
    "mnist": DatasetInfo(
        name="mnist",
        title="MNIST",
        num_channels=1,
        image_size=28,
        class_names=tuple(str(d) for d in range(10)),
        folder="MNIST/raw",
        files=_MNIST_FILES,
        md5={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
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
        folder="cifar-10-batches-py",
        files={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        md5={"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
    ),
}

Split = Literal["train", "test"]


def dataset_info(name: str) -> DatasetInfo:
    """The `DatasetInfo` of ``name``; ValueError naming the valid choices for anything else."""
    try:
        return DATASETS[name]
    except KeyError:
        choices = ", ".join(map(repr, DATASETS))
        raise ValueError(f"unknown dataset {name!r}; choose one of {choices}") from None


# ----------------------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------------------

# idx type codes (third byte of the magic number); multi-byte types are big-endian on disk.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(2)
    # Sniff the gzip magic rather than trusting the suffix: some mirrors serve unpacked files named *.gz.
    opener = gzip.open if head == b"\x1f\x8b" else open
    with opener(path, "rb") as f:
        return f.read()


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (as MNIST ships), gzipped or not, into a writable native-endian numpy array."""
    path = Path(path)
    buf = _read_bytes(path)
    if len(buf) < 4 or buf[0] != 0 or buf[1] != 0 or buf[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (bad magic number {buf[:4].hex()})")
    dtype = np.dtype(_IDX_DTYPES[buf[2]])
    ndim = buf[3]
    offset = 4 + 4 * ndim
    if len(buf) < offset:
        raise ValueError(f"{path}: truncated idx header")
    dims = struct.unpack(f">{ndim}I", buf[4:offset])
    count = int(np.prod(dims, dtype=np.int64))
    size, got = count * dtype.itemsize, len(buf) - offset
    if got != size:
        raise ValueError(f"{path}: header says {dims} ({size} bytes), file has {got}")
    data = np.frombuffer(buf, dtype=dtype, count=count, offset=offset).reshape(dims)
    # Copy: frombuffer over bytes is read-only (torch warns on it), and this also makes it native-endian.
    return data.astype(dtype.newbyteorder("="), copy=True)


def read_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch: uint8 images (N, 3, 32, 32) and int64 labels (N,)."""
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    # Rows are 3072 bytes: the red plane, then green, then blue, each 32x32 row-major, i.e. already CHW.
    images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{path}: {len(images)} images but {len(labels)} labels")
    return images, labels


# ----------------------------------------------------------------------------------------------------------
# Finding files
# ----------------------------------------------------------------------------------------------------------


def _root(data_dir: str | os.PathLike | None) -> Path:
    return Path(data_dir if data_dir is not None else DEFAULT_DATA_DIR).expanduser().absolute()


def _candidate_dirs(info: DatasetInfo, data_dir: str | os.PathLike | None) -> list[Path]:
    root = _root(data_dir)
    user = [root / info.folder, root]
    system = [Path(d) for d in info.system_dirs]
    # An explicit data_dir wins; otherwise prefer what the system package installed.
    return user + system if data_dir is not None else system + user


def _find_file(directory: Path, name: str, info: DatasetInfo) -> Path | None:
    if info.name == "cifar10":
        candidates = [directory / name]
    else:
        # Plain first: torchvision leaves both, and the unpacked one reads faster.
        candidates = [directory / name, directory / f"{name}.gz"]
    return next((p for p in candidates if p.is_file()), None)


def _not_found_message(
    info: DatasetInfo, dirs: Sequence[Path], data_dir: str | os.PathLike | None, partial: str
) -> str:
    looked = ", ".join(map(str, dirs[:-1])) + f" and {dirs[-1]}" if len(dirs) > 1 else str(dirs[0])
    root = _root(data_dir)
    msg = f"{info.title} not found: looked in {looked}{partial}."
    if info.apt_package:
        msg += f" Install it with 'apt-get install -y {info.apt_package}', or"
    else:
        msg += " To get it,"
    if info.name == "cifar10":
        archive = next(iter(info.md5))
        msg += (
            f" download {info.mirrors[0]}{archive} and extract it in {root} (which makes {root / info.folder}"
            f" with data_batch_1 ... data_batch_5 and test_batch),"
        )
    else:
        names = [f"{n}.gz" for split in ("train", "test") for n in info.files[split]]
        msg += (
            f" put {', '.join(names[:-1])} and {names[-1]} (gzipped or not) in {root / info.folder}"
            " (or point --data.data_dir at them),"
        )
    return msg + " or pass --data.download true where there is a network."


def find_dataset_files(name: str, split: Split, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Paths of the files that make up ``split`` of data set ``name`` (idx: images then labels).

    Looks in ``<data_dir>/<torchvision folder>``, in ``data_dir`` itself and, for Fashion-MNIST, in the Debian
    package's folder. Raises `DatasetNotFoundError` with a one-line how-to when no folder has them all.
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


def load_dataset(name: str, split: Split, data_dir: str | os.PathLike | None = None) -> tuple[Tensor, Tensor]:
    """Load a whole split: uint8 images ``(N, C, H, W)`` and int64 labels ``(N,)``.

    Args:
        name: ``"fashion_mnist"``, ``"mnist"`` or ``"cifar10"``.
        split: ``"train"`` or ``"test"`` (the official test set).
        data_dir: folder holding the data (see `find_dataset_files`); None: the system package's folder
            (Fashion-MNIST) and ``./data``.
    """
    info = dataset_info(name)
    paths = find_dataset_files(name, split, data_dir)
    if info.name == "cifar10":
        parts = [read_cifar_batch(p) for p in paths]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
    else:
        images, labels = read_idx(paths[0]), read_idx(paths[1])
        if images.ndim != 3 or labels.ndim != 1:
            raise ValueError(
                f"{paths[0]}, {paths[1]}: expected (N, H, W) images and (N,) labels, "
                f"got {images.shape} and {labels.shape}"
            )
        images = images[:, None]  # add the channel axis
    expected = (info.num_channels, info.image_size, info.image_size)
    if images.shape[1:] != expected or len(images) != len(labels):
        raise ValueError(
            f"{info.title} {split}: got images {images.shape} and labels {labels.shape}, "
            f"expected (N, {', '.join(map(str, expected))}) and (N,)"
        )
    images_t = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8))
    labels_t = torch.from_numpy(labels.astype(np.int64))
    return images_t, labels_t


# ----------------------------------------------------------------------------------------------------------
# Download
# ----------------------------------------------------------------------------------------------------------


def _download(url: str, dest: Path, md5: str) -> None:
    """Fetch ``url`` into ``dest`` through a temporary file in the same folder, so ``dest`` appears whole."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    digest = hashlib.md5(usedforsecurity=False)
    try:
        # Some mirrors refuse urllib's default user agent.
        with (
            os.fdopen(fd, "wb") as f,
            urlopen(Request(url, headers={"User-Agent": "Mozilla/5.0"}), timeout=60) as response,
        ):
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
        if digest.hexdigest() != md5:
            raise OSError(f"checksum mismatch for {url}: md5 {digest.hexdigest()}, expected {md5}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _download_from_mirrors(info: DatasetInfo, filename: str, dest: Path) -> None:
    errors = []
    for base in info.mirrors:
        try:
            _download(base + filename, dest, info.md5[filename])
            return
        except OSError as e:  # URLError and HTTPError are OSErrors too
            errors.append(f"{base + filename}: {e}")
    raise OSError(f"could not download {filename}: " + "; ".join(errors))


def _safe_extract(tar: tarfile.TarFile, dest: Path) -> None:
    """Extract only plain files and folders that stay inside ``dest``."""
    if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4 checks this itself
        tar.extractall(dest, filter="data")
        return
    for member in tar.getmembers():
        target = (dest / member.name).resolve()
        if not (member.isfile() or member.isdir()) or not target.is_relative_to(dest.resolve()):
            raise OSError(f"refusing to extract {member.name!r} from {tar.name}")
    tar.extractall(dest)


def download_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Download data set ``name`` into ``data_dir`` (default ``./data``) in torchvision's layout.

    Files already there are kept; each download is md5-checked and renamed into place only when complete.
    Fashion-MNIST from the system package counts as present. Returns the folder holding the files.
    """
    info = dataset_info(name)
    root = _root(data_dir)
    target = root / info.folder
    try:
        found = [find_dataset_files(name, split, data_dir) for split in info.files]
        return found[0][0].parent
    except DatasetNotFoundError:
        pass
    if info.name == "cifar10":
        archive = next(iter(info.md5))
        archive_path = root / archive
        if not archive_path.is_file() or _md5(archive_path) != info.md5[archive]:
            _download_from_mirrors(info, archive, archive_path)
        # Extract beside the target, then rename, so an interrupted extraction leaves no half folder.
        with tempfile.TemporaryDirectory(dir=root, prefix=".extract.") as tmp:
            with tarfile.open(archive_path, "r:gz") as tar:
                _safe_extract(tar, Path(tmp))
            if target.exists():  # an incomplete earlier copy
                os.rename(target, Path(tmp) / "stale")
            os.replace(Path(tmp) / info.folder, target)
        return target
    for filename in info.md5:
        if _find_file(target, filename.removesuffix(".gz"), info) is None:
            _download_from_mirrors(info, filename, target / filename)
    return target


# ----------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------


def to_model_range(images: Tensor) -> Tensor:
    """uint8 images in [0, 255] -> float32 in [-1, 1] (``x / 127.5 - 1``), the range the model works in."""
    # copy=True: the in-place ops below must never touch the caller's tensor (.to() may return it as is).
    return images.to(torch.float32, copy=True).div_(127.5).sub_(1.0)


def passthrough_collate(batch: Any) -> Any:
    """Collate for datasets whose ``__getitems__`` already returns a whole stacked batch."""
    return batch


class InMemoryImageDataset(Dataset):
    """uint8 images ``(N, C, H, W)`` and labels ``(N,)`` in memory, served as float32 in [-1, 1].

    Use with ``collate_fn=passthrough_collate``: the DataLoader then fetches a batch with one
    `__getitems__` call (one indexing op) instead of one `__getitem__` call per sample.

    Args:
        images: uint8 tensor (N, C, H, W).
        labels: int64 tensor (N,).
        random_flip: flip each image horizontally with probability 1/2.
        generator: RNG for the flips; None uses torch's default RNG, which in a DataLoader worker is the
            worker's own (seeded per worker, so reproducible under ``seed_everything(workers=True)``).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        random_flip: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels must have shape ({len(images)},), got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.random_flip = random_flip
        self.generator = generator

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        """A stacked batch: float32 images (B, C, H, W) in [-1, 1] and int64 labels (B,)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        x = to_model_range(self.images[idx])
        if self.random_flip:
            flip = torch.rand(len(idx), generator=self.generator) < 0.5
            x[flip] = x[flip].flip(-1)
        return x, self.labels[idx]

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


# ----------------------------------------------------------------------------------------------------------
# LightningDataModule
# ----------------------------------------------------------------------------------------------------------


class ImageDataModule(L.LightningDataModule):
    """MNIST, Fashion-MNIST or CIFAR-10 for diffusion training, plus a predict set of sample indices.

    Train/val/test batches are ``(images, labels)``: float32 ``(B, C, H, W)`` in [-1, 1] and int64 ``(B,)``.
    Predict batches are int64 sample indices ``(B,)``.

    Args:
        dataset: which data set: "fashion_mnist", "mnist" or "cifar10".
        data_dir: folder with the data in torchvision's layout (<data_dir>/FashionMNIST/raw,
            <data_dir>/MNIST/raw, <data_dir>/cifar-10-batches-py) or the raw files directly; downloads go
            here. None: the Debian package's folder for Fashion-MNIST (/usr/share/datasets/fashion-mnist),
            and ./data.
        download: download the data set into data_dir when it is missing (needs a network).
        batch_size: batch size for training, validation and test.
        num_workers: DataLoader worker processes (0 loads in the main process, which is fast enough here).
        pin_memory: pin batches in page-locked memory for faster host-to-GPU copies.
        val_size: number of training images held out for validation (a fixed seeded draw); 0 trains on the
            whole training set and validates on the official test set.
        split_seed: seed of the permutation that picks the validation images.
        random_flip: random horizontal flips of training images; None: on for cifar10, off otherwise.
        drop_last: drop the last incomplete training batch (kept when the set is smaller than a batch).
        num_samples: size of the predict set, i.e. how many images `predict` generates.
        predict_batch_size: batch size for predict (sampling).
    """

    def __init__(
        self,
        dataset: str = "fashion_mnist",
        data_dir: str | None = None,
        download: bool = False,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool = False,
        val_size: int = 1000,
        split_seed: int = 0,
        random_flip: bool | None = None,
        drop_last: bool = True,
        num_samples: int = 64,
        predict_batch_size: int = 256,
    ) -> None:
        super().__init__()
        self.info = dataset_info(dataset)  # fail early on a bad name
        for arg, value in [("batch_size", batch_size), ("predict_batch_size", predict_batch_size)]:
            if value < 1:
                raise ValueError(f"{arg} must be positive, got {value}")
        for arg, value in [
            ("num_workers", num_workers),
            ("val_size", val_size),
            ("num_samples", num_samples),
        ]:
            if value < 0:
                raise ValueError(f"{arg} must be >= 0, got {value}")
        self.save_hyperparameters()
        self.dataset = dataset
        self.data_dir = data_dir
        self.download = download
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.val_size = val_size
        self.split_seed = split_seed
        self.random_flip = (dataset == "cifar10") if random_flip is None else random_flip
        self.drop_last = drop_last
        self.num_samples = num_samples
        self.predict_batch_size = predict_batch_size

        self._arrays: dict[str, tuple[Tensor, Tensor]] = {}  # decoded splits, so setup() runs cheaply again
        self.train_set: InMemoryImageDataset | None = None
        self.val_set: InMemoryImageDataset | None = None
        self.test_set: InMemoryImageDataset | None = None
        self.predict_set: SampleIndexDataset | None = None

    # -- facts about the data, available before setup() ----------------------------------------------------

    @property
    def num_channels(self) -> int:
        """Image channels: 1 for (Fashion-)MNIST, 3 for CIFAR-10."""
        return self.info.num_channels

    @property
    def image_size(self) -> int:
        """Image height = width: 28 for (Fashion-)MNIST, 32 for CIFAR-10."""
        return self.info.image_size

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return (self.num_channels, self.image_size, self.image_size)

    @property
    def num_classes(self) -> int:
        """Number of classes (10 for all three data sets)."""
        return self.info.num_classes

    @property
    def class_names(self) -> list[str]:
        """Class names, indexed by label."""
        return list(self.info.class_names)

    # -- Lightning hooks -------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Download when asked (Lightning calls this in one process per node)."""
        if self.download:
            download_dataset(self.dataset, self.data_dir)

    def _split(self, split: Split) -> tuple[Tensor, Tensor]:
        if split not in self._arrays:
            self._arrays[split] = load_dataset(self.dataset, split, self.data_dir)
        return self._arrays[split]

    def train_val_indices(self, num_train: int) -> tuple[Tensor, Tensor]:
        """Indices of the training part and of the held-out validation part of a training set of that size.

        A permutation drawn from its own generator seeded with ``split_seed``: the same split every run and
        on every rank, whatever the global seed.
        """
        if self.val_size >= num_train:
            raise ValueError(f"val_size={self.val_size} leaves no training data out of {num_train} images")
        perm = torch.randperm(num_train, generator=torch.Generator().manual_seed(self.split_seed))
        # Sorted, so the kept images stay in file order (and memory access stays mostly sequential).
        return perm[self.val_size :].sort().values, perm[: self.val_size].sort().values

    def setup(self, stage: str | None = None) -> None:
        """Load what ``stage`` needs: train/val for fit and validate, test for test, indices for predict."""
        if stage in ("fit", "validate", None):
            images, labels = self._split("train")
            if self.val_size > 0:
                train_idx, val_idx = self.train_val_indices(len(images))
                # No flips in the dataset: the training loader draws them (see `train_dataloader`).
                self.train_set = InMemoryImageDataset(images[train_idx], labels[train_idx])
                self.val_set = InMemoryImageDataset(images[val_idx], labels[val_idx])
            else:
                self.train_set = InMemoryImageDataset(images, labels)
                self.val_set = InMemoryImageDataset(*self._split("test"))
        if stage in ("test", None):
            self.test_set = InMemoryImageDataset(*self._split("test"))
        if stage in ("predict", None):
            self.predict_set = SampleIndexDataset(self.num_samples)

    def _loader(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=passthrough_collate,
            # Its own generator, so that starting an epoch (which draws the workers' base seed) never advances
            # the global torch RNG that training draws t and noise from; see src/resume.py.
            generator=torch.Generator().manual_seed(0),
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        assert self.train_set is not None
        # Never drop the only (incomplete) batch of a set smaller than a batch: that would train on nothing.
        drop_last = self.drop_last and len(self.train_set) >= self.batch_size
        # Resumable mid-epoch (Lightning checkpoints its position) with a shuffle and flips that depend only on
        # (seed, epoch, rank, batch index), so a resumed run sees exactly the batches the uninterrupted one would.
        # The seed is the run's (seed_everything); on resume the checkpoint's seed replaces it.
        return ResumableDataLoader(
            self.train_set,
            self.batch_size,
            seed=torch.initial_seed(),
            random_flip=self.random_flip,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=passthrough_collate,
        )

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            self.setup("validate")
        assert self.val_set is not None
        return self._loader(self.val_set, self.batch_size)

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            self.setup("test")
        assert self.test_set is not None
        return self._loader(self.test_set, self.batch_size)

    def predict_dataloader(self) -> DataLoader:
        if self.predict_set is None:
            self.setup("predict")
        assert self.predict_set is not None
        # No shuffling, so batches come in index order; under DDP Lightning adds a DistributedSampler itself.
        return self._loader(self.predict_set, self.predict_batch_size)
