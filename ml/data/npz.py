"""`.npz` files: ``images`` as NHWC, NCHW or NHW, optional ``labels`` and ``class_names``.

A 4-d array whose last axis is 1, 3 or 4 is read as NHWC, else one whose axis 1 is 1, 3 or 4 as NCHW
(NHWC wins when both fit); a 4th channel is alpha and dropped. Pixel types follow `imaging.to_uint8`.
Pickled (object) arrays are refused.

uint8 images (the common case) are streamed out of the zip member in batches of rows straight into
the (N, C, H, W) array: one decoded copy, plus a fixed margin, whatever the layout. Other pixel
types are loaded whole and converted, since `to_uint8` scales by the whole array's range.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from .archive import check_zip_infos
from .arrays import image_set_from_array
from .bad_input import DataError, Limits, check_decoded_size
from .cancel import check_cancelled
from .imageset import ImageSet
from .imaging import to_uint8


def read_npz(path: Path, limits: Limits, image_size: int | None) -> ImageSet:
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:  # an npz is a zip: same bomb checks before loading
            check_zip_infos(path, zf.infolist(), limits)
            _check_declared_shapes(path, zf, limits)
            streamed = _stream_uint8(path, zf) if "images.npy" in zf.namelist() else None
        with np.load(path, allow_pickle=False) as npz:
            if "images" not in npz.files:
                raise DataError(path, f"no 'images' array in npz (found: {', '.join(npz.files)})")
            images = streamed if streamed is not None else npz["images"]
            labels = npz["labels"] if "labels" in npz.files else None
            names = npz["class_names"] if "class_names" in npz.files else None
    except DataError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as e:
        raise DataError(path, f"not a readable npz file ({e})") from e
    class_names = None
    if names is not None:
        if names.ndim != 1 or names.dtype.kind not in "US":
            raise DataError(path, "class_names must be a 1-d string array")
        class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist()]
    nchw = images if streamed is not None else to_nchw(images, str(path))
    return image_set_from_array(nchw, labels, class_names, str(path), limits, image_size)


BATCH_BYTES = 4 << 20  # rows read per batch: the fixed margin over the decoded array


def _stream_uint8(path: Path, zf: zipfile.ZipFile) -> np.ndarray | None:
    """uint8 images.npy read batch by batch into a preallocated uint8 NCHW array (the layout rules
    of `to_nchw`); None for other pixel types or Fortran order (loaded whole instead)."""
    with zf.open("images.npy") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if dtype != np.uint8 or fortran:
            return None
        shape = tuple(int(d) for d in shape)
        if len(shape) == 3:
            stored, take = "NHW", 1
        elif len(shape) == 4 and shape[3] in (1, 3, 4):
            stored, take = "NHWC", min(shape[3], 3)
        elif len(shape) == 4 and shape[1] in (1, 3, 4):
            stored, take = "NCHW", min(shape[1], 3)
        else:
            raise DataError(path, f"images must be NHW, NHWC or NCHW, got shape {shape}")
        if min(shape) < 1:
            raise DataError(path, f"empty images array {shape}")
        n = shape[0]
        hw = shape[1:3] if stored != "NCHW" else shape[2:4]
        out = np.empty((n, take, *hw), np.uint8)
        row_bytes = int(np.prod(shape[1:]))
        rows = max(1, BATCH_BYTES // row_bytes)
        for i in range(0, n, rows):
            check_cancelled(f"read {i} of {n} images")
            k = min(rows, n - i)
            raw = f.read(k * row_bytes)
            if len(raw) != k * row_bytes:
                raise DataError(path, f"images.npy is truncated ({n} images declared)")
            batch = np.frombuffer(raw, np.uint8).reshape((k, *shape[1:]))
            if stored == "NHW":
                out[i : i + k, 0] = batch
            elif stored == "NHWC":
                out[i : i + k] = batch[..., :take].transpose(0, 3, 1, 2)
            else:
                out[i : i + k] = batch[:, :take]
        return out


def _check_declared_shapes(path: Path, zf: zipfile.ZipFile, limits: Limits) -> None:
    """Read each array's .npy header (a few hundred bytes, streamed out of the zip member) and refuse
    the file before np.load allocates: a compressed member's size in the zip says nothing."""
    for member in ("images.npy", "labels.npy", "class_names.npy"):
        if member not in zf.namelist():
            continue
        with zf.open(member) as f:
            try:
                version = np.lib.format.read_magic(f)
                shape, _, dtype = (
                    np.lib.format.read_array_header_1_0(f)
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0(f)
                )
            except ValueError as e:
                raise DataError(path, f"{member}: not a valid .npy header ({e})") from e
        raw = int(np.prod(shape, dtype=object)) * max(dtype.itemsize, 1)
        if raw > limits.max_total_bytes:
            raise DataError(path, f"{member} declares {raw:,} bytes; at most {limits.max_total_bytes:,}")
        if member == "images.npy":
            check_decoded_size(tuple(shape), limits, path)


def to_nchw(images: np.ndarray, name: str) -> np.ndarray:
    """NHW / NHWC / NCHW of any pixel type -> uint8 NCHW with C in {1, 3}."""
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4:
        if images.shape[3] in (1, 3, 4):
            images = images.transpose(0, 3, 1, 2)
        elif images.shape[1] not in (1, 3, 4):
            raise DataError(name, f"images of shape {images.shape}: no channel axis of 1, 3 or 4")
        if images.shape[1] == 4:
            images = images[:, :3]
    else:
        raise DataError(name, f"images must be NHW, NHWC or NCHW, got shape {images.shape}")
    if min(images.shape) < 1:
        raise DataError(name, f"empty images array {images.shape}")
    return np.ascontiguousarray(to_uint8(images, name))
