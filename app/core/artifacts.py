"""Where datasets, checkpoints, models and indexes live between machines: an artifact store.

Every process works on a local folder (`Settings.artifacts`: `datasets/<id>/`, `runs/<id>/`); the
store is the copy that outlives the machine. Keys are those folders' relative paths
(`runs/<id>/checkpoints/pretext.pt`), so any machine maps a key to its own folder.

- ``SCAN_ARTIFACT_STORE`` empty (the default): the local folder *is* the store (embedded mode, or a
  folder every machine mounts); syncing is a no-op.
- ``file:///srv/shared``: a folder store (a mount shared by the machines), the local folder a cache.
- ``s3://bucket/prefix``: any S3-compatible object store (AWS, MinIO, ...) through boto3;
  ``SCAN_S3_ENDPOINT`` points at a non-AWS server, credentials come from the usual AWS variables.

Files are written whole and atomically by `ml/` (temp file + rename), so a pushed file is never half
of one; a pull writes through a temporary name too.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse


class ArtifactStore(Protocol):
    """Keys map to versions: a string that changes whenever the stored object changes (S3's ETag,
    a folder file's size and mtime); `put` returns the new version."""

    def put(self, key: str, path: Path) -> str: ...
    def get(self, key: str, path: Path) -> None: ...
    def versions(self, prefix: str) -> dict[str, str]: ...
    def delete(self, prefix: str) -> None: ...


def _temp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    return Path(tmp)


class FolderStore:
    """A folder as the store (a shared mount)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def put(self, key: str, path: Path) -> str:
        target = self.root / key
        tmp = _temp_beside(target)
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)
        return self._version(target)

    @staticmethod
    def _version(path: Path) -> str:
        st = path.stat()
        return f"{st.st_size}-{st.st_mtime_ns}"

    def get(self, key: str, path: Path) -> None:
        tmp = _temp_beside(path)
        shutil.copyfile(self.root / key, tmp)
        os.replace(tmp, path)

    def versions(self, prefix: str) -> dict[str, str]:
        base = self.root / prefix
        if not base.is_dir():
            return {}
        return {
            p.relative_to(self.root).as_posix(): self._version(p)
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        }

    def delete(self, prefix: str) -> None:
        shutil.rmtree(self.root / prefix, ignore_errors=True)


class S3Store:
    """An S3-compatible bucket (boto3), keys under an optional prefix."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None):
        import boto3  # lazy: only deployments with object storage need it

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.client = boto3.client("s3", endpoint_url=endpoint_url or None)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, path: Path) -> str:
        self.client.upload_file(str(path), self.bucket, self._key(key))
        return self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ETag"]

    def get(self, key: str, path: Path) -> None:
        tmp = _temp_beside(path)
        try:
            self.client.download_file(self.bucket, self._key(key), str(tmp))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def versions(self, prefix: str) -> dict[str, str]:
        out: dict[str, str] = {}
        strip = len(self.prefix) + 1 if self.prefix else 0
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._key(prefix.rstrip("/") + "/")
        ):
            for obj in page.get("Contents", []):
                out[obj["Key"][strip:]] = obj["ETag"]
        return out

    def delete(self, prefix: str) -> None:
        keys = [{"Key": self._key(k)} for k in self.versions(prefix)]
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys[i : i + 1000]})


def open_store(url: str, endpoint_url: str | None = None) -> ArtifactStore | None:
    """The store a URL names; None for "" (the local folder is the store)."""
    if not url:
        return None
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return FolderStore(parsed.path)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"artifact store {url!r}: s3:// needs a bucket (s3://bucket/prefix)")
        return S3Store(parsed.netloc, parsed.path, endpoint_url)
    raise ValueError(f"artifact store {url!r}: use file:///path or s3://bucket/prefix")


def synced(settings) -> Synced:
    """The Synced view of `settings`: its artifact store over its local artifacts folder."""
    return Synced(open_store(settings.artifact_store, settings.s3_endpoint), settings.artifacts)


class Synced:
    """One local folder kept in step with the store, prefix by prefix (`runs/<id>`, `datasets/<id>`).

    A manifest (`<prefix>/.synced.json`, never pushed) records, per key, the store's version and the
    local file's (size, mtime) when they were last equal. `pull` fetches keys whose store version
    moved on (another machine pushed a newer checkpoint), `push` sends files changed here since; so a
    per-epoch push sends the new checkpoint, not the whole run again, and a checkpoint a killed
    worker left here but never pushed is not overwritten by an older one from the store."""

    MANIFEST = ".synced.json"

    def __init__(self, store: ArtifactStore | None, local_root: Path):
        self.store, self.root = store, Path(local_root)

    def _manifest(self, prefix: str) -> tuple[Path, dict[str, dict]]:
        path = self.root / prefix / self.MANIFEST
        return path, (json.loads(path.read_text()) if path.is_file() else {})

    @staticmethod
    def _save(path: Path, manifest: dict) -> None:
        tmp = _temp_beside(path)
        tmp.write_text(json.dumps(manifest))
        os.replace(tmp, path)

    @staticmethod
    def _stat(path: Path) -> list[int]:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]

    def pull(self, prefix: str, skip: tuple[str, ...] = ()) -> int:
        """Fetch what changed in the store; `skip` names sub-folders not wanted here (`checkpoints/`)."""
        if self.store is None:
            return 0
        path, manifest = self._manifest(prefix)
        count = 0
        for key, version in self.store.versions(prefix).items():
            if key[len(prefix) :].lstrip("/").startswith(skip):
                continue
            local = self.root / key
            if local.is_file() and manifest.get(key, {}).get("version") == version:
                continue
            self.store.get(key, local)
            manifest[key] = {"version": version, "local": self._stat(local)}
            self._save(path, manifest)
            count += 1
        return count

    def push(self, prefix: str) -> int:
        if self.store is None:
            return 0
        base = self.root / prefix
        path, manifest = self._manifest(prefix)
        count = 0
        for file in sorted(base.rglob("*")) if base.is_dir() else []:
            if not file.is_file() or file.name.startswith("."):  # the manifest, temp files of atomic writes
                continue
            key = file.relative_to(self.root).as_posix()
            stat = self._stat(file)
            if manifest.get(key, {}).get("local") == stat:
                continue
            manifest[key] = {"version": self.store.put(key, file), "local": stat}
            self._save(path, manifest)
            count += 1
        return count

    def delete(self, prefix: str) -> None:
        if self.store is not None:
            self.store.delete(prefix)
