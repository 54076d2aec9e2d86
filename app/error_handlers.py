"""The one place errors become HTTP: every error is ``{"detail": "<message a person can act on>"}``,
with the status its class carries (app/core/errors.py), whatever raised it. Under /v2/ (the Open
Inference Protocol) the message is also given as ``error``, the field Triton and KServe clients read."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.core.errors import ServiceError
from app.core.faults import INFRA_ERRORS, is_infrastructure_error, which_service
from app.core.settings import get_settings
from ml.data import DataError

log = logging.getLogger("scan.api")


def _error(request: Request, detail: str, status: int, headers: dict | None = None) -> JSONResponse:
    body = {"detail": detail}
    if request.url.path.startswith("/v2/"):
        body["error"] = detail
    return JSONResponse(body, status, headers=headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    if is_infrastructure_error(exc):
        log.warning(
            "%s %s: %s unreachable: %s", request.method, request.url.path, which_service(exc), type(exc).__name__
        )
        return _error(
            request,
            f"the {which_service(exc)} is unreachable right now ({type(exc).__name__}); retry in a few seconds",
            503,
            headers={"Retry-After": str(get_settings().retry_after_s)},
        )
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return _error(request, "internal error (logged on the server); please report it", 500)


def _where(loc) -> str:
    return ".".join(str(part) for part in loc if part not in ("body", "query", "path", "header")) or "request"


def describe(errors, prefix: str = "") -> str:
    return "; ".join(f"{prefix}{_where(e['loc'])}: {e['msg']}" for e in errors)


def install(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = allowed_methods(request)
        return _error(request, str(exc.detail), exc.status_code, headers=headers or None)

    @app.exception_handler(RequestValidationError)
    async def _request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(request, "invalid request: " + describe(exc.errors()), 422)

    @app.exception_handler(ValidationError)
    async def _config(_: Request, exc: ValidationError) -> JSONResponse:
        # Raised by ml.config.RunConfig on bad overrides: name the field the user must change.
        return JSONResponse({"detail": "invalid run configuration: " + describe(exc.errors())}, 422)

    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError) -> JSONResponse:
        headers = {"Retry-After": str(get_settings().retry_after_s)} if exc.status_code == 503 else None
        return _error(request, exc.detail, exc.status_code, headers=headers)

    # The database or broker unreachable (a restart, a dropped connection, a full pool): 503 with
    # Retry-After, whichever route or dependency ran into it. Registered per class so the request
    # metrics see the 503; the catch-all below keeps anything else JSON too.
    for cls in (*INFRA_ERRORS, DBAPIError):
        app.add_exception_handler(cls, _unexpected)
    app.add_exception_handler(Exception, _unexpected)

    @app.exception_handler(DataError)
    async def _data(request: Request, exc: DataError) -> JSONResponse:
        return _error(request, str(exc), 422)


def allowed_methods(request: Request) -> str:
    """Every method some route serves at this path. Starlette names only the first route that
    matched the path, so /v1/datasets (GET and POST, two routes) used to say just "POST"."""
    from starlette.routing import Match

    methods: set[str] = set()
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"):
        probe = {**request.scope, "method": method}
        if any(route.matches(probe)[0] == Match.FULL for route in request.app.routes):
            methods.add(method)
    return ", ".join(sorted(methods))
