"""CIFAR-10 / CIFAR-100 "python version" folders.

CIFAR-10: ``data_batch_1..5`` (split "train") and ``test_batch`` (split "test"), names from
``batches.meta``. CIFAR-100: ``train`` / ``test`` with ``coarse_labels`` and ``fine_labels``, names from
``meta``. CIFAR-100 gives the 20 superclasses by default (CIFAR-100-20, as in the SCAN paper); the
split suffix ``-fine`` (``"train-fine"``, ``"test-fine"``) gives the 100 fine classes instead.

The batches are pickles, and a pickle can run code: they are read with an unpickler that only lets
through the numpy names an array needs, so a hostile file raises DataError instead.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import numpy as np

from .arrays import image_set_from_array
from .bad_input import DataError, Limits
from .imageset import ImageSet

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_SUPERCLASSES = [
    "aquatic_mammals",
    "fish",
    "flowers",
    "food_containers",
    "fruit_and_vegetables",
    "household_electrical_devices",
    "household_furniture",
    "insects",
    "large_carnivores",
    "large_man-made_outdoor_things",
    "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores",
    "medium_mammals",
    "non-insect_invertebrates",
    "people",
    "reptiles",
    "small_mammals",
    "trees",
    "vehicles_1",
    "vehicles_2",
]

_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # how protocol-2 pickles spell bytes
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def load_pickle(path: Path, limits: Limits) -> dict:
    try:
        if path.stat().st_size > limits.max_total_bytes:
            raise DataError(path, f"more than {limits.max_total_bytes} bytes")
        obj = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except DataError:
        raise
    except Exception as e:  # unpickling fails in many ways; all mean "not a CIFAR batch"
        raise DataError(path, f"not a readable CIFAR pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise DataError(path, "not a CIFAR batch (expected a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def is_cifar_dir(path: Path) -> bool:
    return (
        (path / "data_batch_1").is_file()
        or (path / "test_batch").is_file()
        or ((path / "train").is_file() and ((path / "meta").is_file() or (path / "test").is_file()))
    )


def read_cifar(directory: Path, split: str, variant: str, limits: Limits, image_size: int | None) -> ImageSet:
    directory = Path(directory)
    if split not in ("train", "test"):
        raise DataError(directory, f"CIFAR has splits 'train' and 'test', not '{split}'")
    if (directory / "train").is_file() or (directory / "test").is_file():
        return _cifar100(directory, split, variant or "coarse", limits, image_size)
    if variant:
        raise DataError(directory, f"split suffix '-{variant}' applies only to CIFAR-100")
    if split == "train":
        batches = sorted(directory.glob("data_batch_*"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
    else:
        batches = [directory / "test_batch"]
    batches = [b for b in batches if b.is_file()]
    if not batches:
        raise DataError(directory, f"no CIFAR-10 batches for split '{split}'")
    names = _names(directory / "batches.meta", "label_names", limits) or CIFAR10_CLASSES
    parts = [_batch(b, "labels", limits) for b in batches]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return image_set_from_array(images, labels, names, str(directory), limits, image_size)


def _cifar100(directory: Path, split: str, variant: str, limits: Limits, image_size: int | None) -> ImageSet:
    if variant not in ("coarse", "fine"):
        raise DataError(directory, f"unknown CIFAR-100 label set '{variant}' (use coarse or fine)")
    path = directory / split
    if not path.is_file():
        raise DataError(path, f"missing CIFAR-100 '{split}' file")
    images, labels = _batch(path, f"{variant}_labels", limits)
    names = _names(directory / "meta", f"{variant}_label_names", limits)
    if names is None:
        names = CIFAR100_SUPERCLASSES if variant == "coarse" else [str(i) for i in range(100)]
    suffix = "" if variant == "coarse" else " (fine labels)"
    return image_set_from_array(images, labels, names, f"{directory}{suffix}", limits, image_size)


def _batch(path: Path, label_key: str, limits: Limits) -> tuple[np.ndarray, np.ndarray]:
    batch = load_pickle(path, limits)
    if "data" not in batch or label_key not in batch:
        raise DataError(path, f"CIFAR batch without 'data' or '{label_key}' (keys: {', '.join(map(str, batch))})")
    data = np.asarray(batch["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(path, f"CIFAR 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    labels = np.asarray(batch[label_key])
    if labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu":
        raise DataError(path, f"'{label_key}' does not match {data.shape[0]} images")
    # Each row is the red plane, then green, then blue, each 32x32 row-major: already CHW.
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _names(path: Path, key: str, limits: Limits) -> list[str] | None:
    if not path.is_file():
        return None
    names = load_pickle(path, limits).get(key)
    if not isinstance(names, (list, tuple)):
        return None
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
