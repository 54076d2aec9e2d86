"""Data sets by name, from packages on disk (nothing is downloaded).

- ``digits``: scikit-learn's bundled 8x8 digits, values 0..16 scaled to 0..255, one channel, classes
  "0".."9". It has no test split: "train" and "test" both give all 1797 images.
- ``fashion-mnist``: Debian's ``dataset-fashion-mnist`` package (IDX .gz files under
  /usr/share/datasets/fashion-mnist); "train" is the 60k training images, "test" the 10k t10k images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .arrays import image_set_from_array
from .bad_input import DataError, Limits
from .idx import find_idx_pair, read_idx
from .imageset import ImageSet

FASHION_MNIST_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)
FASHION_MNIST_CLASSES = [
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
]
BUILTINS = ("digits", "fashion-mnist")


def builtin_name(source: str) -> str | None:
    """The canonical builtin name for `source` ("Fashion_MNIST" -> "fashion-mnist"), else None."""
    key = source.strip().lower().replace("_", "-")
    if key in ("fashionmnist", "fmnist"):
        key = "fashion-mnist"
    return key if key in BUILTINS else None


def builtin_files(name: str) -> Path | None:
    """The directory a builtin reads from (for cache keys), None for digits."""
    if name == "fashion-mnist":
        return fashion_mnist_dir()
    return None


def fashion_mnist_dir() -> Path:
    for d in FASHION_MNIST_DIRS:
        if d.is_dir():
            return d
    raise DataError(
        "fashion-mnist",
        "data files not found in "
        f"{', '.join(map(str, FASHION_MNIST_DIRS))}; install them with "
        "`apt-get install dataset-fashion-mnist` (or `make fashion-mnist`), or pass a "
        "directory holding the IDX files as the source",
    )


def load_builtin(name: str, split: str, limits: Limits, image_size: int | None) -> ImageSet:
    if split not in ("train", "test"):
        raise DataError(name, f"splits are 'train' and 'test', not '{split}'")
    if name == "digits":
        return _digits(limits, image_size)
    directory = fashion_mnist_dir()
    try:
        find_idx_pair(directory, split)
    except DataError as e:
        raise DataError(
            "fashion-mnist", f"{e}; reinstall with `apt-get install --reinstall dataset-fashion-mnist`"
        ) from e
    return read_idx(
        directory,
        split,
        limits,
        image_size,
        class_names=FASHION_MNIST_CLASSES,
        source="fashion-mnist" if split == "train" else "fashion-mnist (test)",
    )


def _digits(limits: Limits, image_size: int | None) -> ImageSet:
    from sklearn.datasets import load_digits  # sklearn is slow to import; only pay when used

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    return image_set_from_array(
        images, bunch.target.astype(np.int64), [str(i) for i in range(10)], "digits", limits, image_size
    )
