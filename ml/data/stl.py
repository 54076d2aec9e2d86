"""STL-10 binary folders: ``train_X.bin``/``train_y.bin``, ``test_X.bin``/``test_y.bin``,
``unlabeled_X.bin`` (split "unlabeled") and ``class_names.txt``.

Images are 3x96x96 uint8 stored column-major per channel, labels uint8 1..10.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .arrays import image_set_from_array
from .bad_input import DataError, Limits
from .imageset import ImageSet

STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
_SIDE = 96
_SPLITS = ("train", "test", "unlabeled")


def is_stl_dir(path: Path) -> bool:
    return any((path / f"{s}_X.bin").is_file() for s in _SPLITS)


def read_stl(directory: Path, split: str, limits: Limits, image_size: int | None) -> ImageSet:
    directory = Path(directory)
    if split == "unlabelled":
        split = "unlabeled"
    if split not in _SPLITS:
        raise DataError(directory, f"STL-10 has splits {', '.join(_SPLITS)}, not '{split}'")
    x_path = directory / f"{split}_X.bin"
    if not x_path.is_file():
        raise DataError(x_path, "missing STL-10 image file")
    per_image = 3 * _SIDE * _SIDE
    size = x_path.stat().st_size
    if size == 0 or size % per_image:
        raise DataError(x_path, f"size {size} is not a multiple of {per_image} (3x96x96); truncated?")
    raw = np.memmap(x_path, np.uint8, mode="r")
    # Column-major per channel: stored (N, C, W, H); swap the last two axes to get CHW.
    images = np.ascontiguousarray(raw.reshape(-1, 3, _SIDE, _SIDE).transpose(0, 1, 3, 2))
    del raw
    labels = names = None
    y_path = directory / f"{split}_y.bin"
    if split != "unlabeled" and y_path.is_file():
        y = np.fromfile(y_path, np.uint8)
        if y.shape[0] != images.shape[0]:
            raise DataError(y_path, f"{y.shape[0]} labels for {images.shape[0]} images")
        if y.size and y.min() < 1:
            raise DataError(y_path, "STL-10 labels start at 1")
        labels = y.astype(np.int64) - 1
        names = _class_names(directory / "class_names.txt") or STL10_CLASSES
    return image_set_from_array(images, labels, names, str(directory), limits, image_size)


def _class_names(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    names = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return names or None
