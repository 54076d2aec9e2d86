"""The FastAPI application: API v1, health checks, and the serving routes (predict, neighbours, UI).

    uvicorn app.main:app        # embedded mode migrates the SQLite file and creates a first key
"""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.routing import APIRoute

from app import error_handlers, observability
from app.bootstrap import ensure_first_key, migrate
from app.core.settings import get_settings
from app.routes import datasets, docs, health, model, neighbors, predict, results, runs
from app.ui import routes as ui

log = logging.getLogger("scan")


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
    app = FastAPI(title="SCAN service", version="1.0.0", lifespan=lifespan,
                  summary="Learn to classify images without labels (SCAN, ECCV 2020) over HTTP.",
                  generate_unique_id_function=_operation_id, docs_url=None, redoc_url=None)
    error_handlers.install(app)
    docs.install(app)  # Swagger UI / ReDoc from local assets: no CDN
    for module in (health, datasets, runs, results, predict, neighbors, model, ui):
        app.include_router(module.router)
    observability.install(app)
    return app


app = create_app()
