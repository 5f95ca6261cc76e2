"""Tests of the built-in data sets (src/data/builtin.py, read by torchvision) and the ImageDataModule on tiny files
written in tmp_path (plus the real Fashion-MNIST when installed). Folders of images: tests/test_folder_data.py."""

import dataclasses
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from src import data
from src.data import (
    DatasetNotFoundError,
    ImageDataModule,
    InMemoryImageDataset,
    SampleIndexDataset,
    load_dataset,
    passthrough_collate,
    to_model_range,
)
from src.errors import ConfigError

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


# -- helpers that write the raw formats ----------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """An idx file's bytes: magic (0, 0, type, ndim), big-endian dims, big-endian data."""
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


def fake_mnist_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255  # make sure both ends of the range occur
    return images, rng.integers(0, 10, size=n).astype(np.uint8)


def write_fake_mnist(directory: Path, n_train: int = 50, n_test: int = 20, gz: bool = True) -> dict:
    """Idx files for both splits in ``directory``; returns the arrays written, by split."""
    arrays = {"train": fake_mnist_arrays(n_train, 1), "test": fake_mnist_arrays(n_test, 2)}
    for split, (images, labels) in arrays.items():
        write_idx(directory / IDX_NAMES[split][0], images, gz)
        write_idx(directory / IDX_NAMES[split][1], labels, gz)
    return arrays


def cifar_batch_bytes(images: np.ndarray, labels: list[int]) -> bytes:
    """A CIFAR-10 python batch as torchvision sees the official (Python 2) files: str keys, (N, 3072) uint8 rows."""
    return pickle.dumps(
        {"batch_label": "fake", "labels": labels, "data": images.reshape(len(images), -1), "filenames": ["x.png"]}
    )


def write_fake_cifar(directory: Path, per_batch: int = 2) -> dict[str, np.ndarray]:
    """Six tiny batches and the class names; image k of the training set has value k at channel k % 3, row 2,
    column 3."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    images = {}
    for i, name in enumerate([*(f"data_batch_{j}" for j in range(1, 6)), "test_batch"]):
        batch = np.zeros((per_batch, 3, 32, 32), dtype=np.uint8)
        for k in range(per_batch):
            batch[k, (i * per_batch + k) % 3, 2, 3] = i * per_batch + k + 1
        labels = [(i * per_batch + k) % 10 for k in range(per_batch)]
        (directory / name).write_bytes(cifar_batch_bytes(batch, labels))
        images[name] = batch
    return images


@pytest.fixture
def fake_mnist(tmp_path: Path) -> tuple[Path, dict]:
    return tmp_path, write_fake_mnist(tmp_path / "MNIST" / "raw")


@pytest.fixture
def no_debian_fashion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Pretend the Debian package is not installed: point its folder at an empty path."""
    absent = tmp_path / "no-debian" / "fashion-mnist"
    info = dataclasses.replace(data.DATASETS["fashion_mnist"], system_dirs=(str(absent),))
    monkeypatch.setitem(data.DATASETS, "fashion_mnist", info)
    return absent


# -- finding and loading -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST/raw"), ("fashion_mnist", "FashionMNIST/raw")])
@pytest.mark.parametrize("layout", ["torchvision", "flat"])
@pytest.mark.parametrize("gz", [True, False])
def test_load_idx_dataset_layouts(tmp_path: Path, name: str, folder: str, layout: str, gz: bool) -> None:
    directory = tmp_path / folder if layout == "torchvision" else tmp_path
    arrays = write_fake_mnist(directory, n_train=6, n_test=4, gz=gz)
    for split, (images, labels) in arrays.items():
        x, y = load_dataset(name, split, tmp_path)
        assert x.dtype == torch.uint8 and x.shape == (len(images), 1, 28, 28)
        assert y.dtype == torch.int64 and y.shape == (len(images),)
        np.testing.assert_array_equal(x[:, 0].numpy(), images)
        np.testing.assert_array_equal(y.numpy(), labels)


@pytest.fixture
def no_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision checks the CIFAR-10 files' md5 sums; the tiny fakes here cannot match them."""
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda path, md5=None: Path(path).is_file())


