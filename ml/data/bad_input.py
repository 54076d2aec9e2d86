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


def check_decoded_size(shape: tuple[int, ...], limits: Limits, where: object) -> None:
    """Refuse a set whose decoded uint8 array would exceed the limit, before it is allocated (the
    shape comes from headers: a 2 MB compressed npz once declared, and got, 2 GiB)."""
    size = 1
    for dim in shape:
        size *= int(dim)  # Python ints: no overflow on hostile dims
    if size > limits.max_decoded_bytes:
        raise DataError(
            where,
            f"decodes to {size:,} bytes ({' x '.join(str(int(d)) for d in shape)}); "
            f"at most {limits.max_decoded_bytes:,} are accepted (SCAN_MAX_DATASET_BYTES)",
        )


@dataclass(frozen=True)
class Limits:
    """Defensive bounds for archives and images; checked before anything large is read."""

    max_files: int = 500_000
    max_total_bytes: int = 8 << 30  # uncompressed, whole archive (or whole folder)
    max_decoded_bytes: int = 8 << 30  # the decoded uint8 set, N x C x H x W (SCAN_MAX_DATASET_BYTES)
    max_member_bytes: int = 160 << 20  # one archive member, inflated: a 40 Mpx image as 32-bit BMP
    max_image_pixels: int = 40_000_000
    max_side: int = 256  # the size rule never picks a side above this
