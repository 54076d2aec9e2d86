"""/v2: the Open Inference Protocol (KServe v2 / Triton HTTP) over the same models as /predict.

    GET  /v2                          server metadata (no key)
    GET  /v2/health/live|ready        liveness, readiness (no key)
    GET  /v2/models/{name}            model metadata: inputs and outputs with datatypes and shapes
    GET  /v2/models/{name}/ready      200 once the model is loaded (loads it: a warm-up call)
    POST /v2/models/{name}/infer      tensors in, PROBABILITIES and CLUSTER out (JSON or binary)

`{name}` is one of the tenant's SUCCEEDED run ids. The key goes in `Authorization: Bearer <key>`,
as everywhere (tritonclient: `headers={"Authorization": "Bearer ..."}`). Tensors, datatypes and the
binary extension: app/serving/open_inference.py. Errors carry the message as `detail` (this API's
rule) and as `error` (the protocol's, which Triton clients read).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import text

from app.core.db import get_engine
from app.core.errors import UnsupportedMediaType
from app.deps import TenantDep
from app.tables import Tenant
from app.request_bodies import max_images, read_limited_body
from app.schemas.common import ERRORS, ErrorBody
from app.services import runs as run_service
from app.serving import open_inference as oip
from app.serving.model_cache import ServedRun, served_run
from app.serving.predict import probabilities

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


async def _model(tenant: Tenant, name: str) -> ServedRun:
    """The served model behind `name` (the owner check and SUCCEEDED; cached like /predict)."""
    run_dir: Path = run_service.cached_servable_dir(tenant, name) or await run_in_threadpool(
        run_service.servable_dir, tenant, name
    )
    return await served_run(run_dir)


@router.get("/v2/models/{name}", responses=ERRORS, summary="Model metadata: inputs and outputs")
async def model_metadata(name: str, tenant: TenantDep) -> dict[str, Any]:
    served = await _model(tenant, name)
    p = served.predictor
    return oip.model_metadata(name, p.channels, p.image_size, served.num_clusters)


@router.get("/v2/models/{name}/ready", responses=ERRORS, summary="Model readiness (loads the model)")
async def model_ready(name: str, tenant: TenantDep) -> dict[str, Any]:
    await _model(tenant, name)
    return {"name": name, "ready": True}


@router.post(
    "/v2/models/{name}/infer",
    openapi_extra=_INFER_DOC,
    summary="Inference: IMAGE (UINT8 NCHW) or IMAGE_BYTES in; PROBABILITIES (FP32), CLUSTER (INT64) out",
    responses={
        **ERRORS,
        200: {
            "description": "JSON, or (binary outputs asked for) JSON header + raw tensors",
            "content": {"application/json": {"schema": {"type": "object"}}, "application/octet-stream": {}},
        },
        413: {"model": ErrorBody, "description": "more images than SCAN_MAX_PREDICT_IMAGES, or the body too large"},
        415: {"model": ErrorBody, "description": "a compressed body (Content-Encoding)"},
    },
)
async def infer(
    name: str,
    request: Request,
    tenant: TenantDep,
    inference_header_content_length: Annotated[
        str | None,
        Header(description="binary-tensor extension: length of the JSON header at the start of the body"),
    ] = None,
) -> Response:
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not accepted; send the body uncompressed")
    served = await _model(tenant, name)
    body = await read_limited_body(request)
    p = served.predictor
    req = oip.parse_request(body, inference_header_content_length, p.channels, p.image_size, max_images())
    probs = await probabilities(served, req.named, req.tensor)
    payload, header_length = oip.build_response(name, req, probs)
    if header_length is None:
        return Response(payload, media_type="application/json")
    return Response(
        payload,
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(header_length)},
    )
