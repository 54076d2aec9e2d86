"""Zip and tar archives of image folders, read member by member into memory (never extracted).

Every entry is checked before any member is read: paths must stay inside the archive, links and
device entries are refused, and the declared sizes and entry count must fit `Limits`. Members are
then read one at a time, on demand (`encoded.Members`): the archive is never held in memory whole,
and each member's real inflated bytes are counted against the limits as it is read.
"""

from __future__ import annotations

import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from .bad_input import DataError, Limits
from .cancel import check_cancelled
from .encoded import Members, images_from_encoded
from .imageset import ImageSet
from .layout import arrange, is_image_name, is_junk

ZIP_SUFFIXES = (".zip",)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")

_DRIVE = re.compile(r"^[A-Za-z]:")


def is_archive(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(ZIP_SUFFIXES) or name.endswith(TAR_SUFFIXES)


def sniff_archive(path: Path) -> str | None:
    """The archive kind from the content alone: zip, npz (a zip of .npy files only), tar or None."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
            return "npz" if names and all(n.endswith(".npy") for n in names) else "zip"
        return "tar" if tarfile.is_tarfile(path) else None
    except (OSError, zipfile.BadZipFile, tarfile.TarError, EOFError, ValueError):
        return None


def read_archive(path: Path, split: str, limits: Limits, image_size: int | None, kind: str | None = None) -> ImageSet:
    """A zip or tar archive; `kind` ("zip" or "tar") overrides the guess from the suffix."""
    path = Path(path)
    if kind is None:
        kind = "zip" if path.name.lower().endswith(ZIP_SUFFIXES) else "tar"
    read = _read_zip if kind == "zip" else _read_tar
    return read(path, split, limits, image_size)


def member_name(archive: Path, name: str) -> str:
    """How errors name a member: ``/data/set.zip!/cats/1.png``."""
    return f"{archive}!/{name}"


def check_member_path(archive: Path, name: str) -> str:
    """The member's path as clean posix (no ``./``), or DataError if it would leave the root."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or _DRIVE.match(posix):
        raise DataError(member_name(archive, name), "absolute path in archive")
    if ".." in posix.split("/"):
        raise DataError(member_name(archive, name), "path leads outside the archive (..)")
    if "\x00" in posix:
        raise DataError(member_name(archive, name), "NUL byte in member name")
    return "/".join(part for part in posix.split("/") if part not in ("", "."))


def _read_zip(path: Path, split: str, limits: Limits, image_size: int | None) -> ImageSet:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise DataError(path, f"not a readable zip archive ({e})") from e
    with zf:
        infos = zf.infolist()
        check_zip_infos(path, infos, limits)
        files = {}
        for info in infos:
            if info.is_dir():
                continue
            posix = check_member_path(path, info.filename)
            if not is_junk(posix) and is_image_name(posix):
                files[posix] = info
        layout = arrange(list(files), split, str(path))

        def read() -> Iterator[tuple[int, bytes]]:
            budget = _Budget()  # each pass counts the real inflated bytes afresh
            for i, p in enumerate(layout.paths):
                info = files[p]
                try:
                    with zf.open(info) as f:
                        data = read_capped(f, member_name(path, info.filename), limits, budget)
                except DataError:
                    raise
                except (
                    zipfile.BadZipFile,
                    zlib.error,
                    OSError,
                    EOFError,
                    NotImplementedError,
                    RuntimeError,
                    ValueError,
                ) as e:
                    raise DataError(member_name(path, info.filename), f"corrupt archive member ({e})") from e
                budget.used += len(data)
                yield i, data

        members = Members([member_name(path, p) for p in layout.paths], read)
        return images_from_encoded(members, layout.labels, layout.class_names, str(path), limits, image_size)


class _Budget:
    """Inflated bytes read so far from one archive (real bytes, not the headers' claims)."""

    used = 0


def read_capped(f, where: str, limits: Limits, budget: _Budget) -> bytes:
    """Read a member in 1 MiB chunks and stop at the first byte past the member limit or the
    archive's total: a member whose header says 1 KiB never inflates to 1 GiB in memory."""
    cap = min(limits.max_member_bytes, limits.max_total_bytes - budget.used)
    chunks, size = [], 0
    while True:
        chunk = f.read(min(1 << 20, cap + 1 - size))
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > cap:
            limit = "per member" if cap == limits.max_member_bytes else "for the whole archive"
            raise DataError(where, f"inflates past {cap:,} bytes, the limit {limit} (archive bomb?)")
        chunks.append(chunk)


def check_zip_infos(path: Path, infos: list[zipfile.ZipInfo], limits: Limits) -> None:
    """Entry count, declared uncompressed size, links and encryption; before anything is read."""
    if len(infos) > limits.max_files:
        raise DataError(path, f"{len(infos)} entries is more than the limit of {limits.max_files}")
    total = sum(i.file_size for i in infos)
    if total > limits.max_total_bytes:
        raise DataError(
            path, f"uncompressed size {total} bytes is more than the limit of {limits.max_total_bytes} (zip bomb?)"
        )
    for info in infos:
        kind = stat.S_IFMT(info.external_attr >> 16)
        if kind == stat.S_IFLNK:
            raise DataError(member_name(path, info.filename), "symbolic link in zip archive")
        if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
            raise DataError(member_name(path, info.filename), "special file in zip archive")
        if info.flag_bits & 0x1:
            raise DataError(member_name(path, info.filename), "encrypted zip member")


def _read_tar(path: Path, split: str, limits: Limits, image_size: int | None) -> ImageSet:
    try:
        tf = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as e:
        raise DataError(path, f"not a readable tar archive ({e})") from e
    try:
        with tf:
            files: dict[str, tarfile.TarInfo] = {}
            count = total = 0
            for m in tf:  # headers only; a member's data is skipped, not kept
                count += 1
                if count > limits.max_files:
                    raise DataError(path, f"more than {limits.max_files} entries")
                if count % 1024 == 0:
                    check_cancelled(f"listed {count} entries")
                where = member_name(path, m.name)
                if m.issym():
                    raise DataError(where, f"symbolic link in tar archive (-> {m.linkname})")
                if m.islnk():
                    raise DataError(where, f"hard link in tar archive (-> {m.linkname})")
                if m.isdir():
                    check_member_path(path, m.name)
                    continue
                if not m.isfile():
                    raise DataError(where, "device, FIFO or other special entry in tar archive")
                posix = check_member_path(path, m.name)
                total += m.size
                if total > limits.max_total_bytes:
                    raise DataError(
                        path, f"uncompressed size is more than the limit of {limits.max_total_bytes} bytes (tar bomb?)"
                    )
                if not is_junk(posix) and is_image_name(posix):
                    files[posix] = m
            layout = arrange(list(files), split, str(path))
            index = {p: i for i, p in enumerate(layout.paths)}
            in_order = sorted(layout.paths, key=lambda p: files[p].offset_data)

            def read() -> Iterator[tuple[int, bytes]]:
                # Archive order: a compressed stream is read forward (a second pass rewinds it once).
                budget = _Budget()
                for p in in_order:
                    fobj = tf.extractfile(files[p])
                    if fobj is None:
                        raise DataError(member_name(path, p), "unreadable tar member")
                    data = read_capped(fobj, member_name(path, p), limits, budget)
                    budget.used += len(data)
                    yield index[p], data

            members = Members([member_name(path, p) for p in layout.paths], read)
            return images_from_encoded(members, layout.labels, layout.class_names, str(path), limits, image_size)
    except DataError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as e:
        raise DataError(path, f"corrupt tar archive ({e})") from e
