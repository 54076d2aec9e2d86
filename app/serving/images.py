"""Images of a serving request, decoded and converted to the run's size and channels by the same
rule as ingest (`ml.data.decode_conformed`). Reading them from the request body is the HTTP
layer's job (app/request_bodies.py)."""

from __future__ import annotations

import numpy as np

from app.core.errors import Invalid
from app.core.settings import get_settings
from ml.data import DataError, Limits, decode_conformed


def to_model_input(named: list[tuple[str, bytes]], size: int, channels: int) -> np.ndarray:
    """Decode each image (naming the file in the error) straight into its row of the (N, channels,
    size, size) batch, one at a time: at most one decoded image exists besides the batch, and a JPEG
    far larger than `size` is decoded at a reduced scale. Blocking CPU work: call from a thread."""
    limits = Limits(max_image_pixels=int(get_settings().predict_max_image_pixels))
    out = np.empty((len(named), channels, size, size), np.uint8)
    for i, (name, data) in enumerate(named):
        if not data:
            raise Invalid(f"{name}: empty file")
        try:
            out[i] = decode_conformed(data, name, (size, size), channels, limits)
        except DataError as exc:
            raise Invalid(str(exc)) from exc
    return out


def tensor_input(data: bytes | np.ndarray, size: int, channels: int, what: str = "the body") -> np.ndarray:
    """Raw uint8 pixels already at the run's shape, (N, channels, size, size) in row-major order: no
    decoding at all (the fast path of small requests). N is read from the length."""
    row = channels * size * size
    n = len(data) if isinstance(data, bytes) else data.size
    if n == 0 or n % row:
        raise Invalid(
            f"{what} holds {n} bytes, not a whole number of images of {channels}x{size}x{size} uint8 "
            f"({row} bytes each, NCHW); this run takes that shape"
        )
    if isinstance(data, bytes):
        return np.frombuffer(data, np.uint8).reshape(n // row, channels, size, size)
    return np.ascontiguousarray(data, np.uint8).reshape(n // row, channels, size, size)
