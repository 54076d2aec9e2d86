"""/v2: the Open Inference Protocol (KServe v2 / Triton HTTP) over the same models as /predict.

    GET  /v2                          server metadata (no key)
    GET  /v2/health/live|ready        liveness, readiness (no key)
    GET  /v2/models/{name}            model metadata: inputs and outputs with datatypes and shapes
    GET  /v2/models/{name}/ready      200 once the model is loaded (loads it: a warm-up call)
    POST /v2/models/{name}/infer      tensors in, PROBABILITIES and CLUSTER out (JSON or binary)

`{name}` is a registered model (`name` or `name@alias`; `/v2/models/{name}/versions/{n}/...` for
a version), resolved at request time with its cluster merges, or one of the tenant's SUCCEEDED run
ids. The key goes in `Authorization: Bearer <key>`,
as everywhere (tritonclient: `headers={"Authorization": "Bearer ..."}`). Tensors, datatypes and the
binary extension: app/serving/open_inference.py. Errors carry the message as `detail` (this API's
rule) and as `error` (the protocol's, which Triton clients read).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import text

from app.core.db import get_engine
from app.core.errors import UnsupportedMediaType
from app.deps import TenantDep
from app.request_bodies import max_images, read_limited_body
from app.schemas.common import ERRORS, MAX_INT, ErrorBody
from app.serving import open_inference as oip
from app.serving.model_cache import ServedRun, served_run
from app.serving.predict import probabilities
from app.tables import Tenant

router = APIRouter(tags=["open inference protocol (v2)"])

_INFER_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "inputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name", "shape", "datatype"],
                                "properties": {
                                    "name": {"type": "string", "enum": [oip.IMAGE, oip.IMAGE_BYTES]},
                                    "shape": {"type": "array", "items": {"type": "integer"}},
                                    "datatype": {"type": "string", "enum": ["UINT8", "BYTES"]},
                                    "parameters": {"type": "object"},
                                    "data": {"type": "array", "items": {}},
                                },
                            },
                        },
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string", "enum": list(oip.OUTPUTS)},
                                    "parameters": {"type": "object"},
                                },
                            },
                        },
                        "parameters": {"type": "object"},
                    },
                }
            },
            "application/octet-stream": {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": "binary-tensor extension: a JSON header of Inference-Header-Content-Length "
                    "bytes, then the inputs' raw bytes",
                }
            },
        },
    }
}


@router.get("/v2", summary="Server metadata (Open Inference Protocol)")
async def server_metadata() -> dict[str, Any]:
    return {"name": "scan", "version": "1.0.0", "extensions": ["binary_tensor_data"]}


@router.get("/v2/health/live", summary="Liveness (Open Inference Protocol)")
async def server_live() -> dict[str, bool]:
    return {"live": True}


def _database_answers() -> None:
    with get_engine().connect() as conn:
        conn.execute(text("SELECT 1"))


@router.get(
    "/v2/health/ready",
    summary="Readiness: the database answers (models are found through it)",
    responses={503: {"model": ErrorBody, "description": "the database is unreachable"}},
)
async def server_ready() -> dict[str, bool]:
    await run_in_threadpool(_database_answers)  # unreachable: the infrastructure handler answers 503
    return {"ready": True}


async def _model(tenant: Tenant, name: str, version: int | None = None) -> tuple[ServedRun, Any | None]:
    """The served run behind `name` (and its cluster map when it is a registered model)."""
    run_dir, clusters = await run_in_threadpool(oip.locate, tenant, name, version)
    return await served_run(run_dir), clusters


Version = Annotated[int, PathParam(ge=1, le=MAX_INT, description="a registered model's version number")]


async def _metadata(tenant: Tenant, name: str, version: int | None) -> dict[str, Any]:
    served, clusters = await _model(tenant, name, version)
    p = served.predictor
    outputs = len(clusters.served) if clusters is not None else served.num_clusters
    meta = oip.model_metadata(name, p.channels, p.image_size, outputs)
    if version is not None:
        meta["versions"] = [str(version)]
    return meta


@router.get("/v2/models/{name}", responses=ERRORS, summary="Model metadata: inputs and outputs")
async def model_metadata(name: str, tenant: TenantDep) -> dict[str, Any]:
    return await _metadata(tenant, name, None)


@router.get("/v2/models/{name}/versions/{version}", responses=ERRORS, summary="Model version metadata")
async def model_version_metadata(name: str, version: Version, tenant: TenantDep) -> dict[str, Any]:
    return await _metadata(tenant, name, version)


@router.get("/v2/models/{name}/ready", responses=ERRORS, summary="Model readiness (loads the model)")
async def model_ready(name: str, tenant: TenantDep) -> dict[str, Any]:
    await _model(tenant, name)
    return {"name": name, "ready": True}


@router.get(
    "/v2/models/{name}/versions/{version}/ready", responses=ERRORS, summary="Model version readiness (loads it)"
)
async def model_version_ready(name: str, version: Version, tenant: TenantDep) -> dict[str, Any]:
    await _model(tenant, name, version)
    return {"name": name, "version": str(version), "ready": True}


_INFER = {
    "openapi_extra": _INFER_DOC,
    "responses": {
        **ERRORS,
        200: {
            "description": "JSON, or (binary outputs asked for) JSON header + raw tensors",
            "content": {"application/json": {"schema": {"type": "object"}}, "application/octet-stream": {}},
        },
        413: {"model": ErrorBody, "description": "more images than SCAN_MAX_PREDICT_IMAGES, or the body too large"},
        415: {"model": ErrorBody, "description": "a compressed body (Content-Encoding)"},
    },
}
HeaderLength = Annotated[
    str | None, Header(description="binary-tensor extension: length of the JSON header at the start of the body")
]


async def _infer(name: str, version: int | None, request: Request, tenant: Tenant, header_length: str | None):
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not accepted; send the body uncompressed")
    served, clusters = await _model(tenant, name, version)
    body = await read_limited_body(request)
    p = served.predictor
    req = oip.parse_request(body, header_length, p.channels, p.image_size, max_images())
    probs = await probabilities(served, req.named, req.tensor)
    payload, json_length = oip.build_response(name, req, probs, clusters)
    if json_length is None:
        return Response(payload, media_type="application/json")
    return Response(
        payload,
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(json_length)},
    )


@router.post(
    "/v2/models/{name}/infer",
    summary="Inference: IMAGE (UINT8 NCHW) or IMAGE_BYTES in; PROBABILITIES (FP32), CLUSTER (INT64) out",
    **_INFER,
)
async def infer(
    name: str, request: Request, tenant: TenantDep, inference_header_content_length: HeaderLength = None
) -> Response:
    return await _infer(name, None, request, tenant, inference_header_content_length)


@router.post("/v2/models/{name}/versions/{version}/infer", summary="Inference on one model version", **_INFER)
async def infer_version(
    name: str,
    version: Version,
    request: Request,
    tenant: TenantDep,
    inference_header_content_length: HeaderLength = None,
) -> Response:
    return await _infer(name, version, request, tenant, inference_header_content_length)
