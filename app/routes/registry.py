"""/v1/models: named models, their versions (published runs), aliases, and named, merged clusters.

    POST /v1/models {"name": "digits"}                         a name of yours
    POST /v1/models/digits/versions {"run_id": "..."}          a SUCCEEDED run as the next version
    PUT  /v1/models/digits/aliases/production {"version": 2}   warm v2, then move the alias
    POST /v1/models/digits/aliases/production/rollback         back to where it pointed before
    PATCH /v1/models/digits/versions/2/clusters/3 {"name": "three"}
    POST /v1/models/digits/versions/2/clusters/merge {"clusters": [3, 8]}

Serving through a model (predict, neighbours, export) is app/routes/model_serving.py.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from app.core.names import REFERENCE_PATTERN
from app.deps import SessionDep, SettingsDep, TenantDep
from app.schemas.common import ERRORS, MAX_INT, ClusterIndex, Limit, Offset, Page
from app.schemas.registry import (
    AliasMove,
    AliasOut,
    ClusterMerge,
    ClusterPatch,
    ModelCreate,
    ModelOut,
    ModelUpdate,
    NamedClusterOut,
    VersionClustersOut,
    VersionCreate,
    VersionOut,
    VersionPage,
)
from app.services import registry
from app.services import runs as run_service
from app.serving.model_versions import warm
from app.tables import RegisteredModel

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERRORS)

_NAME_DOC = "letters, digits, '.', '_', '-' (at most 64)"
ModelName = Annotated[str, Path(max_length=registry.MAX_NAME, pattern=registry.NAME_PATTERN, description=_NAME_DOC)]
AliasName = Annotated[
    str, Path(max_length=registry.MAX_NAME, pattern=registry.NAME_PATTERN, description="e.g. production, staging")
]
ModelRef = Annotated[
    str,
    Path(
        max_length=2 * registry.MAX_NAME + 1,
        pattern=REFERENCE_PATTERN,
        description="`name` (its production alias, else its latest version) or `name@alias`",
    ),
]
VersionNumber = Annotated[int, Path(ge=1, le=MAX_INT, description="version number (1, 2, ...)")]


def model_out(session, model: RegisteredModel) -> ModelOut:
    return ModelOut(
        name=model.name,
        description=model.description,
        created_at=model.created_at,
        latest_version=registry.latest_version(session, model),
        aliases=registry.aliases(session, model),
    )


def version_out(session, model: RegisteredModel, version, aliases: dict[str, list[str]] | None = None) -> VersionOut:
    run = registry.version_run(session, version)
    aliases = registry.version_aliases(session, model) if aliases is None else aliases
    return VersionOut(
        model=model.name,
        version=version.version,
        run_id=version.run_id,
        dataset_id=run.dataset_id,
        num_clusters=run.num_clusters,
        created_at=version.created_at,
        aliases=aliases.get(version.id, []),
    )


def clusters_out(session, resolved: registry.ResolvedModel) -> VersionClustersOut:
    return VersionClustersOut(
        **resolved.describe(),
        clusters=[NamedClusterOut(**c) for c in registry.cluster_table(session, resolved)],
    )


# -- models ----------------------------------------------------------------------------------------


@router.post("", summary="Create a model (a name apps call instead of a run id)", status_code=201)
def create_model(body: ModelCreate, session: SessionDep, tenant: TenantDep) -> ModelOut:
    return model_out(session, registry.create(session, tenant, body.name, body.description))


@router.get("", summary="List your models with their latest version and aliases")
def list_models(
    session: SessionDep, tenant: TenantDep, settings: SettingsDep, limit: Limit = None, offset: Offset = 0
) -> Page[ModelOut]:
    limit = min(limit or settings.default_page_size, settings.max_page_size)
    rows, total = registry.list_(session, tenant, limit=limit, offset=offset)
    return Page[ModelOut](items=[model_out(session, m) for m in rows], total=total, limit=limit, offset=offset)


@router.get("/{name}", summary="One model: latest version and aliases")
def read_model(name: ModelName, session: SessionDep, tenant: TenantDep) -> ModelOut:
    return model_out(session, registry.get(session, tenant, name))


@router.patch("/{name}", summary="Change a model's description")
def update_model(name: ModelName, body: ModelUpdate, session: SessionDep, tenant: TenantDep) -> ModelOut:
    return model_out(session, registry.update_model(session, tenant, name, body.description))


@router.delete("/{name}", summary="Delete a model, its versions and aliases (the runs stay)", status_code=204)
def delete_model(name: ModelName, session: SessionDep, tenant: TenantDep) -> Response:
    registry.delete_model(session, tenant, name)
    return Response(status_code=204)


# -- versions --------------------------------------------------------------------------------------


@router.post(
    "/{name}/versions",
    summary="Publish a SUCCEEDED run as the model's next version",
    status_code=201,
    responses={200: {"model": VersionOut, "description": "the run was already published: that version"}},
)
def publish_version(name: ModelName, body: VersionCreate, session: SessionDep, tenant: TenantDep) -> VersionOut:
    version, created = registry.publish(session, tenant, name, body.run_id)
    out = version_out(session, registry.get(session, tenant, name), version)
    return JSONResponse(out.model_dump(mode="json"), 201 if created else 200)


@router.get("/{name}/versions", summary="The model's versions, newest first")
def list_versions(
    name: ModelName,
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    limit: Limit = None,
    offset: Offset = 0,
) -> VersionPage:
    model = registry.get(session, tenant, name)
    limit = min(limit or settings.default_page_size, settings.max_page_size)
    rows, total = registry.list_versions(session, model, limit=limit, offset=offset)
    aliases = registry.version_aliases(session, model)
    return VersionPage(
        items=[version_out(session, model, v, aliases) for v in rows], total=total, limit=limit, offset=offset
    )


@router.get("/{name}/versions/{version}", summary="One version: its run and the aliases on it")
def read_version(name: ModelName, version: VersionNumber, session: SessionDep, tenant: TenantDep) -> VersionOut:
    model = registry.get(session, tenant, name)
    return version_out(session, model, registry.get_version(session, model, version))


# -- aliases ---------------------------------------------------------------------------------------


async def _warm_then_move(session, tenant, name: str, alias: str, number: int) -> AliasOut:
    """The new version is loaded and has run once in this process before the alias moves, so no
    request after the move waits for a model to load."""
    target = registry.alias_target(session, tenant, name, alias, number)
    run_dir = await run_in_threadpool(run_service.servable_run_dir, target.run)
    await run_in_threadpool(warm, run_dir)
    previous, current = registry.move_alias(session, tenant, name, alias, number)
    return AliasOut(model=name, alias=alias, version=current, previous_version=previous)


@router.put(
    "/{name}/aliases/{alias}",
    summary="Point an alias (production, staging, ...) at a version, once its model is warm",
)
async def move_alias(
    name: ModelName, alias: AliasName, body: AliasMove, session: SessionDep, tenant: TenantDep
) -> AliasOut:
    return await _warm_then_move(session, tenant, name, alias, body.version)


@router.post("/{name}/aliases/{alias}/rollback", summary="Move an alias back to the version it pointed at before")
async def rollback_alias(name: ModelName, alias: AliasName, session: SessionDep, tenant: TenantDep) -> AliasOut:
    number = registry.rollback_target(session, tenant, name, alias)
    return await _warm_then_move(session, tenant, name, alias, number)


@router.delete("/{name}/aliases/{alias}", summary="Remove an alias", status_code=204)
def delete_alias(name: ModelName, alias: AliasName, session: SessionDep, tenant: TenantDep) -> Response:
    registry.delete_alias(session, tenant, name, alias)
    return Response(status_code=204)


# -- named clusters ---------------------------------------------------------------------------------


@router.get("/{ref}/clusters", summary="The served clusters of name or name@alias, with names and merges")
def clusters_by_reference(ref: ModelRef, session: SessionDep, tenant: TenantDep) -> VersionClustersOut:
    return clusters_out(session, registry.resolve(session, tenant, ref))


@router.get("/{name}/versions/{version}/clusters", summary="A version's served clusters, with names and merges")
def version_clusters(
    name: ModelName, version: VersionNumber, session: SessionDep, tenant: TenantDep
) -> VersionClustersOut:
    return clusters_out(session, registry.resolve(session, tenant, f"{name}/versions/{version}"))


@router.patch(
    "/{name}/versions/{version}/clusters/{cluster}",
    summary="Name or describe a cluster of a version (answers carry it from the next request on)",
)
def patch_cluster(
    name: ModelName,
    version: VersionNumber,
    cluster: ClusterIndex,
    body: ClusterPatch,
    session: SessionDep,
    tenant: TenantDep,
) -> NamedClusterOut:
    changes = {f: getattr(body, f) for f in body.model_fields_set}
    registry.name_cluster(session, tenant, name, version, cluster, changes)
    table = registry.cluster_table(session, registry.resolve(session, tenant, f"{name}/versions/{version}"))
    return NamedClusterOut(**next(c for c in table if c["cluster"] == cluster))


@router.post(
    "/{name}/versions/{version}/clusters/merge",
    summary="Serve several clusters as one (a mapping of the version, no retraining)",
)
def merge_clusters(
    name: ModelName, version: VersionNumber, body: ClusterMerge, session: SessionDep, tenant: TenantDep
) -> VersionClustersOut:
    registry.merge_clusters(session, tenant, name, version, body.clusters, body.name)
    return clusters_out(session, registry.resolve(session, tenant, f"{name}/versions/{version}"))


@router.post(
    "/{name}/versions/{version}/clusters/{cluster}/unmerge",
    summary="Serve a merged cluster on its own again (a group's lowest cluster: dissolve the group)",
)
def unmerge_cluster(
    name: ModelName, version: VersionNumber, cluster: ClusterIndex, session: SessionDep, tenant: TenantDep
) -> VersionClustersOut:
    registry.unmerge_cluster(session, tenant, name, version, cluster)
    return clusters_out(session, registry.resolve(session, tenant, f"{name}/versions/{version}"))
