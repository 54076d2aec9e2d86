"""Cluster-browser sessions: the API key is typed once and never leaves the server again.

The cookie holds ``<session id>.<HMAC-SHA256 of it>``: 256 random bits, signed with the deployment's
secret (``SCAN_SESSION_SECRET``, or one generated into ``<var_dir>/session-secret``), so a forged or
truncated cookie is refused before the database is asked. The row keeps only the id's SHA-256, the
key that opened it (revoking the key ends its sessions) and a CSRF token that every state-changing
form of the session echoes. Logging out deletes the row: a copied cookie dies with it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from datetime import timedelta
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.core.settings import Settings
from app.services.auth import key_row
from app.tables import ApiKey, Tenant, UiSession, utcnow

LIFETIME = timedelta(hours=12)


def _secret(settings: Settings) -> bytes:
    if settings.session_secret:
        return settings.session_secret.encode()
    path = Path(settings.var_dir).resolve() / "session-secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # O_EXCL: two API processes starting together agree on one secret
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


def sign(settings: Settings, value: str) -> str:
    return hmac.new(_secret(settings), value.encode(), hashlib.sha256).hexdigest()


def _hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def open_session(session: Session, settings: Settings, api_key: str) -> tuple[str, UiSession] | None:
    """(cookie value, row) for a valid key, None otherwise."""
    row = key_row(session, api_key)
    if row is None:
        return None
    session_id = secrets.token_urlsafe(32)
    ui = UiSession(
        id_hash=_hash(session_id),
        tenant_id=row.tenant_id,
        api_key_id=row.id,
        csrf_token=secrets.token_urlsafe(32),
        expires_at=utcnow() + LIFETIME,
    )
    session.execute(delete(UiSession).where(UiSession.expires_at < utcnow()))  # keep the table small
    session.add(ui)
    session.commit()
    return f"{session_id}.{sign(settings, session_id)}", ui


def find(session: Session, settings: Settings, cookie: str | None) -> tuple[Tenant, UiSession] | None:
    if not cookie or cookie.count(".") != 1 or len(cookie) > 200:
        return None
    session_id, signature = cookie.split(".")
    if not hmac.compare_digest(signature, sign(settings, session_id)):
        return None
    ui = session.get(UiSession, _hash(session_id))
    if ui is None or ui.expires_at < utcnow():
        return None
    key = session.get(ApiKey, ui.api_key_id)
    if key is None or key.revoked_at is not None:
        return None
    tenant = session.get(Tenant, ui.tenant_id)
    return (tenant, ui) if tenant is not None else None


def close(session: Session, ui: UiSession) -> None:
    session.execute(delete(UiSession).where(UiSession.id_hash == ui.id_hash))
    session.commit()


def count(session: Session) -> int:
    return len(session.scalars(select(UiSession.id_hash)).all())
