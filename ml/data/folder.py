"""A folder of images; one subfolder per class gives labels (see `layout`)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .bad_input import DataError, Limits
from .encoded import images_from_encoded
from .imageset import ImageSet
from .layout import arrange, is_image_name, is_junk


def read_folder(root: Path, split: str, limits: Limits, image_size: int | None) -> ImageSet:
    root = Path(root)
    relpaths = list_folder(root, limits)
    layout = arrange(relpaths, split, str(root))
    items = [(str(root / p), root / p) for p in layout.paths]
    return images_from_encoded(items, layout.labels, layout.class_names, str(root), limits, image_size)


def list_folder(root: Path, limits: Limits) -> list[str]:
    """Image files below `root` as posix relative paths; symlinks and special files are refused."""
    found: list[str] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        rel_base = base.relative_to(root).as_posix()
        for d in list(dirnames):
            if (base / d).is_symlink():
                raise DataError(base / d, "symbolic links are not followed")
            if is_junk(d):
                dirnames.remove(d)  # don't descend into .git/, __MACOSX/, ...
        dirnames.sort()
        for f in filenames:
            path = base / f
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                raise DataError(path, "symbolic links are not followed")
            rel = f if rel_base == "." else f"{rel_base}/{f}"
            if is_junk(rel) or not is_image_name(rel):
                continue
            if not stat.S_ISREG(st.st_mode):
                raise DataError(path, "not a regular file")
            found.append(rel)
            total += st.st_size
            if len(found) > limits.max_files:
                raise DataError(root, f"more than {limits.max_files} image files")
            if total > limits.max_total_bytes:
                raise DataError(root, f"more than {limits.max_total_bytes} bytes of images")
    if not found:
        raise DataError(root, "no images found (expected .png, .jpg, .jpeg, .webp or .bmp files)")
    return found
