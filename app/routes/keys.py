"""/v1/keys: who the calling key belongs to (also the cheapest authenticated route: the baseline of
bench/serve.py), and revoking one of the tenant's own keys (at once on every API process sharing the
var directory; see app/services/auth.py)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Response
from fastapi.security import HTTPAuthorizationCredentials

from app.deps import SessionDep, TenantDep, bearer
from app.schemas.common import ERRORS
from app.schemas.keys import KeyOwner
from app.services import auth

router = APIRouter(tags=["keys"])
Credentials = Annotated[HTTPAuthorizationCredentials, Depends(bearer)]


@router.get("/v1/keys/current", response_model=KeyOwner, responses=ERRORS, summary="The tenant of the calling key")
async def current_key(tenant: TenantDep, credentials: Credentials) -> KeyOwner:
    return KeyOwner(tenant=tenant.name, prefix=auth.key_prefix(credentials.credentials) or "")


@router.delete(
    "/v1/keys/{prefix}",
    status_code=204,
    responses=ERRORS,
    summary="Revoke one of this tenant's API keys (the calling key included)",
)
def revoke_key(
    prefix: Annotated[str, Path(min_length=1, max_length=16, pattern="^[0-9a-f]+$")],
    session: SessionDep,
    tenant: TenantDep,
) -> Response:
    auth.revoke(session, prefix, tenant_id=tenant.id)
    session.commit()
    auth.forget_verified_keys()
    return Response(status_code=204)
