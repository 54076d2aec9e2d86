"""/livez (the process answers) and /readyz (database, broker and storage reachable); no auth."""

from __future__ import annotations

import os
import tempfile

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.core.db import get_engine
from app.core.queue import celery_app
from app.core.settings import get_settings

router = APIRouter(tags=["health"])


@router.get("/livez", summary="Liveness: the API process answers")
def livez() -> dict[str, str]:
    return {"status": "ok"}


def _check_db() -> str:
    with get_engine().connect() as conn:
        version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    return f"ok (schema {version})"


def _check_broker() -> str:
    with celery_app().connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=3)
    return "ok"


def _check_storage() -> str:
    root = get_settings().artifacts
    root.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix=".readyz.", dir=root)
    os.close(fd)
    os.unlink(path)
    return "ok"


@router.get(
    "/readyz",
    summary="Readiness: database, broker and artifact storage reachable",
    responses={503: {"description": "a dependency is down; detail names it"}},
)
async def readyz() -> JSONResponse:
    checks: dict[str, str] = {}
    for name, check in (("database", _check_db), ("broker", _check_broker), ("storage", _check_storage)):
        try:
            checks[name] = await run_in_threadpool(check)
        except Exception as exc:  # noqa: BLE001 - report every failure, not just the first
            checks[name] = f"error: {type(exc).__name__}: {exc}"
    failed = [name for name, value in checks.items() if not value.startswith("ok")]
    if failed:
        return JSONResponse(
            {"detail": "not ready: " + "; ".join(f"{n} {checks[n]}" for n in failed), "checks": checks}, 503
        )
    return JSONResponse({"status": "ready", "checks": checks})
