"""ImageDataModule: the built-in data sets or a folder of images, for training, validation, test and predict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from src.data.builtin import DatasetInfo, Split, check_data_dir, dataset_info, download_dataset, load_dataset
from src.data.datasets import InMemoryImageDataset, SampleIndexDataset, passthrough_collate, to_model_range
from src.data.folder import FolderImages, folder_images, scan_folder
from src.data.latent_cache import DTYPES as LATENT_CACHE_DTYPES
from src.data.latent_cache import CachedLatentDataset, latent_cache
from src.errors import ConfigError
from src.models.first_stage import tensors_digest
from src.resume import ResumableDataLoader

FOLDER = "folder"
# The validation images held out of the training set when --data.val_size is not given: 1,000 for the built-in sets
# (every shipped result used that split) and for large folders; 5% of a smaller folder (see `num_held_out`).
DEFAULT_VAL_SIZE = 1000
FOLDER_VAL_FRACTION = 0.05


class ImageDataModule(L.LightningDataModule):
    """MNIST, Fashion-MNIST, CIFAR-10 or a folder of images for diffusion training, plus a predict set of indices.

    Train/val/test batches are ``(images, labels)``: float32 ``(B, C, H, W)`` in [-1, 1] and int64 ``(B,)``. The
    loaders yield the images as uint8 (a quarter of the bytes to copy to the device, flipped on the host) and
    `on_after_batch_transfer` scales them on the device, so the model sees float32 in [-1, 1]; a loader used by
    hand needs ``to_model_range`` (or that hook). Predict batches are int64 sample indices ``(B,)``.

    Args:
        dataset: which data set: "fashion_mnist", "mnist", "cifar10", or "folder" (the images below data_dir).
        data_dir: "folder": the folder of images (read recursively; class subfolders become labels). Built-in
            sets: the folder with the data in torchvision's layout (<data_dir>/FashionMNIST/raw,
            <data_dir>/MNIST/raw, <data_dir>/cifar-10-batches-py) or the raw files directly; downloads go here.
            A given data_dir is the only place looked in (a missing one is an error, never a fallback). None: the
            Debian package's folder for Fashion-MNIST (/usr/share/datasets/fashion-mnist), then ./data.
        download: download a built-in data set into data_dir when it is missing (needs a network).
        batch_size: the GLOBAL training batch: the images of one training step summed over all processes (the
            batch papers quote). Each of the trainer's world_size processes loads batch_size / world_size, and a
            batch_size that the number of processes does not divide is an error. Validation and test use the same
            per-process batch. (Gradient accumulation multiplies the batch of an optimizer step on top.)
        num_workers: DataLoader worker processes (0 loads in the main process, which is fast enough here).
        pin_memory: pin batches in page-locked memory for faster host-to-GPU copies.
        val_size: number of training images held out for validation (a fixed seeded draw). None (the default):
            1,000 for the built-in sets (the split every shipped result used); for a folder 5% of its images, at
            least 1 and at most 1,000 (a folder of 50 images holds out 2; a folder of one image, none). Built-in
            sets: 0 trains on the whole training set and validates on the official test set. "folder": the
            held-out images are the validation and the test set (0: neither).
        split_seed: seed of the permutation that picks the validation images.
        random_flip: random horizontal flips of training images; None: on for cifar10 and folder, off otherwise.
        drop_last: drop the last incomplete training batch (kept when the set is smaller than a batch).
        num_samples: size of the predict set, i.e. how many images `predict` generates.
        predict_batch_size: batch size of predict (sampling), per process (it changes no sample, only memory).
        image_size: "folder": the height = width images are converted to. The command line sets it from the
            network (model.net.init_args.image_size, which --image_size sets); built-in sets keep their own size.
        num_channels: "folder": the channels images are converted to (1: grayscale, 3: RGB, 4: RGBA). The command
            line sets it from the network (model.net.init_args.in_channels).
        cache_dir: "folder": where the decoded uint8 cache goes (default: $DDIM_DATA_CACHE, then
            ~/.cache/ddim-lightning/images); every process and every later run with the same folder and size
            reads it. The latent cache goes to <cache_dir>/latents (default $DDIM_DATA_CACHE/latents, then
            ~/.cache/ddim-lightning/latents).
        latent_cache: latent diffusion (--model.first_stage LatentFirstStage): train on the posterior moments of
            every training image, encoded once into a memory-mapped cache (src/data/latent_cache.py) that every
            process and every later run with the same autoencoder and images reads, instead of encoding each batch;
            z = mean + std * eps is still drawn afresh at every step. Validation and test still encode images.
        latent_cache_dtype: "float16" (half the bytes) or "float32" (the encoder's own numbers: training equals the
            uncached run's up to the encoder's batch-size rounding).
    """

    def __init__(
        self,
        dataset: str = "fashion_mnist",
        data_dir: str | None = None,
        download: bool = False,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool = False,
        val_size: int | None = None,
        split_seed: int = 0,
        random_flip: bool | None = None,
        drop_last: bool = True,
        num_samples: int = 64,
        predict_batch_size: int = 256,
        image_size: int | None = None,
        num_channels: int | None = None,
        cache_dir: str | None = None,
        latent_cache: bool = False,
        latent_cache_dtype: str = "float16",
    ) -> None:
        super().__init__()
        self.info: DatasetInfo | None = None if dataset == FOLDER else dataset_info(dataset)  # fail early
        if dataset == FOLDER and not data_dir:
            raise ConfigError("--data.dataset folder needs --data.data_dir DIR, the folder of images to train on")
        if dataset == FOLDER and download:
            raise ConfigError("--data.download applies to the built-in data sets only, not to --data.dataset folder")
        for arg, value in [("batch_size", batch_size), ("predict_batch_size", predict_batch_size)]:
            if value < 1:
                raise ConfigError(f"--data.{arg} must be positive, got {value}")
        for arg, value in [("num_workers", num_workers), ("val_size", val_size), ("num_samples", num_samples)]:
            if value is not None and value < 0:
                raise ConfigError(f"--data.{arg} must be >= 0, got {value}")
        if num_channels is not None and num_channels not in (1, 3, 4):
            raise ConfigError(f"--data.dataset folder converts images to 1, 3 or 4 channels, not {num_channels}")
        if image_size is not None and image_size < 1:
            raise ConfigError(f"image_size must be positive, got {image_size}")
        if latent_cache_dtype not in LATENT_CACHE_DTYPES:
            raise ConfigError(f"--data.latent_cache_dtype {latent_cache_dtype!r} is unknown; choose one of "
                              f"{', '.join(LATENT_CACHE_DTYPES)}")  # fmt: skip
        self.save_hyperparameters()
        self.dataset = dataset
        self.data_dir = data_dir
        self.download = download
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.val_size = val_size
        self.split_seed = split_seed
        self.random_flip = (dataset in ("cifar10", FOLDER)) if random_flip is None else random_flip
        self.drop_last = drop_last
        self.num_samples = num_samples
        self.predict_batch_size = predict_batch_size
        self._image_size = image_size
        self._num_channels = num_channels
        self.cache_dir = cache_dir
        self.latent_cache = latent_cache
        self.latent_cache_dtype = latent_cache_dtype

        self._arrays: dict[str, tuple[Tensor, Tensor]] = {}  # decoded splits, so setup() runs cheaply again
        self._folder: FolderImages | None = None
        self._class_names: list[str] | None = None  # folder: from the scan, or from a checkpoint
        self.train_set: InMemoryImageDataset | None = None
        self.val_set: InMemoryImageDataset | None = None
        self.test_set: InMemoryImageDataset | None = None
        self.predict_set: SampleIndexDataset | None = None

    # -- facts about the data, available before setup() ----------------------------------------------------

    @property
    def is_folder(self) -> bool:
        return self.dataset == FOLDER

    def _folder_shape(self) -> tuple[int, int]:
        if self._image_size is None or self._num_channels is None:
            raise ConfigError(
                "--data.dataset folder needs the image size and channels to convert to: the command line takes "
                "them from --model.net.init_args.image_size and in_channels; in Python pass "
                "ImageDataModule(..., image_size=S, num_channels=C)"
            )
        return self._image_size, self._num_channels

    @property
    def num_channels(self) -> int:
        """Image channels: 1 for (Fashion-)MNIST, 3 for CIFAR-10; a folder's are converted to `num_channels`."""
        return self._folder_shape()[1] if self.info is None else self.info.num_channels

    @property
    def image_size(self) -> int:
        """Image height = width: 28 for (Fashion-)MNIST, 32 for CIFAR-10; a folder's are converted to it."""
        return self._folder_shape()[0] if self.info is None else self.info.image_size

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return (self.num_channels, self.image_size, self.image_size)

    @property
    def class_names(self) -> list[str]:
        """Class names, indexed by label; a folder's class subfolders (empty when its images are unlabelled)."""
        if self.info is not None:
            return list(self.info.class_names)
        if self._class_names is None:
            self._class_names = scan_folder(self.data_dir)[2]
        return list(self._class_names)

    @property
    def num_classes(self) -> int:
        """Number of classes (10 for the built-in sets; a folder's class subfolders, 0 without)."""
        return len(self.class_names)

    # -- processes and batches -----------------------------------------------------------------------------

    @property
    def world_size(self) -> int:
        """Number of training processes: the trainer's, else torch.distributed's, else 1."""
        if self.trainer is not None:
            return self.trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
        return 1

    @property
    def per_process_batch_size(self) -> int:
        """`batch_size` (global) / world_size: what one process loads per training step.

        Why `batch_size` is global rather than per process (with a second, global flag beside it): papers quote the
        batch of one step over all devices, and the learning rate and EMA are tuned to it, so a recipe must mean
        the same on 1 GPU or 64; one knob for one quantity also leaves nothing to get out of step. On one process
        (the quickstart) the two readings coincide, so nothing changes there.
        """
        world = self.world_size
        if self.batch_size % world:
            raise ConfigError(
                f"--data.batch_size {self.batch_size} is the global batch and must split evenly over the {world} "
                f"processes (trainer devices x nodes); use a multiple of {world}, e.g. "
                f"{max(world, self.batch_size // world * world)}"
            )
        return self.batch_size // world

    # -- Lightning hooks -------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Download when asked, or decode a folder into its cache (Lightning calls this in one process per node,
        before the others set up, so they find the cache complete)."""
        predicting = self.trainer is not None and self.trainer.state.fn == "predict"
        if self.is_folder and not predicting:  # predict samples from noise: it needs no images
            self._load_folder()
        elif self.download:
            download_dataset(self.dataset, self.data_dir)

    def check_data_dir(self) -> None:
        """A built-in set's explicit data_dir that does not exist is an error (one line) unless it is to be
        downloaded into; the command line calls this before fit, validate and test start (predict needs no data)."""
        if not self.is_folder and not self.download:
            check_data_dir(self.dataset, self.data_dir)

    def _load_folder(self, warn: bool = True) -> FolderImages:
        if self._folder is None:
            size, channels = self._folder_shape()
            self._folder = folder_images(self.data_dir, size, channels, self.cache_dir, warn=warn)
            self._class_names = self._folder.class_names
        return self._folder

    def _split(self, split: Split) -> tuple[Tensor, Tensor]:
        """All images and labels of a split: a built-in set's official split, or the whole folder (any split)."""
        if split not in self._arrays:
            if self.is_folder:
                folder = self._load_folder(warn=self.trainer is None or self.trainer.global_rank == 0)
                # No copy: the tensor views the memory-mapped cache.
                self._arrays[split] = (torch.from_numpy(folder.images), torch.from_numpy(folder.labels))
            else:
                self._arrays[split] = load_dataset(self.dataset, split, self.data_dir)
        return self._arrays[split]

    def num_held_out(self, num_train: int) -> int:
        """How many of ``num_train`` training images are held out for validation: `val_size`, or its default.

        The default scales with a folder, so that a folder of a few dozen images trains (a fixed 1,000 rejected
        every folder of 1,000 images or fewer), while a large one validates on 1,000 images as the built-in sets
        do; the built-in sets keep the 1,000 of every earlier run.
        """
        if self.val_size is not None:
            return self.val_size
        if not self.is_folder:
            return DEFAULT_VAL_SIZE
        if num_train < 2:
            return 0  # one image: train on it, nothing left to validate on
        return min(DEFAULT_VAL_SIZE, max(1, int(num_train * FOLDER_VAL_FRACTION)))

    def train_val_indices(self, num_train: int) -> tuple[Tensor, Tensor]:
        """Indices of the training part and of the held-out validation part of a training set of that size.

        A permutation drawn from its own generator seeded with ``split_seed``: the same split every run and
        on every rank, whatever the global seed.
        """
        val_size = self.num_held_out(num_train)
        if val_size >= num_train:
            where = f" in {self.data_dir}" if self.is_folder else ""
            raise ConfigError(
                f"--data.val_size {val_size} leaves no training images out of the {num_train}{where}; "
                "set a smaller --data.val_size"
            )
        perm = torch.randperm(num_train, generator=torch.Generator().manual_seed(self.split_seed))
        # Sorted, so the kept images stay in file order (and memory access stays mostly sequential).
        return perm[val_size:].sort().values, perm[:val_size].sort().values

    def check_num_classes(self, num_classes: int | None) -> None:
        """ConfigError (one line) unless a folder has as many class subfolders as a class-conditional net has
        classes. Cheap (a scan of the file names): the command line calls it before the folder is decoded."""
        if not self.is_folder or not num_classes or len(self.class_names) == num_classes:
            return
        if not self.class_names:
            # A flat folder under a class-conditional recipe, e.g. `make train`'s Fashion-MNIST one: what the user
            # wants is the folder recipe (an unconditional RGB net), not 10 classes of which 9 never occur.
            raise ConfigError(
                f"the network is class-conditional (--model.net.init_args.num_classes {num_classes}) but "
                f"{self.data_dir} has no class subfolders: train it with the folder recipe, --config "
                f'configs/folder32.yaml (make train CONFIG=configs/folder32.yaml ARGS="--data.data_dir '
                f'{self.data_dir}"), or set --model.net.init_args.num_classes null'
            )
        found = ", ".join(self.class_names[:5]) + (", ..." if len(self.class_names) > 5 else "")
        raise ConfigError(
            f"the network is class-conditional with --model.net.init_args.num_classes {num_classes}, but "
            f"{self.data_dir} has {len(self.class_names)} class subfolders ({found}); set num_classes to the number "
            "of subfolders, or null for an unconditional net"
        )

    def _check_labels_fit_the_net(self) -> None:
        """A class-conditional net needs as many classes as the folder has class subfolders."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        self.check_num_classes(getattr(getattr(module, "net", None), "num_classes", None))

    def setup(self, stage: str | None = None) -> None:
        """Load what ``stage`` needs: train/val for fit and validate, test for test, indices for predict."""
        if stage in ("fit", "validate", "test", None):
            self.check_data_dir()
        if stage in ("fit", "validate", None):
            self.per_process_batch_size  # noqa: B018 (a global batch the processes cannot split fails here)
            images, labels = self._split("train")
            if self.is_folder or self.num_held_out(len(images)) > 0:
                train_idx, val_idx = self.train_val_indices(len(images))
                if self.is_folder and self.val_size is None:
                    rank_zero_info(f"Holding out {len(val_idx)} of the {len(images)} images of {self.data_dir} for "
                                   "validation and test (5%, at most 1,000; set --data.val_size N to change)")  # fmt: skip
                # No flips in the dataset: the training loader draws them (see `train_dataloader`).
                self.train_set = InMemoryImageDataset(images, labels, indices=train_idx, uint8=True)
                self.val_set = InMemoryImageDataset(images, labels, indices=val_idx, uint8=True)
            else:
                self.train_set = InMemoryImageDataset(images, labels, uint8=True)
                self.val_set = InMemoryImageDataset(*self._split("test"), uint8=True)
            self._check_labels_fit_the_net()
        if stage in ("test", None):
            if self.is_folder:  # a folder has no official test split: test on the held-out images
                images, labels = self._split("test")
                val_idx = self.train_val_indices(len(images))[1]
                self.test_set = InMemoryImageDataset(images, labels, indices=val_idx, uint8=True)
            else:
                self.test_set = InMemoryImageDataset(*self._split("test"), uint8=True)
        if stage in ("predict", None):
            self.predict_set = SampleIndexDataset(self.num_samples)

    def _cached_latents(self, train_set: InMemoryImageDataset) -> CachedLatentDataset:
        """The training set as posterior moments from the latent cache (built here the first time). Called from
        `train_dataloader`, which Lightning calls after it restored a checkpoint's weights: at `setup` a resumed
        run's first stage still holds the freshly initialised weights it was rebuilt with."""
        images, labels, indices = train_set.images, train_set.labels, train_set.indices
        module = self.trainer.lightning_module if self.trainer is not None else None
        first_stage = getattr(getattr(module, "model", None), "first_stage", None)
        if first_stage is None or not hasattr(first_stage, "encode_moments"):
            raise ConfigError(
                "--data.latent_cache true caches a latent diffusion model's training latents: it needs "
                "--model.first_stage src.models.first_stage.LatentFirstStage (with its autoencoder path) and a "
                "trainer; drop --data.latent_cache otherwise"
            )
        images_key = f"folder-{self._load_folder().digest}" if self.is_folder else (
            f"{self.dataset}-train-{tensors_digest([('images', images)])}")  # fmt: skip
        root = Path(self.cache_dir) / "latents" if self.cache_dir else None
        device = first_stage.latent_std.device  # the run's device, where the module is by now
        moments = latent_cache(first_stage.encode_moments, first_stage.autoencoder_digest(), images, images_key,
                               orientations=2 if self.random_flip else 1, dtype=self.latent_cache_dtype,
                               cache_dir=root, device=device, progress=self.trainer.global_rank == 0)  # fmt: skip
        rank_zero_info(f"Latent cache: {tuple(moments.shape)} {self.latent_cache_dtype} posterior moments of the "
                       f"training images (--data.latent_cache)")  # fmt: skip
        return CachedLatentDataset(moments, labels, indices)

    def reference_images(self, split: Split) -> tuple[Tensor, str]:
        """uint8 images for FID reference statistics and the name their cache file is keyed by.

        Built-in sets: the official split. A folder: "train" is the whole folder (memory-mapped, read batch by
        batch; like CIFAR-10's training set, which includes the held-out validation images), "test" its held-out
        images; the name carries the cache's digest, so a changed folder gets new statistics.
        """
        if not self.is_folder:
            return load_dataset(self.dataset, split, self.data_dir)[0], self.dataset
        images = self._split("train")[0]
        if split == "test":
            images = images[self.train_val_indices(len(images))[1]]
        return images, f"folder-{self._load_folder().digest}"

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """uint8 image batches become float32 in [-1, 1] on the device (the random flips were drawn on the host by
        the loader, so a resumed run still sees exactly the same images)."""
        if isinstance(batch, (tuple, list)) and isinstance(batch[0], Tensor) and batch[0].dtype == torch.uint8:
            return (to_model_range(batch[0]), *batch[1:])
        return batch

    # -- checkpoint: the class names travel with the model ---------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the class names, so `predict` knows a folder's classes without the folder."""
        if not self.is_folder:
            return {}
        return {"dataset": self.dataset, "class_names": self.class_names}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = state.get("class_names")
        if names is None or not self.is_folder:
            return
        if self._folder is not None and list(names) != self._folder.class_names:
            raise ConfigError(
                f"the checkpoint was trained on the classes {list(names)} but {self.data_dir} now has "
                f"{self._folder.class_names}; train a new model or restore the folder"
            )
        self._class_names = list(names)

    # -- loaders ---------------------------------------------------------------------------------------------

    def _loader(self, dataset: Dataset, batch_size: int) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
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
        dataset: Dataset = self.train_set
        if self.latent_cache:
            dataset = self._cached_latents(self.train_set)
        batch_size = self.per_process_batch_size
        # Never drop the only (incomplete) batch of a set smaller than a batch: that would train on nothing.
        drop_last = self.drop_last and len(dataset) >= batch_size
        # Resumable mid-epoch (Lightning checkpoints its position) with a shuffle and flips that depend only on
        # (seed, epoch, rank, batch index), so a resumed run sees exactly the batches the uninterrupted one would.
        # The seed is the run's (seed_everything); on resume the checkpoint's seed replaces it.
        return ResumableDataLoader(
            dataset,
            batch_size,
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
        return self._loader(self.val_set, self.per_process_batch_size)

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            self.setup("test")
        assert self.test_set is not None
        return self._loader(self.test_set, self.per_process_batch_size)

    def predict_dataloader(self) -> DataLoader:
        if self.predict_set is None:
            self.setup("predict")
        assert self.predict_set is not None
        if self.is_folder and self._class_names:
            # Files are named <label>_<index>.png; the checkpoint's class names say what each label is.
            names = ", ".join(f"{i} = {name}" for i, name in enumerate(self._class_names))
            rank_zero_info(f"Class labels of {self.data_dir}: {names}")
        # No shuffling, so batches come in index order; under DDP Lightning adds a DistributedSampler itself.
        return self._loader(self.predict_set, self.predict_batch_size)
