"""POST /v1/runs/{run_id}/neighbors: nearest dataset items in the run's faiss index.

The query is dataset item indices, raw vectors in the index's space, or uploaded images (embedded
with the run's pretext model). Several queries are averaged into one (`combine="mean"`, FiftyOne's
default aggregation) or answered one by one (`combine="separate"`). The index is the one built at
mining time (`index.faiss`: exact below a size threshold, IVF above), loaded once per process.

JSON:      {"k": 10, "query": {"items": [3, 17]} | {"vectors": [[...], ...]}, "combine": "mean"}
multipart: files=<image>..., k=10, combine=separate
"""
from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.deps import SessionDep, TenantDep
from app.error_handlers import describe
from app.serving.images import check_count, max_images, read_json_body, read_upload_form
from app.serving.model_cache import served_run
from app.serving.neighbors import find_neighbors
from app.services import runs as run_service
from ml.limits import MAX_K

router = APIRouter(tags=["serving"])

def max_k() -> int:
    from app.core.settings import get_settings
    return min(int(get_settings().neighbors_max_k), MAX_K)


class NeighborQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[int] | None = Field(None, min_length=1, description="dataset item indices")
    vectors: list[list[float]] | None = Field(None, min_length=1,
                                             description="vectors in the index's space (any norm)")

    @model_validator(mode="after")
    def _one_kind(self) -> "NeighborQuery":
        if (self.items is None) == (self.vectors is None):
            raise ValueError("give exactly one of `items` or `vectors` (or upload images as multipart `files`)")
        return self


class NeighborsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int = Field(10, ge=1, description="neighbours per query; at most `neighbors_max_k` (<= 2048)")
    query: NeighborQuery
    combine: Literal["mean", "separate"] = "mean"


_BODY_DOC = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": NeighborsRequest.model_json_schema(ref_template="#/components/schemas/{model}")},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "k": {"type": "integer"}, "combine": {"type": "string", "enum": ["mean", "separate"]}}}}}}}


def _check_k(k: int) -> int:
    limit = max_k()
    if k > limit:
        raise HTTPException(422, f"k={k} is over the maximum of {limit} neighbours per query")
    return k


async def _parse(request: Request) -> tuple[int, str, list[int] | None, list[list[float]] | None,
                                            list[tuple[str, bytes]] | None]:
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        limit = max_images()
        named, fields = await read_upload_form(request, limit)
        check_count(len(named), limit)
        unknown = set(fields) - {"k", "combine"}
        if unknown:
            raise HTTPException(422, f"unexpected form fields {sorted(unknown)}; use k, combine and files")
        try:
            k = int(fields.get("k", 10))
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
    try:
        body = NeighborsRequest.model_validate(await read_json_body(request))
    except ValidationError as exc:
        raise HTTPException(422, "invalid request: " + describe(exc.errors())) from exc
    return _check_k(body.k), body.combine, body.query.items, body.query.vectors, None


@router.post("/v1/runs/{run_id}/neighbors", openapi_extra=_BODY_DOC,
             summary="Nearest dataset items to items, vectors or uploaded images")
async def neighbors(run_id: str, request: Request, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    run = run_service.get(session, tenant, run_id)
    run_dir = run_service.servable_run_dir(run)
    session.close()
    k, combine, items, vectors, named = await _parse(request)
    served = await served_run(run_dir)
    return await find_neighbors(served, k, combine, items=items, vectors=vectors, named=named, run_id=run_id)
