"""Encoded image files (from a folder or an archive) -> one `ImageSet`.

The size and channel rules need every image's size and mode before any image is conformed. Small
sets are decoded once and kept in memory until the rules are decided; when the decoded pixels would
pass `DECODED_BUDGET` bytes, a header-only pass decides the rules instead and each image is decoded
again and written, already conformed, straight into the (N, C, H, W) array.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .bad_input import DataError, Limits, check_decoded_size
from .imageset import ImageSet
from .imaging import choose_size, conform_pil, decode_pil, is_gray, open_image, orientation, parallel_map

Encoded = tuple[str, "bytes | Path"]  # (name used in errors, the encoded bytes or a file path)

DECODED_BUDGET = 1 << 30
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def images_from_encoded(
    items: Sequence[Encoded],
    labels: Sequence[int] | None,
    class_names: list[str] | None,
    source: str,
    limits: Limits,
    image_size: int | None,
) -> ImageSet:
    if not items:
        raise DataError(source, "no images found")
    labels_array = None if labels is None else np.asarray(labels, np.int64)
    decoded = _decode_within_budget(items, limits)
    if decoded is not None:
        size = choose_size([(img.height, img.width) for img in decoded], limits, image_size)
        channels = 1 if all(img.mode == "L" for img in decoded) else 3
        check_decoded_size((len(items), channels, *size), limits, source)
        out = np.empty((len(items), channels, *size), np.uint8)

        def conform_into(i: int) -> None:
            out[i] = conform_pil(decoded[i], size, channels).transpose(2, 0, 1)
    else:
        headers = parallel_map(lambda item: _header(item, limits), items)
        size = choose_size([(h, w) for h, w, _ in headers], limits, image_size)
        channels = 1 if all(gray for _, _, gray in headers) else 3
        check_decoded_size((len(items), channels, *size), limits, source)
        out = np.empty((len(items), channels, *size), np.uint8)

        def conform_into(i: int) -> None:
            name, data = items[i]
            out[i] = conform_pil(decode_pil(data, name, limits), size, channels).transpose(2, 0, 1)

    parallel_map(conform_into, range(len(items)))
    return ImageSet(out, labels_array, class_names, source)


def _decode_within_budget(items: Sequence[Encoded], limits: Limits) -> list[Image.Image] | None:
    """Every image decoded, or None as soon as their pixels pass the budget."""
    used = 0
    lock = threading.Lock()
    over = threading.Event()

    def decode(item: Encoded) -> Image.Image | None:
        nonlocal used
        if over.is_set():
            return None
        img = decode_pil(item[1], item[0], limits)
        with lock:
            used += img.width * img.height * len(img.getbands())
            if used > DECODED_BUDGET:
                over.set()
                return None
        return img

    decoded = parallel_map(decode, items)
    return None if over.is_set() else decoded


def _header(item: Encoded, limits: Limits) -> tuple[int, int, bool]:
    name, data = item
    with open_image(data, name, limits) as img:
        h, w = img.height, img.width
        if orientation(img) in _ROTATED:
            h, w = w, h
        return h, w, is_gray(img)
