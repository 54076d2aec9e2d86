"""The model registry in the browser: create a model, publish a run as a version, move and roll
back aliases, and name and merge a version's clusters while looking at their grids.

Server-rendered forms like the rest of /ui: every POST comes from this origin and echoes the
session's CSRF token, then calls the same service as the JSON API (same owner and bounds checks).
A refused form (a name taken, a bad character) renders the page again with the message.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Form, HTTPException, Path, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from app.core.errors import ServiceError
from app.deps import SessionDep
from app.schemas.common import MAX_INT, ClusterIndex
from app.services import registry, results
from app.services import runs as run_service
from app.serving.model_versions import warm
from app.tables import RunState, Tenant
from app.ui.routes import TOP_ITEMS_SHOWN, UiTenant, _same_origin, templates
from ml.limits import MAX_K

router = APIRouter(prefix="/ui/models", include_in_schema=False)
RUNS_OFFERED = 200
Csrf = Annotated[str, Form(max_length=100)]
NameField = Annotated[str, Form(max_length=200)]
TextField = Annotated[str, Form(max_length=registry.MAX_DESCRIPTION + 100)]
VersionNumber = Annotated[int, Path(ge=1, le=MAX_INT)]


def _check_form(request: Request, csrf_token: str) -> None:
    _same_origin(request)
    if not hmac.compare_digest(request.state.ui_session.csrf_token, csrf_token):
        raise HTTPException(403, "missing or wrong CSRF token; use the page's form")


def _back(path: str, anchor: str = "") -> RedirectResponse:
    return RedirectResponse(path + anchor, status_code=303)


def _model_path(name: str) -> str:
    return f"/ui/models/{quote(name)}"


def _version_path(name: str, number: int) -> str:
    return f"{_model_path(name)}/versions/{number}"


# -- models ----------------------------------------------------------------------------------------


def _models_page(request: Request, session, tenant: Tenant, error: str | None = None, status: int = 200):
    models, _ = registry.list_(session, tenant, limit=RUNS_OFFERED, offset=0)
    views = [
        {
            "name": m.name,
            "description": m.description,
            "latest": registry.latest_version(session, m),
            "aliases": registry.aliases(session, m),
        }
        for m in models
    ]
    return templates.TemplateResponse(
        request, "models.html", {"tenant": tenant, "models": views, "error": error}, status_code=status
    )


@router.get("", name="ui_models", response_class=HTMLResponse)
def models_page(request: Request, session: SessionDep, tenant: UiTenant):
    return _models_page(request, session, tenant)


@router.post("", name="ui_model_create")
def create_model(
    request: Request,
    session: SessionDep,
    tenant: UiTenant,
    name: NameField = "",
    description: TextField = "",
    csrf_token: Csrf = "",
):
    _check_form(request, csrf_token)
    try:
        model = registry.create(session, tenant, name.strip(), description or None)
    except ServiceError as exc:
        return _models_page(request, session, tenant, exc.detail, exc.status_code)
    return _back(_model_path(model.name))


def _model_page(request: Request, session, tenant: Tenant, name: str, error: str | None = None, status: int = 200):
    model = registry.get(session, tenant, name)
    versions, _ = registry.list_versions(session, model, limit=MAX_INT, offset=0)
    on_version = registry.version_aliases(session, model)
    published = {v.run_id for v in versions}
    runs, _ = run_service.list_(
        session, tenant, state=RunState.SUCCEEDED, dataset_id=None, limit=RUNS_OFFERED, offset=0
    )
    return templates.TemplateResponse(
        request,
        "model.html",
        {
            "tenant": tenant,
            "model": model,
            "versions": [
                {
                    "version": v.version,
                    "run_id": v.run_id,
                    "created_at": v.created_at,
                    "aliases": on_version.get(v.id, []),
                }
                for v in versions
            ],
            "aliases": registry.aliases(session, model),
            "runs": [r for r in runs if r.id not in published],
            "error": error,
        },
        status_code=status,
    )


@router.get("/{name}", name="ui_model", response_class=HTMLResponse)
def model_page(request: Request, name: str, session: SessionDep, tenant: UiTenant):
    return _model_page(request, session, tenant, name)


@router.post("/{name}/versions", name="ui_model_publish")
def publish(
    request: Request, name: str, session: SessionDep, tenant: UiTenant, run_id: NameField = "", csrf_token: Csrf = ""
):
    _check_form(request, csrf_token)
    try:
        registry.publish(session, tenant, name, run_id)
    except ServiceError as exc:
        return _model_page(request, session, tenant, name, exc.detail, exc.status_code)
    return _back(_model_path(name))


@router.post("/{name}/aliases", name="ui_model_alias")
async def move_alias(
    request: Request,
    name: str,
    session: SessionDep,
    tenant: UiTenant,
    alias: NameField = "",
    version: Annotated[int, Form(ge=1, le=MAX_INT)] = 1,
    csrf_token: Csrf = "",
):
    _check_form(request, csrf_token)
    try:
        await _warm_then_move(session, tenant, name, alias.strip(), version)
    except ServiceError as exc:
        return _model_page(request, session, tenant, name, exc.detail, exc.status_code)
    return _back(_model_path(name))


@router.post("/{name}/aliases/{alias}/rollback", name="ui_model_rollback")
async def rollback_alias(
    request: Request, name: str, alias: str, session: SessionDep, tenant: UiTenant, csrf_token: Csrf = ""
):
    _check_form(request, csrf_token)
    try:
        await _warm_then_move(session, tenant, name, alias, registry.rollback_target(session, tenant, name, alias))
    except ServiceError as exc:
        return _model_page(request, session, tenant, name, exc.detail, exc.status_code)
    return _back(_model_path(name))


async def _warm_then_move(session, tenant: Tenant, name: str, alias: str, number: int) -> None:
    """As PUT /v1/models/{name}/aliases/{alias}: the version is loaded before the alias moves."""
    target = registry.alias_target(session, tenant, name, alias, number)
    run_dir = await run_in_threadpool(run_service.servable_run_dir, target.run)
    await run_in_threadpool(warm, run_dir)
    registry.move_alias(session, tenant, name, alias, number)


# -- a version's clusters ---------------------------------------------------------------------------


def _version_page(
    request: Request, session, tenant: Tenant, name: str, number: int, error: str | None = None, status: int = 200
):
    resolved = registry.resolve(session, tenant, f"{name}/versions/{number}")
    stats = {c.index: c for c in results.clusters(session, resolved.run)}
    cmap = resolved.clusters
    cells: list[dict[str, Any]] = []
    # Run clusters in served order: each merged member right after the cluster it is served as.
    for i in sorted(range(len(cmap.target)), key=lambda i: (cmap.target[i], i)):
        c = stats.get(i)
        cells.append(
            {
                "index": i,
                "served_as": cmap.target[i],
                "merged": cmap.target[i] != i,
                "group_size": sum(1 for t in cmap.target if t == i),
                "name": cmap.names[i],
                "description": cmap.descriptions[i],
                "size": c.size if c else 0,
                "mean_confidence": c.mean_confidence if c else None,
                "prototype": c.prototype if c else None,
                "matched_label": c.matched_label if c else None,
                "top_items": [int(x) for x in ((c.top_items or []) if c else [])[:TOP_ITEMS_SHOWN]],
            }
        )
    model = registry.get(session, tenant, name)
    on_version = registry.version_aliases(session, model).get(resolved.version_id, [])
    return templates.TemplateResponse(
        request,
        "model_version.html",
        {
            "tenant": tenant,
            "model": model,
            "version": resolved.version,
            "aliases": on_version,
            "run": resolved.run,
            "cells": cells,
            "served": len(cmap.served),
            "error": error,
            "max_name": registry.MAX_CLUSTER_NAME,
        },
        status_code=status,
    )


@router.get("/{name}/versions/{version}", name="ui_model_version", response_class=HTMLResponse)
def version_page(request: Request, name: str, version: VersionNumber, session: SessionDep, tenant: UiTenant):
    return _version_page(request, session, tenant, name, version)


@router.post("/{name}/versions/{version}/clusters/{cluster}", name="ui_cluster_name")
def name_cluster(
    request: Request,
    name: str,
    version: VersionNumber,
    cluster: ClusterIndex,
    session: SessionDep,
    tenant: UiTenant,
    cluster_name: NameField = "",
    description: TextField = "",
    csrf_token: Csrf = "",
):
    _check_form(request, csrf_token)
    changes = {"name": cluster_name or None, "description": description or None}
    try:
        registry.name_cluster(session, tenant, name, version, cluster, changes)
    except ServiceError as exc:
        return _version_page(request, session, tenant, name, version, exc.detail, exc.status_code)
    return _back(_version_path(name, version), f"#cluster-{cluster}")


@router.post("/{name}/versions/{version}/merge", name="ui_cluster_merge")
def merge_clusters(
    request: Request,
    name: str,
    version: VersionNumber,
    session: SessionDep,
    tenant: UiTenant,
    clusters: Annotated[list[Annotated[int, Field(ge=0, le=MAX_INT)]] | None, Form(max_length=MAX_K)] = None,
    group_name: NameField = "",
    csrf_token: Csrf = "",
):
    _check_form(request, csrf_token)
    try:
        into = registry.merge_clusters(session, tenant, name, version, clusters or [], group_name or None)
    except ServiceError as exc:
        return _version_page(request, session, tenant, name, version, exc.detail, exc.status_code)
    return _back(_version_path(name, version), f"#cluster-{into}")


@router.post("/{name}/versions/{version}/clusters/{cluster}/unmerge", name="ui_cluster_unmerge")
def unmerge_cluster(
    request: Request,
    name: str,
    version: VersionNumber,
    cluster: ClusterIndex,
    session: SessionDep,
    tenant: UiTenant,
    csrf_token: Csrf = "",
):
    _check_form(request, csrf_token)
    try:
        registry.unmerge_cluster(session, tenant, name, version, cluster)
    except ServiceError as exc:
        return _version_page(request, session, tenant, name, version, exc.detail, exc.status_code)
    return _back(_version_path(name, version), f"#cluster-{cluster}")
