"""IDX files (the MNIST format), gzipped or not, and directories of them (MNIST naming).

A directory holds ``train-images-idx3-ubyte[.gz]`` / ``train-labels-idx1-ubyte[.gz]`` for split
"train" and ``t10k-*`` (or ``test-*``) for split "test"; ``-`` or ``.`` may separate the parts.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from .arrays import image_set_from_array
from .bad_input import DataError, Limits, check_decoded_size
from .imageset import ImageSet
from .npz import to_nchw

_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_SPLIT_PREFIXES = {"train": ("train",), "test": ("t10k", "test")}
_GZIP_MAGIC = b"\x1f\x8b"


def declared_dims(path: Path) -> tuple[int, ...] | None:
    """The dimensions an IDX file's header declares (read from the stream, gunzipped if need be),
    or None if the header is not IDX. Costs a few bytes, whatever the file would inflate to."""
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == _GZIP_MAGIC
        with gzip.open(path, "rb") if gz else open(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in _DTYPES or not 1 <= head[3] <= 4:
                return None
            raw = f.read(4 * head[3])
    except (OSError, EOFError, zlib.error):
        return None
    if len(raw) < 4 * head[3]:
        return None
    return tuple(int.from_bytes(raw[4 * i : 4 * i + 4], "big") for i in range(head[3]))


def read_raw(path: Path, limits: Limits) -> bytes:
    """The file's bytes, gunzipped if it is gzip (by magic, not by name), within the byte limit."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == _GZIP_MAGIC
        if not gz:
            if path.stat().st_size > limits.max_total_bytes:
                raise DataError(path, f"more than {limits.max_total_bytes} bytes")
            return path.read_bytes()
        with gzip.open(path, "rb") as f:
            data = f.read(limits.max_total_bytes + 1)
    except DataError:
        raise
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(path, f"corrupt or truncated gzip data ({e})") from e
    if len(data) > limits.max_total_bytes:
        raise DataError(path, f"decompresses to more than {limits.max_total_bytes} bytes (gzip bomb?)")
    return data


def parse_idx(data: bytes, name: str) -> np.ndarray:
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES or not 1 <= data[3] <= 4:
        raise DataError(name, f"bad IDX magic number {data[:4].hex() or '(empty file)'}")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(name, "truncated IDX file (header cut short)")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_DTYPES[data[2]])
    expected = header + math.prod(dims) * dtype.itemsize  # Python ints: no overflow on hostile dims
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "trailing bytes in"
        raise DataError(name, f"{what} IDX file: dimensions {dims} need {expected} bytes, file has {len(data)}")
    return np.frombuffer(data, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def looks_like_idx(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        if head == _GZIP_MAGIC:
            with gzip.open(path, "rb") as f:
                head = f.read(4)
        else:
            with open(path, "rb") as f:
                head = f.read(4)
    except (OSError, EOFError, zlib.error):
        return False
    return len(head) == 4 and head[:2] == b"\0\0" and head[2] in _DTYPES and 1 <= head[3] <= 4


def is_idx_dir(path: Path) -> bool:
    return any("idx3" in p.name.lower() for p in Path(path).iterdir() if p.is_file())


def read_idx(
    path: Path,
    split: str,
    limits: Limits,
    image_size: int | None,
    class_names: list[str] | None = None,
    source: str | None = None,
) -> ImageSet:
    """An IDX images file (labels from its ``*-labels-idx1-*`` sibling, if any) or a directory."""
    path = Path(path)
    if path.is_dir():
        images_path, labels_path = find_idx_pair(path, split)
    else:
        images_path, labels_path = path, _sibling_labels(path)
    dims = declared_dims(images_path)
    if dims is not None:  # checked from the header, before anything is inflated
        check_decoded_size(dims, limits, images_path)
    images = parse_idx(read_raw(images_path, limits), str(images_path))
    if images.ndim not in (3, 4):
        raise DataError(images_path, f"IDX images must have 3 or 4 dimensions, got {images.ndim}")
    labels = None
    if labels_path is not None:
        labels = parse_idx(read_raw(labels_path, limits), str(labels_path))
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(labels_path, f"labels shape {labels.shape} does not match {images.shape[0]} images")
    return image_set_from_array(
        to_nchw(images, str(images_path)), labels, class_names, source or str(path), limits, image_size
    )


def find_idx_pair(directory: Path, split: str) -> tuple[Path, Path | None]:
    prefixes = _SPLIT_PREFIXES.get(split)
    if prefixes is None:
        raise DataError(directory, f"IDX data has splits 'train' and 'test', not '{split}'")
    files = sorted(p for p in directory.iterdir() if p.is_file())

    def find(kind: str, idx: str) -> Path | None:
        for prefix in prefixes:
            for p in files:
                n = p.name.lower()
                if n.startswith((prefix + "-", prefix + ".", prefix + "_")) and kind in n and idx in n:
                    return p
        return None

    images = find("images", "idx3")
    if images is None:
        raise DataError(directory, f"no {prefixes[0]}-images-idx3-ubyte[.gz] file for split '{split}'")
    return images, find("labels", "idx1")


def _sibling_labels(images_path: Path) -> Path | None:
    name = images_path.name
    if "images" not in name:
        return None
    base = name.replace("images", "labels").replace("idx3", "idx1")
    stem = base[:-3] if base.endswith(".gz") else base
    for candidate in (stem, stem + ".gz"):
        p = images_path.with_name(candidate)
        if p.is_file():
            return p
    return None
