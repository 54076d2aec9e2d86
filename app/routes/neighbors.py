"""POST /v1/runs/{run_id}/neighbors: nearest dataset items in the run's faiss index.

The query is dataset item indices, raw vectors in the index's space, or uploaded images (embedded
with the run's pretext model). Several queries are averaged into one (`combine="mean"`, FiftyOne's
default aggregation) or answered one by one (`combine="separate"`). The index is the one built at
mining time (`index.faiss`: exact below a size threshold, IVF above), loaded once per process.

JSON:      {"k": 10, "query": {"items": [3, 17]} | {"vectors": [[...], ...]}, "combine": "mean"}
multipart: files=<image>..., k=10, combine=separate
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.concurrency import run_in_threadpool

from app.deps import SessionDep, TenantDep
from app.error_handlers import describe
from app.request_bodies import check_count, max_images, read_limited_body, read_upload_form
from app.schemas.common import ERRORS, MAX_INT, ErrorBody
from app.schemas.predict import NeighborsAnswer
from app.services import runs as run_service
from app.serving.model_cache import served_run
from app.serving.neighbors import find_neighbors
from ml.limits import MAX_K

router = APIRouter(tags=["serving"])
# Schema bounds (SCAN_NEIGHBORS_MAX_QUERIES below them is the operator's real cap).
SCHEMA_MAX_QUERIES = 100_000
SCHEMA_MAX_DIM = 8_192


def max_k() -> int:
    from app.core.settings import get_settings

    return min(int(get_settings().neighbors_max_k), MAX_K)


class NeighborQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Bounds in the schema; the checks themselves answer with the dataset's real range.
    items: list[Annotated[int, Field(json_schema_extra={"minimum": 0, "maximum": MAX_INT})]] | None = Field(
        None,
        min_length=1,
        max_length=SCHEMA_MAX_QUERIES,
        description="dataset item indices (at most SCAN_NEIGHBORS_MAX_QUERIES)",
    )
    vectors: list[Annotated[list[float], Field(min_length=1, max_length=SCHEMA_MAX_DIM)]] | None = Field(
        None,
        min_length=1,
        max_length=SCHEMA_MAX_QUERIES,
        description="vectors in the index's space (any norm; at most SCAN_NEIGHBORS_MAX_QUERIES)",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> NeighborQuery:
        if (self.items is None) == (self.vectors is None):
            raise ValueError("give exactly one of `items` or `vectors` (or upload images as multipart `files`)")
        return self


class NeighborsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int = Field(
        10,
        ge=1,
        json_schema_extra={"maximum": MAX_K},
        description="neighbours per query; at most `neighbors_max_k` (<= 2048)",
    )
    query: NeighborQuery
    combine: Literal["mean", "separate"] = "mean"


_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/NeighborsRequest"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "k": {"type": "integer", "minimum": 1, "maximum": MAX_K},
                        "combine": {"type": "string", "enum": ["mean", "separate"]},
                    },
                }
            },
        },
    }
}


def _check_k(k: int) -> int:
    limit = max_k()
    if k > limit:
        raise HTTPException(422, f"k={k} is over the maximum of {limit} neighbours per query")
    return k


async def parse_request(
    request: Request,
) -> tuple[int, str, list[int] | None, list[list[float]] | None, list[tuple[str, bytes]] | None]:
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        limit = max_images()
        named, fields = await read_upload_form(request, limit)
        check_count(len(named), limit)
        unknown = set(fields) - {"k", "combine"}
        if unknown:
            raise HTTPException(422, f"unexpected form fields {sorted(unknown)}; use k, combine and files")
        try:
            k = int(fields.get("k", "10")[:12])  # a 10,000-digit k is not worth parsing
        except ValueError:
            raise HTTPException(422, f"k must be an integer, got {fields['k']!r}") from None
        if k < 1:
            raise HTTPException(422, f"k must be at least 1, got {k}")
        combine = fields.get("combine", "mean")
        if combine not in ("mean", "separate"):
            raise HTTPException(422, f"combine must be 'mean' or 'separate', got {combine!r}")
        return _check_k(k), combine, None, None, named
    if not ctype.startswith("application/json"):
        raise HTTPException(415, "send JSON {k, query: {items|vectors}, combine} or multipart `files`")
    raw = await read_limited_body(request)
    body = await run_in_threadpool(_validate_json, raw)  # 64 MB of JSON is CPU work: off the loop
    return _check_k(body.k), body.combine, body.query.items, body.query.vectors, None


def _validate_json(raw: bytes) -> NeighborsRequest:
    try:
        return NeighborsRequest.model_validate_json(raw)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            raise HTTPException(400, "the body is not valid JSON") from exc
        raise HTTPException(422, "invalid request: " + describe(exc.errors())) from exc


@router.post(
    "/v1/runs/{run_id}/neighbors",
    openapi_extra=_BODY_DOC,
    summary="Nearest dataset items to items, vectors or uploaded images",
    responses={
        **ERRORS,
        200: {"model": NeighborsAnswer, "description": "one list per query (combine=separate), else one"},
        400: {"model": ErrorBody, "description": "malformed JSON or multipart body"},
        413: {
            "model": ErrorBody,
            "description": "body over SCAN_MAX_SERVING_BODY_BYTES, or more images than SCAN_MAX_PREDICT_IMAGES",
        },
        415: {"model": ErrorBody, "description": "neither JSON nor multipart"},
    },
)
async def neighbors(run_id: str, request: Request, session: SessionDep, tenant: TenantDep) -> Response:
    run = run_service.get(session, tenant, run_id)
    run_dir = run_service.servable_run_dir(run)
    session.close()
    k, combine, items, vectors, named = await parse_request(request)
    served = await served_run(run_dir)
    body = await find_neighbors(served, k, combine, items=items, vectors=vectors, named=named, run_id=run_id)
    return Response(body, media_type="application/json")
