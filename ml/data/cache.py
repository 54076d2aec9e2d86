"""On-disk cache of decoded sets, so nothing is decoded twice.

The key covers the source's resolved path, the split, the image size asked for, the limits, the
image-set format, and a fingerprint of the files (size and mtime of the file, or of every file below
a directory), so an edited source is decoded again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from .imageset import FORMAT_VERSION

# Bump when a reader or the size/channel rule changes, so old caches are not reused.
READER_VERSION = 1


def fingerprint(path: Path | None) -> list:
    if path is None:
        return []
    st = path.stat()
    if not path.is_dir():
        return [st.st_size, st.st_mtime_ns]
    entries = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for f in sorted(filenames):
            p = Path(dirpath, f)
            s = p.lstat()
            entries.append((p.relative_to(path).as_posix(), s.st_size, s.st_mtime_ns))
    return [hashlib.sha256(json.dumps(entries).encode()).hexdigest()]


def cache_entry(
    cache_dir: Path, label: str, files: Path | None, split: str, image_size: int | None, limits: object
) -> Path:
    key = json.dumps(
        {
            "source": label,
            "split": split,
            "image_size": image_size,
            "limits": repr(limits),
            "files": fingerprint(files),
            "format": FORMAT_VERSION,
            "reader": READER_VERSION,
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(label).name or "source")[:40]
    return Path(cache_dir) / f"{slug}-{split}-{digest}"
