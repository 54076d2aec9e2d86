"""`load_source`: pick the reader for a source, with the on-disk cache in front of it."""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

from .archive import is_archive, read_archive, sniff_archive
from .bad_input import DataError, Limits
from .builtin import builtin_files, builtin_name, load_builtin
from .cache import cache_entry
from .cifar import is_cifar_dir, read_cifar
from .folder import read_folder
from .idx import is_idx_dir, looks_like_idx, read_idx
from .imageset import ImageSet
from .layout import is_junk
from .npz import read_npz
from .stl import is_stl_dir, read_stl


def load_source(
    source: str | Path,
    *,
    split: str = "train",
    cache_dir: Path | None = None,
    limits: Limits = Limits(),
    image_size: int | None = None,
) -> ImageSet:
    """Read any supported source into an `ImageSet` (see the package docstring for the list).

    With `cache_dir`, the decoded set is saved there and later calls load it memory-mapped.
    """
    base, variant = _parse_split(split)
    name = builtin_name(str(source)) if isinstance(source, str) and "/" not in source else None
    if name is not None:
        label, files = name, builtin_files(name)
        read = partial(load_builtin, name, base, limits, image_size)
        if variant:
            raise DataError(name, f"split suffix '-{variant}' applies only to CIFAR-100")
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(path, "no such file or directory (and not a builtin: digits, fashion-mnist)")
        path = path.resolve()
        label, files = str(path), path
        read = partial(_read_path, path, base, variant, limits, image_size)
    if cache_dir is None:
        return read()
    entry = cache_entry(Path(cache_dir), label, files, split, image_size, limits)
    if (entry / "meta.json").is_file():
        try:
            return ImageSet.load(entry, mmap=True)
        except DataError:
            pass  # unreadable cache (e.g. an older format): decode again and overwrite it
    image_set = read()
    image_set.save(entry)
    return ImageSet.load(entry, mmap=True)


def _parse_split(split: str) -> tuple[str, str]:
    """Split and label-set suffix: "train", "test", "unlabeled", "train-fine", "test:fine"."""
    m = re.fullmatch(r"\s*([A-Za-z]+)(?:[-:]([A-Za-z]+))?\s*", split)
    if not m:
        raise DataError(split, "split must look like 'train', 'test' or 'train-fine'")
    return m.group(1).lower(), (m.group(2) or "").lower()


def _read_path(path: Path, split: str, variant: str, limits: Limits, image_size: int | None) -> ImageSet:
    if path.is_dir():
        directory = _look_through(path)
        if is_cifar_dir(directory):
            return read_cifar(directory, split, variant, limits, image_size)
        if variant:
            raise DataError(path, f"split suffix '-{variant}' applies only to CIFAR-100")
        if is_stl_dir(directory):
            return read_stl(directory, split, limits, image_size)
        if is_idx_dir(directory):
            return read_idx(directory, split, limits, image_size)
        return read_folder(path, split, limits, image_size)
    if variant:
        raise DataError(path, f"split suffix '-{variant}' applies only to CIFAR-100")
    if path.name.lower().endswith(".npz"):
        return read_npz(path, limits, image_size)
    if is_archive(path):
        return read_archive(path, split, limits, image_size, kind=None)
    if looks_like_idx(path):
        return read_idx(path, split, limits, image_size)
    # No telling suffix (an upload saved under a temporary name): go by the content.
    kind = sniff_archive(path)
    if kind == "npz":
        return read_npz(path, limits, image_size)
    if kind is not None:
        return read_archive(path, split, limits, image_size, kind=kind)
    raise DataError(
        path, "unknown source type (expected an image folder, .zip, .tar[.gz], .npz, IDX, CIFAR or STL-10 data)"
    )


def _look_through(directory: Path) -> Path:
    """Descend through single wrapper folders (``cifar-10-batches-py/`` inside the given folder)."""
    while True:
        entries = [p for p in directory.iterdir() if not is_junk(p.name)]
        if len(entries) != 1 or not entries[0].is_dir() or entries[0].is_symlink():
            return directory
        directory = entries[0]
