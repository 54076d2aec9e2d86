"""How a tree of image files maps to images, labels and splits (folders and archives alike).

- Single top-level wrapper folders are looked through (``photos.zip`` holding ``photos/...``).
- If the top level holds only split folders (``train/``, ``test/``, ...), `split` picks one; the
  class names are then the union over all splits, so label indices agree between splits.
- If every image sits inside a subfolder, the first folder level names the class (ground truth, used
  only for evaluation); otherwise the set is unlabelled.
- Hidden files and OS junk (``__MACOSX/``, ``.DS_Store``, ``Thumbs.db``) are ignored, and so are
  files whose suffix is not an image suffix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from .bad_input import DataError, check_class_count
from .imaging import IMAGE_SUFFIXES

_JUNK_NAMES = frozenset({"__macosx", "thumbs.db", "desktop.ini", "$recycle.bin"})
SPLIT_DIRS = {
    "train": ("train", "training"),
    "test": ("test", "testing", "val", "valid", "validation"),
    "unlabeled": ("unlabeled", "unlabelled"),
}
_ALL_SPLIT_DIRS = frozenset(name for names in SPLIT_DIRS.values() for name in names)


def is_junk(relpath: str) -> bool:
    return any(
        part.startswith(".") or part.lower() in _JUNK_NAMES for part in relpath.split("/") if part not in ("", ".")
    )


def is_image_name(relpath: str) -> bool:
    return PurePosixPath(relpath).suffix.lower() in IMAGE_SUFFIXES


@dataclass
class Layout:
    paths: list[str]  # selected relative paths, sorted (class, then file)
    labels: list[int] | None
    class_names: list[str] | None


def arrange(relpaths: Sequence[str], split: str, where: str) -> Layout:
    """Select and label the image files of a tree; `relpaths` are posix paths below its root."""
    files = sorted(p.strip("/") for p in relpaths if not is_junk(p) and is_image_name(p))
    if not files:
        raise DataError(where, "no images found (expected .png, .jpg, .jpeg, .webp or .bmp files)")
    parts = [[s for s in p.split("/") if s] for p in files]
    parts = _strip_wrappers(parts)
    tops = {p[0] for p in parts if len(p) > 1}
    at_root = any(len(p) == 1 for p in parts)
    if not at_root and len(tops) > 1 and {t.lower() for t in tops} <= _ALL_SPLIT_DIRS:
        chosen = _split_dir(tops, split, where)
        # Classes are the union over all splits, so train and test share their label indices.
        all_classes = {p[1] for p in parts if len(p) > 2}
        keep = [i for i, p in enumerate(parts) if p[0] == chosen]
        files = [files[i] for i in keep]
        parts = [parts[i][1:] for i in keep]
        if any(len(p) == 1 for p in parts):
            return Layout(files, None, None)
        return _labelled(files, parts, sorted(all_classes))
    if at_root:
        return Layout(files, None, None)
    return _labelled(files, parts, sorted({p[0] for p in parts}))


def _labelled(files: list[str], parts: list[list[str]], class_names: list[str]) -> Layout:
    check_class_count(len(class_names), "the archive's class folders")
    index = {c: i for i, c in enumerate(class_names)}
    order = sorted(range(len(files)), key=lambda i: parts[i])
    return Layout([files[i] for i in order], [index[parts[i][0]] for i in order], class_names)


def _strip_wrappers(parts: list[list[str]]) -> list[list[str]]:
    while parts and all(len(p) > 1 for p in parts) and len({p[0] for p in parts}) == 1:
        parts = [p[1:] for p in parts]
    return parts


def _split_dir(tops: set[str], split: str, where: str) -> str:
    by_lower = {t.lower(): t for t in tops}
    for name in SPLIT_DIRS.get(split, (split,)):
        if name in by_lower:
            return by_lower[name]
    raise DataError(where, f"no folder for split '{split}' (found {', '.join(sorted(tops))})")
