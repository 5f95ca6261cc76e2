"""A folder of images as a data set: scanned recursively, decoded once into a memory-mapped uint8 cache.

The first run decodes every image Pillow can open, converts it to the network's channels and size (shorter side
resized with an antialiasing filter, then a center crop, as ADM's `center_crop_arr`) and writes the pixels into
one raw uint8 file ``(N, C, S, S)`` with a JSON sidecar (labels, class names, skipped files). Later runs, and
every process of a multi-GPU run, memory-map that file: they share the operating system's page cache, so memory
does not grow with the number of processes and data sets larger than RAM stream from disk.

The cache is keyed by the folder's file list, sizes and modification times and by the target size and channels:
a changed folder gets a new cache (and the stale one of the same folder is removed). It is built under a file
lock, into temporary files that are renamed into place, the sidecar last: a build that is interrupted never
leaves a cache that looks complete, and processes that arrive while another builds wait for it and then read it.

Class labels: when every image sits in a subfolder of the root, the subfolder names (sorted) are the classes,
as in torchvision's ImageFolder; images directly in the root make an unlabelled set (all labels 0).
Unreadable or truncated files are skipped with a warning that names them and counts them (never silently).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from src.data.builtin import DatasetNotFoundError

__all__ = [
    "CACHE_ENV",
    "FolderImages",
    "convert_image",
    "default_cache_dir",
    "folder_images",
    "image_extensions",
    "scan_folder",
]

CACHE_ENV = "DDIM_DATA_CACHE"
CACHE_VERSION = 1
# How images are converted; part of the cache key, so changing the method rebuilds every cache.
CONVERSION = "exif-transpose, alpha-on-white, shorter-side-bicubic-antialiased, center-crop"
MODES = {1: "L", 3: "RGB", 4: "RGBA"}
# Below this many images the build decodes in the calling process (a process pool costs more than it saves).
PARALLEL_MIN_IMAGES = 2000


def default_cache_dir() -> Path:
    """$DDIM_DATA_CACHE, else ~/.cache/ddim-lightning/images."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ddim-lightning" / "images")


def image_extensions() -> frozenset[str]:
    """File suffixes (lower case, with the dot) of the formats this Pillow can open."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


# ------------------------------------------------------------------------------------------------- scanning
def scan_folder(root: str | os.PathLike) -> tuple[list[str], list[int], list[str]]:
    """(relative paths, labels, class names) of the images below ``root``, recursively, in sorted order.

    Files whose suffix no Pillow plugin opens (text, archives, ...) and hidden files and folders are ignored.
    Labels come from the first folder level when every image is inside one (class names sorted), else all 0
    with no class names.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(f"--data.data_dir {root}: no such folder (the folder of images to train on)")
    extensions = image_extensions()
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        files += [
            (rel / f).as_posix()
            for f in sorted(filenames)
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in extensions
        ]
    files.sort()  # one order whatever the file system's: row i of the cache is always the same file
    if not files:
        shown = ", ".join(sorted(e for e in extensions if e in {".png", ".jpg", ".jpeg", ".webp", ".bmp"}))
        raise DatasetNotFoundError(f"--data.data_dir {root}: no images found (looked recursively for {shown}, ...)")
    if all("/" in f for f in files):
        class_names = sorted({f.split("/", 1)[0] for f in files})
        index = {name: i for i, name in enumerate(class_names)}
        return files, [index[f.split("/", 1)[0]] for f in files], class_names
    return files, [0] * len(files), []


def folder_key(root: Path, files: list[str], image_size: int, num_channels: int) -> dict:
    """What the cache depends on: every file's path, size and modification time, and the conversion."""
    digest = hashlib.sha256()
    for rel in files:
        st = os.stat(root / rel)
        digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {
        "version": CACHE_VERSION,
        "conversion": CONVERSION,
        "image_size": int(image_size),
        "num_channels": int(num_channels),
        "num_files": len(files),
        "files": digest.hexdigest(),
    }


