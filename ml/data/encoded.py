"""Encoded image files (from a folder or an archive) -> one `ImageSet`, decoded straight into it.

The size and channel rules need every image's size and mode before any image is conformed, so there
are two passes over the members: a header pass (PIL reads only the header) decides the rules and the
(N, C, H, W) uint8 array is allocated once; the decode pass decodes each image and writes it,
already conformed, into its row. Members are read in batches (at most `BATCH_BYTES` of encoded
bytes, `BATCH_ITEMS` members), so the memory of an ingest is the decoded array plus a fixed margin:
no list of decoded images, no list of every member's bytes. When all the encoded bytes fit in
`KEEP_BYTES` they are kept from the header pass instead of being read twice. Between batches the
reader checks for a cancel (`ml.data.cancel`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bad_input import DataError, Limits, check_decoded_size
from .cancel import check_cancelled
from .imageset import ImageSet
from .imaging import choose_size, conform_pil, decode_pil, is_gray, open_image, orientation, parallel_map

Encoded = tuple[str, "bytes | Path"]  # (name used in errors, the encoded bytes or a file path)
Data = "bytes | Path"

BATCH_BYTES = 16 << 20
BATCH_ITEMS = 32  # also how often a cancel is checked
KEEP_BYTES = 16 << 20
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@dataclass
class Members:
    """The images of a source, in output order (``names`` name them in errors); ``read()`` yields
    ``(index, bytes or path)`` for every one once, in whatever order the source reads fastest (a
    compressed tar only forwards), and may be called again for a second pass."""

    names: list[str]
    read: Callable[[], Iterator[tuple[int, Data]]]

    @classmethod
    def of(cls, items: Sequence[Encoded]) -> Members:
        return cls([name for name, _ in items], lambda: ((i, data) for i, (_, data) in enumerate(items)))


def images_from_encoded(
    members: Members | Sequence[Encoded],
    labels: Sequence[int] | None,
    class_names: list[str] | None,
    source: str,
    limits: Limits,
    image_size: int | None,
) -> ImageSet:
    if not isinstance(members, Members):
        members = Members.of(members)
    names, n = members.names, len(members.names)
    if n == 0:
        raise DataError(source, "no images found")
    labels_array = None if labels is None else np.asarray(labels, np.int64)

    headers: list[tuple[int, int, bool] | None] = [None] * n
    kept: list[tuple[int, Data]] | None = []
    kept_bytes = done = 0
    for batch in _batches(members.read()):
        check_cancelled(f"read the headers of {done} of {n} images")
        for (i, _), header in zip(batch, parallel_map(lambda it: _header(names[it[0]], it[1], limits), batch)):
            headers[i] = header
        done += len(batch)
        if kept is not None:
            kept_bytes += sum(len(data) for _, data in batch if not isinstance(data, Path))
            if kept_bytes <= KEEP_BYTES:
                kept.extend(batch)
            else:
                kept = None
    if any(h is None for h in headers):
        raise DataError(source, "some images could not be read")
    size = choose_size([(h, w) for h, w, _ in headers], limits, image_size)
    channels = 1 if all(gray for _, _, gray in headers) else 3
    check_decoded_size((n, channels, *size), limits, source)
    out = np.empty((n, channels, *size), np.uint8)

    def conform_into(item: tuple[int, Data]) -> None:
        i, data = item
        out[i] = conform_pil(decode_pil(data, names[i], limits), size, channels).transpose(2, 0, 1)

    done = 0
    for batch in _batches(kept if kept is not None else members.read()):
        check_cancelled(f"decoded {done} of {n} images")
        parallel_map(conform_into, batch)
        done += len(batch)
    return ImageSet(out, labels_array, class_names, source)


def _batches(items: Iterable[tuple[int, Data]]) -> Iterator[list[tuple[int, Data]]]:
    batch: list[tuple[int, Data]] = []
    size = 0
    for item in items:
        batch.append(item)
        size += 0 if isinstance(item[1], Path) else len(item[1])
        if size >= BATCH_BYTES or len(batch) >= BATCH_ITEMS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _header(name: str, data: Data, limits: Limits) -> tuple[int, int, bool]:
    with open_image(data, name, limits) as img:
        h, w = img.height, img.width
        if orientation(img) in _ROTATED:
            h, w = w, h
        return h, w, is_gray(img)
