"""Serving through a model name: predict, neighbours and the export of `name`, `name@alias` or
`name/versions/N`, resolved at request time (app/services/registry.py::resolve). The bodies are
those of /v1/runs/{id}/predict and /neighbors; the answers name the model, version and alias, and
carry the version's cluster names and merges.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from app.deps import SessionDep, SettingsDep, TenantDep
from app.routes.neighbors import _BODY_DOC as NEIGHBORS_BODY
from app.routes.neighbors import parse_request as parse_neighbors
from app.routes.predict import _BODY_DOC as PREDICT_BODY
from app.routes.predict import read_request_images
from app.routes.registry import ModelName, ModelRef, VersionNumber
from app.schemas.common import ERRORS, MAX_INT, ErrorBody
from app.schemas.predict import ModelPredictAnswer, NeighborsAnswer
from app.schemas.registry import NamedAssignmentPage
from app.services import registry
from app.services import runs as run_service
from app.serving.model_cache import served_run
from app.serving.model_versions import choose_warm, predict_version, version_assignments
from app.serving.neighbors import find_neighbors

router = APIRouter(prefix="/v1/models", tags=["serving"])

_SERVING_ERRORS = {
    **ERRORS,
    400: {"model": ErrorBody, "description": "malformed JSON or multipart body"},
    413: {
        "model": ErrorBody,
        "description": "body over SCAN_MAX_SERVING_BODY_BYTES, or more images than SCAN_MAX_PREDICT_IMAGES",
    },
    415: {"model": ErrorBody, "description": "neither JSON nor multipart"},
}
_PREDICT_RESPONSES = {
    **_SERVING_ERRORS,
    200: {"model": ModelPredictAnswer, "description": "one prediction per image, in the order sent, with names"},
}
_NEIGHBORS_RESPONSES = {**_SERVING_ERRORS, 200: {"model": NeighborsAnswer, "description": "one list per query"}}
TopK = Annotated[
    int, Query(ge=1, le=1000, description="how many clusters to list per image; capped at the served clusters")
]
Format = Annotated[
    Literal["onnx", "torchscript"], Query(description="onnx (onnxruntime, TensorRT, ...) or torchscript")
]


async def _predict(reference: str, request: Request, session, tenant, k: int) -> Response:
    resolved, run_dir = choose_warm(session, registry.resolve(session, tenant, reference))
    session.close()  # nothing more to read; do not hold a connection while the model runs
    named = await read_request_images(request)
    served = await served_run(run_dir)
    return Response(await predict_version(served, named, k, resolved), media_type="application/json")


@router.post(
    "/{ref}/predict",
    openapi_extra=PREDICT_BODY,
    summary="Predict with the version a model name or alias points at now",
    responses=_PREDICT_RESPONSES,
)
async def predict_model(ref: ModelRef, request: Request, session: SessionDep, tenant: TenantDep, k: TopK = 5):
    return await _predict(ref, request, session, tenant, k)


@router.post(
    "/{name}/versions/{version}/predict",
    openapi_extra=PREDICT_BODY,
    summary="Predict with one version of a model",
    responses=_PREDICT_RESPONSES,
)
async def predict_model_version(
    name: ModelName, version: VersionNumber, request: Request, session: SessionDep, tenant: TenantDep, k: TopK = 5
):
    return await _predict(f"{name}/versions/{version}", request, session, tenant, k)


async def _neighbors(reference: str, request: Request, session, tenant) -> Response:
    resolved, run_dir = choose_warm(session, registry.resolve(session, tenant, reference))
    session.close()
    k, combine, items, vectors, named = await parse_neighbors(request)
    served = await served_run(run_dir)
    body = await find_neighbors(
        served, k, combine, items=items, vectors=vectors, named=named, run_id=resolved.run.id, resolved=resolved
    )
    return Response(body, media_type="application/json")


@router.post(
    "/{ref}/neighbors",
    openapi_extra=NEIGHBORS_BODY,
    summary="Nearest training items, in the version a model name or alias points at now",
    responses=_NEIGHBORS_RESPONSES,
)
async def model_neighbors(ref: ModelRef, request: Request, session: SessionDep, tenant: TenantDep):
    return await _neighbors(ref, request, session, tenant)


@router.post(
    "/{name}/versions/{version}/neighbors",
    openapi_extra=NEIGHBORS_BODY,
    summary="Nearest training items, in one version of a model",
    responses=_NEIGHBORS_RESPONSES,
)
async def model_version_neighbors(
    name: ModelName, version: VersionNumber, request: Request, session: SessionDep, tenant: TenantDep
):
    return await _neighbors(f"{name}/versions/{version}", request, session, tenant)


async def _export(reference: str, session, tenant, fmt: str) -> FileResponse:
    from ml.export import export_archive

    resolved = registry.resolve(session, tenant, reference)
    run_dir = run_service.servable_run_dir(resolved.run)
    session.close()
    archive = await run_in_threadpool(export_archive, run_dir, fmt)  # cached per run and format
    path = await run_in_threadpool(_with_cluster_names, archive, resolved)
    filename = f"{resolved.model}-v{resolved.version}-{fmt}.zip"
    return FileResponse(
        path, media_type="application/zip", filename=filename, background=BackgroundTask(os.unlink, path)
    )


def _with_cluster_names(archive, resolved: registry.ResolvedModel) -> str:
    """The run's archive plus `clusters.json`: the model, version and, per output of the model, the
    cluster it is served as and that cluster's name (names change without a new export)."""
    from app.core.settings import get_settings

    spec = {**resolved.describe(), "clusters": resolved.clusters.as_json()}
    fd, path = tempfile.mkstemp(prefix="model-export-", suffix=".zip", dir=get_settings().var_dir)
    with os.fdopen(fd, "wb") as f, zipfile.ZipFile(archive) as src, zipfile.ZipFile(f, "w") as dst:
        for info in src.infolist():
            with src.open(info) as member, dst.open(info, "w") as out:
                while chunk := member.read(1 << 20):
                    out.write(chunk)
        dst.writestr("clusters.json", json.dumps(spec, indent=1))
    return path


