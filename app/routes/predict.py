"""POST /v1/runs/{run_id}/predict: cluster probabilities for new images, dynamically batched.

Send images as multipart `files` (one or many) or as JSON `{"images": ["<base64>", ...]}`. Each
image is decoded and converted to the run's size and channel count by the ingest rule, queued in
the run's dynamic batcher (`predict_max_batch_size`, `predict_max_delay_ms`) together with the
images of concurrent requests, and run through the model in a worker thread.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response

from app.deps import SessionDep, TenantDep
from app.request_bodies import check_count, decode_base64_images, max_images, read_json_body, read_upload_form
from app.schemas.common import ERRORS, ErrorBody
from app.services import runs as run_service
from app.serving.model_cache import served_run
from app.serving.predict import predict_images

router = APIRouter(tags=["serving"])

_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "properties": {
                        "images": {
                            "type": "array",
                            "items": {"type": "string", "format": "byte"},
                            "description": "base64-encoded image files (PNG, JPEG, ...)",
                        }
                    },
                }
            },
        },
    }
}


async def read_request_images(request: Request) -> list[tuple[str, bytes]]:
    limit = max_images()
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        named, _fields = await read_upload_form(request, limit)
    elif ctype.startswith("application/json"):
        body = await read_json_body(request)
        if not isinstance(body, dict) or "images" not in body:
            raise HTTPException(422, 'JSON body must be {"images": ["<base64>", ...]}')
        named = decode_base64_images(body["images"])
    else:
        raise HTTPException(
            415, 'send images as multipart/form-data `files` or application/json {"images": [base64, ...]}'
        )
    check_count(len(named), limit)
    return named


@router.post(
    "/v1/runs/{run_id}/predict",
    openapi_extra=_BODY_DOC,
    summary="Cluster of each image, its confidence and the top-k clusters",
    responses={
        **ERRORS,
        200: {"content": {"application/json": {"schema": {"type": "object"}}}},
        400: {"model": ErrorBody, "description": "malformed JSON or multipart body"},
        413: {
            "model": ErrorBody,
            "description": "more images than SCAN_MAX_PREDICT_IMAGES, or a body over SCAN_MAX_SERVING_BODY_BYTES",
        },
        415: {"model": ErrorBody, "description": "neither multipart nor JSON"},
    },
)
async def predict(
    run_id: str,
    request: Request,
    session: SessionDep,
    tenant: TenantDep,
    k: Annotated[
        int,
        Query(ge=1, le=1000, description="how many clusters to list per image; capped at the run's number of clusters"),
    ] = 5,
) -> Response:
    run = run_service.get(session, tenant, run_id)
    run_dir = run_service.servable_run_dir(run)
    session.close()  # nothing more to read; do not hold a connection while the model runs
    named = await read_request_images(request)
    served = await served_run(run_dir)
    return Response(await predict_images(served, named, k, run_id), media_type="application/json")
