"""The FastAPI application: API v1, health checks, and the serving routes (predict, neighbours, UI).

uvicorn app.main:app        # embedded mode migrates the SQLite file and creates a first key
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.routing import APIRoute

from app import error_handlers, observability, security
from app.bootstrap import ensure_first_key, migrate
from app.core.settings import get_settings
from app.routes import (
    assignment_jobs,
    datasets,
    docs,
    health,
    keys,
    model,
    model_serving,
    neighbors,
    open_inference,
    predict,
    registry,
    results,
    runs,
    webhooks,
    weights,
)
from app.ui import registry as ui_registry
from app.ui import routes as ui

log = logging.getLogger("scan")

# The order of the API document (and of Swagger UI's sections): a reader's order.
DOCUMENT_ORDER = (
    health,
    keys,
    datasets,
    runs,
    results,
    predict,
    neighbors,
    model,
    registry,
    model_serving,
    open_inference,
    weights,
    assignment_jobs,
    webhooks,
    ui,
    ui_registry,
)
# The order routes are matched in.
SERVING_FIRST = (health, keys, predict, model_serving, open_inference) + tuple(
    m for m in DOCUMENT_ORDER if m not in (health, keys, predict, model_serving, open_inference)
)


@asynccontextmanager
async def lifespan(_: FastAPI):
    settings = get_settings()
    settings.make_dirs()
    if settings.embedded:
        # One SQLite file and no ops team: the API keeps its own schema current. With PostgreSQL the
        # deployment runs `alembic upgrade head` first (docker-compose.yml).
        migrate(settings)
        written = ensure_first_key(settings)
        if written is not None:
            print(f"[scan] created the first API key (tenant 'default'); it is in {written}", flush=True)
    yield


def _operation_id(route: APIRoute) -> str:
    return route.name  # clean client method names: create_run, list_clusters ...


def create_app() -> FastAPI:
    app = FastAPI(
        title="SCAN service",
        version="1.0.0",
        lifespan=lifespan,
        summary="Learn to classify images without labels (SCAN, ECCV 2020) over HTTP.",
        generate_unique_id_function=_operation_id,
        docs_url=None,
        redoc_url=None,
    )
    error_handlers.install(app)
    docs.install(app)  # Swagger UI / ReDoc from local assets: no CDN
    # Starlette tries routes in the order they were included, each at a cost: the serving routes
    # (the small requests that come by the thousand) go first, after the key check's own route.
    for module in SERVING_FIRST:
        app.include_router(module.router)
    observability.install(app)
    app.add_middleware(security.SecurityHeadersMiddleware)
    security.install_log_redaction()
    _register_body_schemas(app)
    return app


def _register_body_schemas(app: FastAPI) -> None:
    """Request bodies documented by hand (routes that take JSON or multipart) refer to their models
    as #/components/schemas/<name>; add those models there so every reference resolves."""
    from app.routes.neighbors import NeighborsRequest

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            defs = NeighborsRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(defs.pop("$defs", {}))
            components.setdefault("NeighborsRequest", defs)
            _errors_are_detail_strings(schema)
            _in_document_order(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


app = create_app()


def _errors_are_detail_strings(schema: dict) -> None:
    """Every error body is {"detail": "<message>"} (app/error_handlers.py), validation errors included: the
    document must not promise FastAPI's default array of error objects for 422."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.setdefault(
        "ErrorBody",
        {
            "title": "ErrorBody",
            "type": "object",
            "required": ["detail"],
            "properties": {"detail": {"type": "string", "title": "Detail"}},
        },
    )
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            if "422" in operation["responses"]:
                operation["responses"]["422"] = {
                    "description": "invalid request (detail names the field and the limit)",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
                }
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)


def _in_document_order(schema: dict) -> None:
    """Paths in DOCUMENT_ORDER, not in the order routes are matched in (SERVING_FIRST)."""
    rank: dict[str, int] = {}
    for module in DOCUMENT_ORDER:
        for route in module.router.routes:
            rank.setdefault(getattr(route, "path", ""), len(rank))
    paths = schema.get("paths", {})
    schema["paths"] = dict(sorted(paths.items(), key=lambda item: rank.get(item[0], len(rank))))
