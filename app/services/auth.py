"""API keys: ``scan_<prefix>_<secret>``; the prefix finds the row, only SHA-256 of the key is stored.

The secret has 256 bits of entropy, so a plain (unsalted, fast) hash is safe: there is nothing to
brute-force, unlike a password.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.tables import ApiKey, Tenant


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
    tenant = get_or_create_tenant(session, tenant_name)
    prefix = secrets.token_hex(6)
    key = f"scan_{prefix}_{secrets.token_urlsafe(32)}"
    session.add(ApiKey(tenant_id=tenant.id, prefix=prefix, key_hash=_hash(key)))
    session.flush()
    return key


def key_row(session: Session, key: str) -> ApiKey | None:
    """The live key row for ``key``, or None (unknown, malformed or revoked)."""
    parts = key.split("_")
    if len(parts) < 3 or parts[0] != "scan":
        return None
    row = session.scalar(select(ApiKey).where(ApiKey.prefix == parts[1], ApiKey.revoked_at.is_(None)))
    if row is None or not hmac.compare_digest(row.key_hash, _hash(key)):
        return None
    return row


def tenant_for_key(session: Session, key: str) -> Tenant | None:
    row = key_row(session, key)
    return None if row is None else session.get(Tenant, row.tenant_id)
