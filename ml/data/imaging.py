"""Decoding one image and conforming images to one size and channel count.

Ingest and /predict both go through `conform_pil`, so a new image is resized and converted exactly
like the training images were. The rules themselves are documented in `ml/data/__init__.py`.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .bad_input import DataError, Limits

# Only the formats the issue asks for: every extra PIL plugin is extra attack surface.
PIL_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
MIN_SIDE = 8

_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})

T = TypeVar("T")
R = TypeVar("R")


def parallel_map(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """`map` over a thread pool: PIL decodes and resizes without holding the GIL."""
    workers = min(8, os.cpu_count() or 1)
    if workers <= 1 or len(items) < 32:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items, chunksize=max(1, len(items) // (workers * 8))))


def open_image(data: bytes | Path, name: str, limits: Limits) -> Image.Image:
    """Open (header only) and check the pixel count before anything is decoded."""
    src = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        img = Image.open(src, formats=PIL_FORMATS)
    except Image.DecompressionBombError as e:
        raise DataError(name, f"decompression bomb: {e}") from e
    except UnidentifiedImageError as e:
        raise DataError(name, "not an image or unknown format (expected PNG, JPEG, WebP or BMP)") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DataError(name, f"corrupt image ({e})") from e
    pixels = img.width * img.height
    cap = min(limits.max_image_pixels, Image.MAX_IMAGE_PIXELS or limits.max_image_pixels)
    if pixels > cap:
        img.close()
        raise DataError(
            name, f"decompression bomb: {img.width}x{img.height} = {pixels} pixels is more than the limit of {cap}"
        )
    if img.width < 1 or img.height < 1:
        raise DataError(name, "corrupt image (empty)")
    return img


def orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright). Only read when an EXIF block is already at hand:
    asking a PNG for it would decode the whole image. A broken EXIF block counts as upright."""
    if "exif" not in img.info:
        return 1
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block must not reject an image it only rotates
        return 1


def is_gray(img: Image.Image) -> bool:
    """The channel rule looks at the decoded mode: these modes become one channel."""
    return img.mode in _GRAY_MODES


def decode_pil(
    data: bytes | Path, name: str, limits: Limits = Limits(), at_least: tuple[int, int] | None = None
) -> Image.Image:
    """Decode into mode "L" (gray modes) or "RGB" (everything else).

    With ``at_least=(H, W)``, a JPEG much larger than that is decoded at a reduced scale (libjpeg's
    DCT scaling via PIL's draft), still covering (H, W) in either orientation: a 6000 px photo sent
    to /predict never becomes a full-size array. Other formats have no such step and are bounded by
    ``limits.max_image_pixels`` instead.
    """
    img = open_image(data, name, limits)
    try:
        with img:
            if at_least is not None and img.format == "JPEG":
                scale = max(
                    at_least[0] / img.height, at_least[1] / img.width, at_least[0] / img.width, at_least[1] / img.height
                )
                if scale < 0.5:
                    img.draft(
                        img.mode if img.mode in ("L", "RGB") else None,
                        (math.ceil(img.width * scale), math.ceil(img.height * scale)),
                    )
            img.load()
            if orientation(img) != 1:  # photos are stored sideways with an EXIF flag
                img = ImageOps.exif_transpose(img)
            return _to_l_or_rgb(img)
    except DataError:
        raise
    except Image.DecompressionBombError as e:
        raise DataError(name, f"decompression bomb: {e}") from e
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        raise DataError(name, f"corrupt or truncated image ({e})") from e


def _to_l_or_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("L", "RGB"):
        return img.copy() if img.readonly else img
    if mode in _SIXTEEN_BIT_MODES:  # 16-bit gray: scale 0..65535 onto 0..255
        a = np.asarray(img).astype(np.int64).clip(0, 65535)
        return Image.fromarray(((a + 128) // 257).astype(np.uint8), "L")
    if mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float64)).clip(0, 255)
        return Image.fromarray(np.rint(a).astype(np.uint8), "L")
    if mode in _GRAY_MODES:  # "1", "LA", "La": alpha is dropped
        return img.convert("L")
    if mode in ("P", "PA"):  # palette (maybe with transparency): via RGBA, alpha dropped
        return img.convert("RGBA").convert("RGB")
    return img.convert("RGB")  # RGBA, CMYK, YCbCr, LAB, HSV, RGBX, ...


def decode_image(data: bytes, name: str, limits: Limits = Limits()) -> np.ndarray:
    """One encoded image -> uint8 (H, W, C), C = 1 for gray modes and 3 otherwise.

    Raises DataError (naming `name`) for corrupt data, non-images and decompression bombs.
    """
    return _hwc(decode_pil(data, name, limits))


def _hwc(img: Image.Image) -> np.ndarray:
    a = np.asarray(img)
    return a[:, :, None] if a.ndim == 2 else a