@pytest.mark.parametrize("layout", ["torchvision", "flat"])
def test_load_cifar10(tmp_path: Path, no_md5: None, layout: str) -> None:
    written = write_fake_cifar(tmp_path / "cifar-10-batches-py" if layout == "torchvision" else tmp_path)
    if layout == "flat":
        (
            tmp_path / "cifar-10-batches-py"
        ).mkdir()  # an empty torchvision folder does not hide the flat files = write_fake_cifar(tmp_path / "cifar-10-batches-py")
    x, y = load_dataset("cifar10", "train", str(tmp_path))
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and y.tolist() == [k % 10 for k in range(10)]
    for k in range(10):  # batches are concatenated in order and each marked pixel lands where it was set
        assert x[k, k % 3, 2, 3] == k + 1 and int(x[k].sum()) == k + 1
    x, y = load_dataset("cifar10", "test", tmp_path)
    assert torch.equal(x, torch.from_numpy(written["test_batch"]))


def test_missing_mnist_message(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist", "train", tmp_path)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "\n" not in msg and msg.startswith("MNIST not found")
    assert str(tmp_path / "MNIST" / "raw") in msg
    for name in ["train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "--data.download true"]:
        assert name in msg


def test_missing_fashion_mnist_message(tmp_path: Path, no_debian_fashion: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion_mnist", "test", tmp_path / "mine")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("Fashion-MNIST not found")
    for part in [
        str(no_debian_fashion),
        str(tmp_path / "mine" / "FashionMNIST" / "raw"),
        "apt-get install -y dataset-fashion-mnist",
        "train-images-idx3-ubyte.gz",
        "--data.download true",
    ]:
        assert part in msg


def test_missing_cifar10_message(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar10", "train", tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("CIFAR-10 not found")
    for part in [
        str(tmp_path / "cifar-10-batches-py"),
        "cifar-10-python.tar.gz",
        "data_batch_1",
        "test_batch",
        "--data.download true",
    ]:
        assert part in msg


def test_partial_folder_is_named(tmp_path: Path) -> None:
    images, _ = fake_mnist_arrays(3, 0)
    write_idx(tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte", images, gz=True)
    with pytest.raises(DatasetNotFoundError, match="lacks t10k-labels-idx1-ubyte"):
        load_dataset("mnist", "test", tmp_path)


def test_unknown_names() -> None:
    with pytest.raises(ValueError, match="fashion_mnist.*mnist.*cifar10"):
        load_dataset("svhn", "train")
    with pytest.raises(ValueError, match="cifar10"):
        ImageDataModule(dataset="svhn")
    with pytest.raises(ValueError, match="split"):
        load_dataset("mnist", "val")  # type: ignore[arg-type]


# -- datasets and loaders ------------------------------------------------------------------------------------


def test_batches_range_dtype_and_getitems_matches_getitem(fake_mnist: tuple[Path, dict]) -> None:
    root, arrays = fake_mnist
    dm = ImageDataModule(dataset="mnist", data_dir=str(root), batch_size=8, val_size=0)
    dm.setup("fit")
    raw, y = next(iter(dm.train_dataloader()))  # uint8 on the host; scaled after the copy to the device
    assert raw.dtype == torch.uint8 and raw.shape == (8, 1, 28, 28)
    x, y2 = dm.on_after_batch_transfer((raw, y), 0)
    assert torch.equal(x, to_model_range(raw)) and y2 is y
    assert torch.equal(dm.on_after_batch_transfer(torch.arange(3), 0), torch.arange(3))  # predict indices pass
    assert x.dtype == torch.float32 and x.shape == (8, 1, 28, 28)
    assert y.dtype == torch.int64 and y.shape == (8,)
    assert x.min() >= -1 and x.max() <= 1

    ds = InMemoryImageDataset(dm.train_set.images, dm.train_set.labels)  # type: ignore[union-attr]
    batches = list(DataLoader(ds, batch_size=7, collate_fn=passthrough_collate))
    xs, ys = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    singles = [ds[i] for i in range(len(ds))]
    assert torch.equal(xs, torch.stack([s[0] for s in singles]))
    assert torch.equal(ys, torch.stack([s[1] for s in singles]))
    # uint8 0 and 255 map exactly to -1 and 1
    assert xs[0, 0, 0, 0] == -1 and xs[0, 0, 0, 1] == 1
    assert torch.equal(xs, torch.from_numpy(arrays["train"][0][:, None]).float() / 127.5 - 1)


def test_flip_only_when_enabled_and_reproducible() -> None:
    """The data set serves images as stored; the training loader flips (src/resume.py), whole images, reproducibly."""
    from src.resume import ResumableDataLoader

    images = torch.randint(0, 256, (64, 3, 4, 5), dtype=torch.uint8)
    labels = torch.arange(64)
    plain = to_model_range(images)
    flipped = plain.flip(-1)
    ds = InMemoryImageDataset(images, labels)
    assert torch.equal(ds.__getitems__(list(range(64)))[0], plain)  # no flips of its own

    def flips(seed: int, random_flip: bool = True) -> torch.Tensor:
        loader = ResumableDataLoader(ds, batch_size=64, seed=seed, random_flip=random_flip,
                                     collate_fn=passthrough_collate)  # fmt: skip
        (x, y), order = next(iter(loader)), list(loader.sampler)[:64]
        assert torch.equal(y, labels[order])
        is_flipped = (x == flipped[order]).flatten(1).all(1)
        assert torch.all(is_flipped | (x == plain[order]).flatten(1).all(1))  # each image whole, flipped or not
        return is_flipped

    a = flips(0)
    assert 0 < int(a.sum()) < 64
    assert torch.equal(a, flips(0))
    assert not torch.equal(a, flips(1))
    assert not flips(0, random_flip=False).any()


def test_random_flip_default() -> None:
    assert ImageDataModule(dataset="cifar10").random_flip is True
    assert ImageDataModule(dataset="mnist").random_flip is False
    assert ImageDataModule(dataset="fashion_mnist").random_flip is False
    assert ImageDataModule(dataset="mnist", random_flip=True).random_flip is True


def test_val_split_deterministic_and_disjoint(fake_mnist: tuple[Path, dict]) -> None:
    root, arrays = fake_mnist
    images = torch.from_numpy(arrays["train"][0][:, None])

    def split(seed: int) -> ImageDataModule:
        dm = ImageDataModule(dataset="mnist", data_dir=str(root), val_size=10, split_seed=seed)
        dm.setup("fit")
        return dm

    dm = split(0)
    assert dm.train_set is not None and dm.val_set is not None
    assert len(dm.train_set) == 40 and len(dm.val_set) == 10
    train_idx, val_idx = dm.train_val_indices(50)
    assert set(train_idx.tolist()).isdisjoint(val_idx.tolist())
    assert sorted(train_idx.tolist() + val_idx.tolist()) == list(range(50))
    assert torch.equal(dm.val_set.images[dm.val_set.indices], images[val_idx])
    assert torch.equal(dm.train_set.images[dm.train_set.indices], images[train_idx])
    assert not getattr(dm.val_dataloader(), "random_flip", False)  # validation images are never flipped

    assert torch.equal(split(0).val_set.indices, dm.val_set.indices)  # type: ignore[union-attr]
    assert not torch.equal(split(1).train_val_indices(50)[1], val_idx)

    with pytest.raises(ValueError, match="val_size"):
        ImageDataModule(dataset="mnist", data_dir=str(root), val_size=50).setup("fit")


def test_val_size_zero_trains_on_all_and_validates_on_test(fake_mnist: tuple[Path, dict]) -> None:
    root, _ = fake_mnist
    dm = ImageDataModule(dataset="mnist", data_dir=str(root), val_size=0, batch_size=64)
    dm.setup("fit")
    assert len(dm.train_set) == 50 and len(dm.val_set) == 20  # type: ignore[arg-type]
    assert len(dm.train_dataloader()) == 1  # drop_last keeps the only batch of a small set
    dm.setup("test")
    assert len(dm.test_set) == 20  # type: ignore[arg-type]


def test_predict_dataloader_yields_indices_in_order() -> None:
    dm = ImageDataModule(num_samples=10, predict_batch_size=3)  # the predict set needs no data files
    batches = list(dm.predict_dataloader())
    assert [len(b) for b in batches] == [3, 3, 3, 1]
    assert all(b.dtype == torch.int64 for b in batches)
    assert torch.equal(torch.cat(batches), torch.arange(10))
    assert SampleIndexDataset(4)[2].item() == 2
    with pytest.raises(IndexError):
        SampleIndexDataset(4)[4]


def test_properties_without_data() -> None:
    dm = ImageDataModule(dataset="cifar10")
    assert (dm.num_channels, dm.image_size, dm.num_classes) == (3, 32, 10)
    assert dm.image_shape == (3, 32, 32)
    assert dm.class_names[0] == "airplane" and dm.class_names[9] == "truck"
    dm = ImageDataModule(dataset="mnist")
    assert (dm.num_channels, dm.image_size, dm.num_classes) == (1, 28, 10)
    assert dm.class_names == [str(d) for d in range(10)]
    assert ImageDataModule().class_names[9] == "Ankle boot"


# -- the real data set ---------------------------------------------------------------------------------------


def test_real_fashion_mnist() -> None:
    if not DEBIAN_FASHION.is_dir():
        pytest.skip(f"{DEBIAN_FASHION} absent (apt-get install -y dataset-fashion-mnist)")
    x, y = load_dataset("fashion_mnist", "train")
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (60000,) and y.dtype == torch.int64
    assert y.unique().tolist() == list(range(10))
    assert y[0] == 9 and ImageDataModule().class_names[int(y[0])] == "Ankle boot"
    assert torch.bincount(y).tolist() == [6000] * 10
    x, y = load_dataset("fashion_mnist", "test")
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
    assert y[0] == 9  # the first test image is an ankle boot too
    assert torch.bincount(y).tolist() == [1000] * 10


def test_real_fashion_mnist_equals_the_idx_bytes() -> None:
    """torchvision's reading of the Debian files, against the idx format read here by hand (16-byte header)."""
    if not DEBIAN_FASHION.is_dir():
        pytest.skip(f"{DEBIAN_FASHION} absent (apt-get install -y dataset-fashion-mnist)")
    raw = gzip.decompress((DEBIAN_FASHION / "t10k-images-idx3-ubyte.gz").read_bytes())
    assert struct.unpack(">4I", raw[:16]) == (0x803, 10000, 28, 28)
    expected = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(10000, 1, 28, 28)
    raw_labels = gzip.decompress((DEBIAN_FASHION / "t10k-labels-idx1-ubyte.gz").read_bytes())
    x, y = load_dataset("fashion_mnist", "test")
    np.testing.assert_array_equal(x.numpy(), expected)
    np.testing.assert_array_equal(y.numpy(), np.frombuffer(raw_labels, dtype=np.uint8, offset=8))


def test_corrupt_cifar10_is_one_line(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path / "cifar-10-batches-py")  # right names, wrong md5 sums
    with pytest.raises(DatasetNotFoundError, match="incomplete or corrupt") as info:
        load_dataset("cifar10", "train", tmp_path)
    assert "\n" not in str(info.value)


class FakeTrainer:
    def __init__(self, world_size: int) -> None:
        self.world_size, self.global_rank, self.lightning_module = world_size, 0, None


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_batch_size_is_global_and_split_over_processes(fake_mnist: tuple[Path, dict], world_size: int) -> None:
    root, _ = fake_mnist
    dm = ImageDataModule(dataset="mnist", data_dir=str(root), batch_size=8, val_size=10)
    dm.trainer = FakeTrainer(world_size)  # type: ignore[assignment]
    assert dm.per_process_batch_size == 8 // world_size
    dm.setup("fit")
    assert dm.train_dataloader().batch_size == 8 // world_size
    assert dm.val_dataloader().batch_size == 8 // world_size


def test_batch_size_that_the_processes_cannot_split_is_one_line(fake_mnist: tuple[Path, dict]) -> None:
    root, _ = fake_mnist
    dm = ImageDataModule(dataset="mnist", data_dir=str(root), batch_size=6, val_size=10)
    dm.trainer = FakeTrainer(4)  # type: ignore[assignment]
    with pytest.raises(ConfigError, match=r"--data.batch_size 6 is the global batch .* 4 processes") as info:
        dm.setup("fit")
    assert "\n" not in str(info.value)
