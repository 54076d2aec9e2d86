"""POST /v1/runs/{run_id}/predict: cluster probabilities for new images, dynamically batched.

Send images as multipart `files` (one or many), as JSON `{"images": ["<base64>", ...]}`, or as raw
pixels (`application/octet-stream`: uint8, N x C x H x W at the run's shape, the fast path). Each
encoded image is decoded and converted to the run's size and channel count by the ingest rule, queued in
the run's dynamic batcher (`predict_max_batch_size`, `predict_max_delay_ms`) together with the
images of concurrent requests, and run through the model in a worker thread.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from app.deps import TenantDep
from app.request_bodies import (
    check_count,
    decode_base64_images,
    max_images,
    read_json_body,
    read_limited_body,
    read_upload_form,
)
from app.schemas.common import ERRORS, ErrorBody
from app.schemas.predict import PredictAnswer
from app.services import runs as run_service
from app.serving.images import tensor_input
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
            "application/octet-stream": {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": "raw uint8 pixels, N x C x H x W in row-major order at the run's size and "
                    "channels (GET /v2/models/{run_id} tells the shape); N is read from the length",
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
            415,
            'send images as multipart/form-data `files`, application/json {"images": [base64, ...]} '
            "or application/octet-stream (uint8 NCHW pixels at the run's shape)",
        )
    check_count(len(named), limit)
    return named


@router.post(
    "/v1/runs/{run_id}/predict",
    openapi_extra=_BODY_DOC,
    summary="Cluster of each image, its confidence and the top-k clusters",
    responses={
        **ERRORS,
        200: {"model": PredictAnswer, "description": "one prediction per image, in the order sent"},
        400: {"model": ErrorBody, "description": "malformed JSON or multipart body"},
        413: {
            "model": ErrorBody,
            "description": "more images than SCAN_MAX_PREDICT_IMAGES, or a body over SCAN_MAX_SERVING_BODY_BYTES",
        },
        415: {"model": ErrorBody, "description": "neither multipart, JSON nor octet-stream"},
    },
)
async def predict(
    run_id: str,
    request: Request,
    tenant: TenantDep,
    k: Annotated[
        int,
        Query(ge=1, le=1000, description="how many clusters to list per image; capped at the run's number of clusters"),
    ] = 5,
) -> Response:
    # A run found servable lately is not looked up again: no database round trip, no thread hop.
    run_dir = run_service.cached_servable_dir(tenant, run_id) or await run_in_threadpool(
        run_service.servable_dir, tenant, run_id
    )
    if request.headers.get("content-type", "").startswith("application/octet-stream"):
        body = await read_limited_body(request)
        served = await served_run(run_dir)
        p = served.predictor
        tensor = tensor_input(body, p.image_size, p.channels)
        check_count(len(tensor), max_images())
        named = [(f"tensor[{i}]", b"") for i in range(len(tensor))]
        return Response(await predict_images(served, named, k, run_id, tensor), media_type="application/json")
    named = await read_request_images(request)
    served = await served_run(run_dir)
    return Response(await predict_images(served, named, k, run_id), media_type="application/json")
