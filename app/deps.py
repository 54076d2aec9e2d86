"""Typed dependencies: a route's signature reads like a sentence (session, tenant, settings)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, status
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.core.db import new_session
from app.core.faults import is_infrastructure_error
from app.core.settings import Settings, get_settings
from app.services import auth
from app.tables import Tenant

bearer = HTTPBearer(
    auto_error=False,
    description="`Authorization: Bearer <key>`; create a key with `scan admin create-key --tenant NAME`",
)


def get_db() -> Iterator[Session]:
    session = new_session()
    try:
        yield session
    finally:
        try:
            session.close()
        except Exception as exc:
            # Closing rolls back on a connection the database may have dropped meanwhile; the answer
            # is already sent, and the pool discards that connection.
            if not is_infrastructure_error(exc):
                raise


SessionDep = Annotated[Session, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def _verify(key: str) -> Tenant | None:
    with new_session() as session:
        return auth.verify(session, key)


async def current_tenant(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Tenant:
    """The key's tenant. A key this process verified lately is checked without the database and
    without leaving the event loop (the fast path of small /predict requests); else one read in a
    worker thread."""
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing API key: send `Authorization: Bearer <key>` "
            "(embedded mode wrote one to var/api-key.txt; or run "
            "`scan admin create-key --tenant NAME`)",
            headers=challenge,
        )
    key = credentials.credentials
    tenant = auth.cached(key) or await run_in_threadpool(_verify, key)
    if tenant is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid or revoked API key", headers=challenge)
    return tenant


TenantDep = Annotated[Tenant, Depends(current_tenant)]