_EXPORT_DOC = {200: {"content": {"application/zip": {}}}}


@router.get(
    "/{ref}/model",
    response_class=FileResponse,
    summary="Download the model a name or alias points at (ONNX or TorchScript) with its cluster names",
    responses={**ERRORS, **_EXPORT_DOC},
)
async def download_model_by_reference(ref: ModelRef, session: SessionDep, tenant: TenantDep, format: Format = "onnx"):
    return await _export(ref, session, tenant, format)


@router.get(
    "/{name}/versions/{version}/model",
    response_class=FileResponse,
    summary="Download one version of a model (ONNX or TorchScript) with its cluster names",
    responses={**ERRORS, **_EXPORT_DOC},
)
async def download_model_version(
    name: ModelName, version: VersionNumber, session: SessionDep, tenant: TenantDep, format: Format = "onnx"
):
    return await _export(f"{name}/versions/{version}", session, tenant, format)


async def _assignments(reference: str, session, tenant, settings, cluster, min_confidence, page, page_size):
    resolved = registry.resolve(session, tenant, reference)
    run_dir = run_service.servable_run_dir(resolved.run)
    session.close()
    page_size = min(page_size or settings.default_page_size, settings.max_page_size)
    served = await served_run(run_dir)
    rows, total = await run_in_threadpool(
        lambda: version_assignments(
            served,
            resolved.clusters,
            cluster=cluster,
            min_confidence=min_confidence,
            page=page,
            page_size=page_size,
        )
    )
    return NamedAssignmentPage(**resolved.describe(), items=rows, total=total, page=page, page_size=page_size)


ServedCluster = Annotated[
    int | None, Query(ge=0, le=MAX_INT, description="a served cluster (a merged group: its number)")
]
MinConfidence = Annotated[float | None, Query(ge=0, le=1)]
PageNumber = Annotated[int, Query(ge=1, le=MAX_INT)]
PageSize = Annotated[int | None, Query(ge=1, le=MAX_INT)]


@router.get(
    "/{ref}/assignments",
    summary="The training images' clusters as the version a name or alias points at serves them",
    responses=ERRORS,
)
async def model_assignments(
    ref: ModelRef,
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    cluster: ServedCluster = None,
    min_confidence: MinConfidence = None,
    page: PageNumber = 1,
    page_size: PageSize = None,
) -> NamedAssignmentPage:
    return await _assignments(ref, session, tenant, settings, cluster, min_confidence, page, page_size)


@router.get(
    "/{name}/versions/{version}/assignments",
    summary="The training images' clusters as one version serves them (names, merges)",
    responses=ERRORS,
)
async def model_version_assignments(
    name: ModelName,
    version: VersionNumber,
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    cluster: ServedCluster = None,
    min_confidence: MinConfidence = None,
    page: PageNumber = 1,
    page_size: PageSize = None,
) -> NamedAssignmentPage:
    return await _assignments(
        f"{name}/versions/{version}", session, tenant, settings, cluster, min_confidence, page, page_size
    )
