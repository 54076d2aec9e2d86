"""Sources that are already pixel arrays (npz, IDX, CIFAR, STL-10, digits): numpy reshapes only.

The size rule still applies: such a set is resized only when `image_size` asks for another size or a
side is above `Limits.max_side`.
"""

from __future__ import annotations

import numpy as np

from .bad_input import MAX_CLASSES, DataError, Limits, check_class_count, check_decoded_size
from .imageset import ImageSet
from .imaging import choose_size, conform_images


def image_set_from_array(
    images: np.ndarray,
    labels: np.ndarray | None,
    class_names: list[str] | None,
    source: str,
    limits: Limits,
    image_size: int | None,
) -> ImageSet:
    """uint8 (N, C, H, W) -> ImageSet, checking labels and applying the size rule."""
    n, channels, h, w = images.shape
    if n == 0:
        raise DataError(source, "no images")
    check_decoded_size(images.shape, limits, source)
    if labels is not None:
        labels, class_names = check_labels(labels, n, class_names, source)
    size = choose_size([(h, w)], limits, image_size)
    if size != (h, w):
        check_decoded_size((n, channels, *size), limits, source)
        images = conform_images(images.transpose(0, 2, 3, 1), size, channels)
    return ImageSet(np.ascontiguousarray(images), labels, class_names, source)


def check_labels(
    labels: np.ndarray, n: int, class_names: list[str] | None, source: str
) -> tuple[np.ndarray, list[str]]:
    """Integer labels and their class names. Without names, ids below MAX_CLASSES are kept as they
    are (so the train and test splits of a set agree); larger ones are remapped to dense ids 0..C-1
    named by their value, so [0, 1, 2, 10_000_000] is four classes, not ten million."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise DataError(source, f"labels length {labels.shape} does not match {n} images")
    if labels.dtype.kind not in "iu":
        if labels.dtype.kind == "f" and np.all(np.mod(labels, 1) == 0):
            labels = labels.astype(np.int64)
        else:
            raise DataError(source, f"labels must be integers, got {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.min() < 0:
        raise DataError(source, "negative labels")
    if class_names is None and labels.max() < MAX_CLASSES:
        return labels, [str(i) for i in range(int(labels.max()) + 1)]
    if class_names is None:
        values, labels = np.unique(labels, return_inverse=True)
        check_class_count(len(values), source)
        return labels.astype(np.int64).reshape(-1), [str(v) for v in values.tolist()]
    check_class_count(len(class_names), source)
    if labels.max() >= len(class_names):
        raise DataError(source, f"label {labels.max()} but only {len(class_names)} class names")
    return labels, class_names
