"""`ImageSet`: every source ends up as one uint8 (N, C, H, W) array, saved as .npy and memory-mapped."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bad_input import DataError

# Bump when the on-disk layout changes; older directories are then rejected (and caches rebuilt).
FORMAT_VERSION = 1


@dataclass
class ImageSet:
    images: np.ndarray  # uint8, (N, C, H, W), C in {1, 3}, C-contiguous
    labels: np.ndarray | None  # int64 (N,), values in [0, len(class_names))
    class_names: list[str] | None
    source: str

    def __post_init__(self) -> None:
        im = self.images
        if im.dtype != np.uint8 or im.ndim != 4 or im.shape[1] not in (1, 3):
            raise ValueError(f"images must be uint8 (N, C, H, W) with C in {{1, 3}}, got {im.dtype} {im.shape}")
        if not im.flags.c_contiguous:
            self.images = np.ascontiguousarray(im)
        if self.labels is not None:
            labels = np.asarray(self.labels)
            if labels.shape != (im.shape[0],):
                raise ValueError(f"labels shape {labels.shape} does not match {im.shape[0]} images")
            if labels.dtype != np.int64:
                labels = labels.astype(np.int64)
            if self.class_names is None:
                self.class_names = [str(i) for i in range(int(labels.max(initial=-1)) + 1)]
            if labels.size and (labels.min() < 0 or labels.max() >= len(self.class_names)):
                raise ValueError(f"labels must lie in [0, {len(self.class_names)})")
            self.labels = labels
        if self.class_names is not None:
            self.class_names = [str(c) for c in self.class_names]

    @property
    def n(self) -> int:
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def height(self) -> int:
        return int(self.images.shape[2])

    @property
    def width(self) -> int:
        return int(self.images.shape[3])

    def save(self, directory: Path) -> None:
        """Write images.npy, labels.npy (if any) and meta.json; atomic: readers never see half a set.

        Everything goes into a temporary sibling directory that is renamed into place at the end.
        """
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
        try:
            np.save(tmp / "images.npy", self.images, allow_pickle=False)
            if self.labels is not None:
                np.save(tmp / "labels.npy", self.labels, allow_pickle=False)
            meta = {
                "format": FORMAT_VERSION,
                "source": self.source,
                "class_names": self.class_names,
                "shape": list(self.images.shape),
                "has_labels": self.labels is not None,
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            _replace_dir(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, directory: Path, mmap: bool = True) -> ImageSet:
        directory = Path(directory)
        try:
            meta = json.loads((directory / "meta.json").read_text())
            if meta.get("format") != FORMAT_VERSION:
                raise DataError(directory, f"image set format {meta.get('format')} is not {FORMAT_VERSION}")
            mode = "r" if mmap else None
            images = np.load(directory / "images.npy", mmap_mode=mode, allow_pickle=False)
            labels = (
                np.load(directory / "labels.npy", mmap_mode=mode, allow_pickle=False) if meta["has_labels"] else None
            )
        except (OSError, ValueError, KeyError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(directory, f"not a readable image set ({e})") from e
        if list(images.shape) != meta["shape"]:
            raise DataError(directory, "images.npy does not match meta.json")
        return cls(images=images, labels=labels, class_names=meta["class_names"], source=meta["source"])


def _replace_dir(tmp: Path, target: Path) -> None:
    """Rename `tmp` to `target`; an existing target is moved aside first and then deleted."""
    try:
        os.rename(tmp, target)
        return
    except OSError:
        if not target.exists():
            raise
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.rename(target, old / "set")
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