def choose_size(sizes: Sequence[tuple[int, int]], limits: Limits, image_size: int | None = None) -> tuple[int, int]:
    """The size rule: (H, W) for the whole set from the images' (h, w).

    Same-size sets keep their size (if no side exceeds `limits.max_side`); otherwise a square side
    S = median of the shorter sides, capped at `limits.max_side` and at least 8. `image_size` forces S.
    """
    if image_size is not None:
        if image_size < 1:
            raise ValueError("image_size must be positive")
        return image_size, image_size
    distinct = set(sizes)
    if len(distinct) == 1:
        h, w = next(iter(distinct))
        if max(h, w) <= limits.max_side:
            return h, w
    side = int(np.median([min(h, w) for h, w in sizes]))
    side = min(limits.max_side, max(MIN_SIDE, side))
    return side, side


def conform_pil(img: Image.Image, size: tuple[int, int], channels: int) -> np.ndarray:
    """An "L"/"RGB" image -> uint8 (H, W, channels) by the size and channel rules.

    Scale so the image covers (H, W) (the shorter side for a square target) with PIL's
    antialiased bicubic filter, centre-crop, then replicate gray to RGB or take RGB's luma.
    """
    height, width = size
    if (img.height, img.width) != (height, width):
        scale = max(height / img.height, width / img.width)
        new_h = max(height, round(img.height * scale))
        new_w = max(width, round(img.width * scale))
        if (new_h, new_w) != (img.height, img.width):
            img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        top, left = (new_h - height) // 2, (new_w - width) // 2
        img = img.crop((left, top, left + width, top + height))
    if channels == 3 and img.mode != "RGB":
        img = img.convert("RGB")
    elif channels == 1 and img.mode != "L":
        img = img.convert("L")
    return _hwc(img)


def array_to_pil(image: np.ndarray, name: str = "image") -> Image.Image:
    """An HW or HWC array (C in 1..4, any numeric dtype) -> "L"/"RGB" image."""
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4) or a.shape[0] < 1 or a.shape[1] < 1:
        raise DataError(name, f"expected an (H, W) or (H, W, C) image with C in 1..4, got {a.shape}")
    a = to_uint8(a, name)
    if a.shape[2] <= 2:  # gray (+ alpha, dropped)
        return Image.fromarray(np.ascontiguousarray(a[:, :, 0]), "L")
    return Image.fromarray(np.ascontiguousarray(a[:, :, :3]), "RGB")


def decode_conformed(
    data: bytes, name: str, size: tuple[int, int], channels: int, limits: Limits = Limits()
) -> np.ndarray:
    """One encoded image straight to uint8 (channels, H, W) by the ingest rule, decoding a large
    JPEG at a reduced scale first (see `decode_pil`). Raises DataError naming `name`."""
    return conform_pil(decode_pil(data, name, limits, at_least=size), size, channels).transpose(2, 0, 1)


def conform_images(images: Sequence[np.ndarray], size: tuple[int, int], channels: int) -> np.ndarray:
    """HWC (or HW) arrays of any size/channels -> uint8 (N, channels, H, W), the ingest rule.

    /predict uses this so that new images match the training data.
    """
    if channels not in (1, 3):
        raise ValueError("channels must be 1 or 3")
    height, width = size
    out = np.empty((len(images), channels, height, width), np.uint8)

    def one(i: int) -> None:
        out[i] = conform_pil(array_to_pil(images[i], f"image {i}"), size, channels).transpose(2, 0, 1)

    parallel_map(one, range(len(images)))
    return out


def resize_to(images: np.ndarray, size: int | None) -> np.ndarray:
    """uint8 (N, C, H, W) -> (N, C, size, size) by the one resize rule of the project: the ingest
    rule (`conform_images`, PIL antialiased bicubic, cover and centre-crop). Training,
    evaluation, /predict and exported models all resize through it, so an image gets the same
    pixels wherever it is classified. Always a private, writable copy (caches are read-only mmaps)."""
    images = np.asarray(images)
    if size is None or images.shape[-2:] == (size, size):
        return np.array(images)
    return conform_images(images.transpose(0, 2, 3, 1), (size, size), images.shape[1])


def to_uint8(a: np.ndarray, name: str) -> np.ndarray:
    """Numeric pixels -> uint8: uint8 as is, bool as 0/255, 16-bit integers scaled by 1/257,
    other integers kept if in 0..255, floats in [0, 1] scaled by 255 (else clipped to 0..255)."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.integer):
        if a.size == 0:
            return a.astype(np.uint8)
        lo, hi = int(a.min()), int(a.max())
        if lo < 0:
            raise DataError(name, f"negative pixel values ({a.dtype})")
        if a.dtype == np.uint16 or (hi > 255 and hi <= 65535):
            return ((a.astype(np.int64) + 128) // 257).astype(np.uint8)
        if hi > 255:
            raise DataError(name, f"pixel values up to {hi} do not fit 8 or 16 bits")
        return a.astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        f = np.nan_to_num(a.astype(np.float64))
        if f.size and f.min() >= 0 and f.max() <= 1:
            f = f * 255
        return np.rint(f.clip(0, 255)).astype(np.uint8)
    raise DataError(name, f"unsupported pixel type {a.dtype}")