# ------------------------------------------------------------------------------------------------- decoding
def convert_image(image: Image.Image, image_size: int, num_channels: int) -> np.ndarray:
    """A Pillow image -> uint8 ``(C, S, S)``: upright (EXIF), transparency over white, the network's channels
    (1: L, 3: RGB, 4: RGBA), shorter side resized to S (bicubic, antialiased) and the center S x S kept.

    Raises OSError for a file Pillow cannot decode completely (a truncated PNG or JPEG).
    """
    mode = MODES.get(num_channels)
    if mode is None:
        raise ValueError(f"num_channels must be 1, 3 or 4, got {num_channels}")
    if image.format == "JPEG":  # decode big JPEGs at a reduced scale that still covers S x S (much faster)
        image.draft("L" if num_channels == 1 else "RGB", (image_size, image_size))
    image.load()  # raises OSError on truncated data (we never set ImageFile.LOAD_TRUNCATED_IMAGES)
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / 32-bit grayscale: scale to 8 bits
        pixels = np.asarray(image, dtype=np.float64)
        scale = 255.0 / 65535.0 if pixels.max() > 255 else 1.0
        image = Image.fromarray(np.clip(pixels * scale + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if num_channels != 4 and (image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info):
        # Transparent pixels over white (what a viewer shows), not over whatever colour they happen to hold.
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    image = image.convert(mode)
    width, height = image.size
    scale = image_size / min(width, height)
    size = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
    if size != image.size:
        # Bicubic with Pillow's support scaling is antialiased when shrinking; reducing_gap first box-reduces
        # very large images by an integer factor (as ADM halves them), which is faster and as good.
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (size[0] - image_size) // 2, (size[1] - image_size) // 2
    image = image.crop((left, top, left + image_size, top + image_size))
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _decode_into(
    root: str, files: list[str], start: int, path: str, shape: tuple[int, int, int, int]
) -> list[tuple[int, str]]:
    """Decode ``files`` into rows ``start ...`` of the raw uint8 file ``path``; [(row, reason)] of the failures."""
    images = np.memmap(path, dtype=np.uint8, mode="r+", shape=shape)
    failed = []
    for k, rel in enumerate(files):
        try:
            with Image.open(os.path.join(root, rel)) as image:
                images[start + k] = convert_image(image, shape[-1], shape[1])
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            failed.append((start + k, f"{type(error).__name__}: {error}".splitlines()[0]))
    images.flush()
    return failed


def _num_build_workers() -> int:
    return max(1, min(len(os.sched_getaffinity(0)), 32))


def _decode_all(root: Path, files: list[str], path: Path, shape: tuple[int, int, int, int]) -> list[tuple[int, str]]:
    from tqdm.auto import tqdm

    workers = _num_build_workers()
    chunk = 256
    starts = range(0, len(files), chunk)
    failed: list[tuple[int, str]] = []
    bar = tqdm(total=len(files), desc=f"decoding {root.name} into the image cache", unit="img", leave=False)
    if workers == 1 or len(files) < PARALLEL_MIN_IMAGES:
        for s in starts:
            failed += _decode_into(str(root), files[s : s + chunk], s, str(path), shape)
            bar.update(len(files[s : s + chunk]))
    else:
        # fork: the workers need only numpy and Pillow, and forking skips re-importing torch in each.
        with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
            jobs = [
                (pool.submit(_decode_into, str(root), files[s : s + chunk], s, str(path), shape), s) for s in starts
            ]
            for job, s in jobs:
                failed += job.result()
                bar.update(len(files[s : s + chunk]))
    bar.close()
    return failed


def _compact(path: Path, shape: tuple[int, int, int, int], keep: np.ndarray) -> None:
    """Move the rows ``keep`` (ascending) to the front of the raw file and cut it to that many rows."""
    images = np.memmap(path, dtype=np.uint8, mode="r+", shape=shape)
    for new, old in enumerate(keep.tolist()):
        if new != old:
            images[new] = images[old]
    images.flush()
    del images
    os.truncate(path, len(keep) * int(np.prod(shape[1:])))


# ------------------------------------------------------------------------------------------------- the cache
@dataclass
class FolderImages:
    """A decoded folder: memory-mapped uint8 images ``(N, C, S, S)``, int64 labels ``(N,)`` and the metadata."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    files: list[str]  # relative paths of the decoded images, row by row
    skipped: list[tuple[str, str]]  # (relative path, reason) of the files that could not be read
    path: Path  # the raw uint8 file
    key: dict
    built: bool  # whether this call decoded the folder (False: an existing cache was read)

    @property
    def digest(self) -> str:
        return _digest(self.key)


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (flock), held by one process at a time, released if the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _open(stem: Path, key: dict) -> FolderImages | None:
    """The complete cache at ``stem`` for ``key``, or None (absent, stale, or its build never finished)."""
    meta_path, raw_path = stem.with_suffix(".json"), stem.with_suffix(".u8")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    shape = tuple(meta.get("shape", ()))
    if meta.get("key") != key or len(shape) != 4 or not raw_path.is_file():
        return None
    if raw_path.stat().st_size != int(np.prod(shape)):
        return None
    # mode "c" (copy-on-write): a writable array for torch.from_numpy, but pages stay shared and the file is
    # never written.
    images = np.memmap(raw_path, dtype=np.uint8, mode="c", shape=shape)
    return FolderImages(
        images=images,
        labels=np.asarray(meta["labels"], dtype=np.int64),
        class_names=list(meta["class_names"]),
        files=list(meta["files"]),
        skipped=[tuple(s) for s in meta["skipped"]],
        path=raw_path,
        key=key,
        built=False,
    )


def _build(root: Path, files: list[str], labels: list[int], class_names: list[str], key: dict, stem: Path) -> None:
    """Decode into temporary files beside ``stem`` and rename them into place, the sidecar last."""
    size, channels = key["image_size"], key["num_channels"]
    shape = (len(files), channels, size, size)
    tmp_raw = stem.with_name(f".{stem.name}.{os.getpid()}.u8.tmp")
    tmp_meta = stem.with_name(f".{stem.name}.{os.getpid()}.json.tmp")
    try:
        np.memmap(tmp_raw, dtype=np.uint8, mode="w+", shape=shape).flush()
        failed = dict(_decode_all(root, files, tmp_raw, shape))
        keep = np.array([i for i in range(len(files)) if i not in failed], dtype=np.int64)
        if len(keep) == 0:
            first = next(iter(failed.items()))
            raise DatasetNotFoundError(f"--data.data_dir {root}: none of its {len(files)} images could be read ({files[first[0]]}: "
                          f"{first[1]})")  # fmt: skip
        if failed:
            _compact(tmp_raw, shape, keep)
        meta = {
            "key": key,
            "root": str(root),
            "shape": [len(keep), channels, size, size],
            "class_names": class_names,
            "labels": [labels[i] for i in keep.tolist()],
            "files": [files[i] for i in keep.tolist()],
            "skipped": [[files[i], reason] for i, reason in sorted(failed.items())],
        }
        tmp_meta.write_text(json.dumps(meta))
        os.replace(tmp_raw, stem.with_suffix(".u8"))
        os.replace(tmp_meta, stem.with_suffix(".json"))  # the cache counts as complete from here on
    finally:
        tmp_raw.unlink(missing_ok=True)
        tmp_meta.unlink(missing_ok=True)


def _remove_stale(stem: Path, root: Path) -> None:
    """Delete earlier caches of the same folder at the same size (a changed folder leaves them behind)."""
    prefix = stem.name.rsplit("-", 1)[0] + "-"
    for meta_path in stem.parent.glob(f"{prefix}*.json"):
        if meta_path.with_suffix("") == stem:
            continue
        try:
            if json.loads(meta_path.read_text()).get("root") != str(root):
                continue
        except (OSError, ValueError):
            continue
        meta_path.unlink(missing_ok=True)  # sidecar first: the cache stops counting as complete at once
        meta_path.with_suffix(".u8").unlink(missing_ok=True)  # processes that map it keep their pages


def folder_images(
    data_dir: str | os.PathLike,
    image_size: int,
    num_channels: int,
    cache_dir: str | os.PathLike | None = None,
    warn: bool = True,
) -> FolderImages:
    """The images below ``data_dir`` at ``num_channels`` x ``image_size`` x ``image_size``, from the cache (built
    first when missing or stale; safe to call from many processes at once: one builds, the others wait).

    Warns once per call, naming the files that could not be read and how many were skipped (``warn``).
    """
    root = Path(data_dir).expanduser().absolute()
    files, labels, class_names = scan_folder(root)
    key = folder_key(root, files, image_size, num_channels)
    stem = Path(cache_dir or default_cache_dir()).expanduser().absolute()
    stem = stem / f"{root.name or 'root'}-{image_size}px-{num_channels}ch-{_digest(key)}"
    cached = _open(stem, key)
    built = False
    if cached is None:
        with _locked(stem.with_suffix(".lock")):
            cached = _open(stem, key)  # another process may have built it while we waited for the lock
            if cached is None:
                start = time.perf_counter()
                _build(root, files, labels, class_names, key, stem)
                _remove_stale(stem, root)
                built = True
                cached = _open(stem, key)
                assert cached is not None, f"the cache {stem} was built but cannot be read back"
                print(f"Decoded {len(cached.images)} images of {root} into {cached.path} in "
                      f"{time.perf_counter() - start:.1f} s", flush=True)  # fmt: skip
    cached.built = built
    if warn and cached.skipped:
        shown = "; ".join(f"{path} ({reason})" for path, reason in cached.skipped[:5])
        more = f" and {len(cached.skipped) - 5} more" if len(cached.skipped) > 5 else ""
        warnings.warn(
            f"skipped {len(cached.skipped)} unreadable image file(s) of {len(files)} in {root}: {shown}{more}",
            stacklevel=2,
        )
    return cached
