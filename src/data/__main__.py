"""Decode a folder of images into its cache ahead of a multi-GPU run (one process; prints the cache's path).

    python -m src.data --data_dir DIR --image_size 64 --num_channels 3 [--cache_dir CACHE]

`fit` builds the cache itself when it is missing; for a very large folder, building it first keeps the other GPU
processes from waiting past the distributed timeout while one process decodes.
"""

from __future__ import annotations

import argparse
import sys

from src.data.folder import folder_images


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", required=True, help="the folder of images (as --data.data_dir)")
    parser.add_argument("--image_size", type=int, required=True, help="the network's image_size")
    parser.add_argument("--num_channels", type=int, required=True, choices=(1, 3, 4), help="the network's in_channels")
    parser.add_argument("--cache_dir", default=None, help="as --data.cache_dir (default: $DDIM_DATA_CACHE, then "
                        "~/.cache/ddim-lightning/images)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        images = folder_images(args.data_dir, args.image_size, args.num_channels, args.cache_dir)
    except (FileNotFoundError, OSError) as error:
        sys.exit(f"error: {error}")
    classes = f", {len(images.class_names)} classes" if images.class_names else ""
    state = "decoded into" if images.built else "already in"
    print(f"{len(images.images)} images{classes} {state} {images.path}")


if __name__ == "__main__":
    main()
