"""The one error type for unreadable or hostile input, and the bounds that define "hostile"."""
from __future__ import annotations

from dataclasses import dataclass


class DataError(ValueError):
    """Input that cannot or must not be read. ``str(e) == f"{path}: {reason}"``.

    Every reader raises this (and only this) for bad input, so the API can turn it into one 4xx answer
    that names the offending file.
    """

    def __init__(self, path: object, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # Celery pickles exceptions across processes
        return (type(self), (self.path, self.reason))


# A labelled dataset with more classes than this is a mistake or an attack (a few bytes of npz with
# labels [0, 10_000_000] once meant ten million class names stored and sent back on every read).
MAX_CLASSES = 10_000


def check_class_count(count: int, where: object) -> None:
    if count > MAX_CLASSES:
        raise DataError(where, f"{count:,} classes; at most {MAX_CLASSES:,} are accepted")


@dataclass(frozen=True)
class Limits:
    """Defensive bounds for archives and images; checked before anything large is read."""

    max_files: int = 500_000
    max_total_bytes: int = 8 << 30  # uncompressed, whole archive (or whole folder)
    max_image_pixels: int = 40_000_000
    max_side: int = 256  # the size rule never picks a side above this
