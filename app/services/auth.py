"""API keys: ``scan_<prefix>_<secret>``; the prefix finds the row, only SHA-256 of the key is stored.

The secret has 256 bits of entropy, so a plain (unsalted, fast) hash is safe: there is nothing to
brute-force, unlike a password.

Verified keys are cached per process (`verify`), so a small request does not pay a database round
trip for its key: an entry lives `auth_cache_s` seconds, and a revocation ends every entry at once
in this process and, through the stamp file `<var_dir>/keys-revoked.stamp` (its mtime is read on each
lookup, a stat and no database), in every process that shares the var directory: the API's other
workers and `scan admin revoke-key`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.errors import Invalid, NotFound
from app.core.settings import get_settings
from app.core.text import check_printable
from app.tables import ApiKey, Tenant

_MAX_CACHED = 10_000  # keys; a full cache is emptied (a new key costs one database read again)


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
    return tenant


def create_key(session: Session, tenant_name: str) -> str:
    """Create (or reuse) the tenant and a new key for it; returns the key, shown only this once."""
    check_printable(tenant_name, "the tenant name", Invalid)
    tenant = get_or_create_tenant(session, tenant_name)
    prefix = secrets.token_hex(6)
    key = f"scan_{prefix}_{secrets.token_urlsafe(32)}"
    session.add(ApiKey(tenant_id=tenant.id, prefix=prefix, key_hash=_hash(key)))
    session.flush()
    return key


def key_prefix(key: str) -> str | None:
    parts = key.split("_")
    if len(parts) < 3 or parts[0] != "scan":
        return None
    return parts[1]


def key_row(session: Session, key: str) -> ApiKey | None:
    """The live key row for ``key``, or None (unknown, malformed or revoked)."""
    prefix = key_prefix(key)
    if prefix is None:
        return None
    row = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None)))
    if row is None or not hmac.compare_digest(row.key_hash, _hash(key)):
        return None
    return row


def tenant_for_key(session: Session, key: str) -> Tenant | None:
    row = key_row(session, key)
    return None if row is None else session.get(Tenant, row.tenant_id)


# -- the per-process cache of verified keys -----------------------------------------------------------


@dataclass(frozen=True)
class _Verified:
    tenant: Tenant  # detached, id and name only; shared by the requests that send this key (read-only)
    until: float  # time.monotonic() after which the database is asked again


_verified: dict[str, _Verified] = {}
_lock = threading.Lock()
_stamp_seen: int | None = None


@lru_cache(maxsize=8)
def _stamp_path(var_dir: Path) -> Path:
    # Read on every request: the path is built once per var directory, the stat is the only cost.
    return var_dir / "keys-revoked.stamp"


def _stamp_mtime() -> int:
    try:
        return os.stat(_stamp_path(get_settings().var_dir)).st_mtime_ns
    except FileNotFoundError:
        return 0


def cached(key: str) -> Tenant | None:
    """The key's tenant if this process verified the key within `auth_cache_s` and no revocation
    happened since; else None (then call `verify`). No database: safe on the event loop."""
    global _stamp_seen
    if float(get_settings().auth_cache_s) <= 0:
        return None
    stamp = _stamp_mtime()
    with _lock:
        if stamp != _stamp_seen:
            _verified.clear()
            _stamp_seen = stamp
        hit = _verified.get(_hash(key))
    if hit is None or hit.until <= time.monotonic():
        return None
    return hit.tenant


def verify(session: Session, key: str) -> Tenant | None:
    """The key's tenant (a detached copy holding id and name) read from the database, or None for an
    unknown, malformed or revoked key; a live key is remembered for `cached`."""
    ttl = float(get_settings().auth_cache_s)
    stamp = _stamp_mtime()  # read before the database: a revocation committed meanwhile still clears it
    tenant = tenant_for_key(session, key)
    if tenant is None:
        return None  # never cache a refusal: a key created a moment later must work at once
    detached = Tenant(id=tenant.id, name=tenant.name)
    if ttl > 0:
        with _lock:
            if len(_verified) >= _MAX_CACHED:
                _verified.clear()
            if stamp == _stamp_seen:
                _verified[_hash(key)] = _Verified(detached, time.monotonic() + ttl)
    return detached


def forget_verified_keys() -> None:
    """After a revocation has been committed: empty this process's cache and touch the stamp file,
    which empties the cache of every process sharing the var directory on its next lookup."""
    with _lock:
        _verified.clear()
    path = _stamp_path(get_settings().var_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    now = time.time_ns()
    os.utime(path, ns=(now, now))  # a new mtime even when two revocations share a clock tick's touch


def revoke(session: Session, prefix: str, tenant_id: str | None = None) -> ApiKey:
    """Mark the key with this prefix revoked (only among `tenant_id`'s keys when given). The caller
    commits, then calls `forget_verified_keys()`."""
    query = select(ApiKey).where(ApiKey.prefix == prefix)
    if tenant_id is not None:
        query = query.where(ApiKey.tenant_id == tenant_id)
    row = session.scalar(query)
    if row is None:
        raise NotFound(f"API key {prefix} not found (its prefix is the part after `scan_`)")
    if row.revoked_at is None:
        row.revoked_at = datetime.now(timezone.utc)
        session.flush()
    return row
