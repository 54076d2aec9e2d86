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

import numpy as np
from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.concurrency import run_in_threadpool

from app.deps import SessionDep, TenantDep
from app.errors import describe
from app.serving.images import check_count, max_images, read_json_body, read_upload_form, to_model_input
from app.serving.runs import served_run, succeeded_run_dir, tenant_run

router = APIRouter(tags=["serving"])

FAISS_MAX_K = 2048  # faiss GPU indexes answer at most k = 2048


def max_k() -> int:
    from app.core.settings import get_settings
    return min(int(get_settings().neighbors_max_k), FAISS_MAX_K)


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
    run = tenant_run(session, tenant.id, run_id)
    run_dir = succeeded_run_dir(run)
    session.close()
    k, combine, items, vectors, named = await _parse(request)
    served = await served_run(run_dir)
    features = served.features
    n_items, dim = features.shape

    if items is not None:
        bad = [i for i in items if not 0 <= i < n_items]
        if bad:
            raise HTTPException(422, f"item index {bad[0]} is out of range: the dataset has {n_items} "
                                     f"items (0..{n_items - 1})")
        queries = np.asarray(features[np.asarray(items)], dtype=np.float32)
    elif vectors is not None:
        wrong = next((i for i, v in enumerate(vectors) if len(v) != dim), None)
        if wrong is not None:
            raise HTTPException(422, f"vectors[{wrong}] has dimension {len(vectors[wrong])}; this run's "
                                     f"index holds {dim}-dimensional vectors")
        queries = np.asarray(vectors, dtype=np.float32)
        if not np.isfinite(queries).all():
            raise HTTPException(422, "vectors contain NaN or infinite values")
    else:
        p = served.predictor
        images = await run_in_threadpool(to_model_input, named, p.image_size, p.channels)
        queries = await run_in_threadpool(p.embed, images)

    # L2-normalise before averaging, so each query weighs the same whatever its norm.
    queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    if not np.any(queries):
        raise HTTPException(422, "query vectors are all zero")
    if combine == "mean":
        queries = queries.mean(axis=0, keepdims=True)
    k_eff = min(k, n_items)
    scores, ids = await run_in_threadpool(served.search, queries, k_eff)

    cluster = served.assignments["cluster"]
    results = []
    for q in range(len(queries)):
        hits = [(int(i), float(s)) for i, s in zip(ids[q], scores[q]) if i >= 0]
        own = _own_item(items, combine, q)
        if own is not None:
            hits = _self_first(hits, own)
        results.append({
            "query": _describe_query(items, vectors, named, combine, q),
            "neighbors": [{"item": i, "score": s, "cluster": int(cluster[i])} for i, s in hits],
        })
    return {"run_id": run_id, "k": k_eff, "combine": combine, "results": results}


def _own_item(items: list[int] | None, combine: str, q: int) -> int | None:
    if items is None:
        return None
    if combine == "separate":
        return items[q]
    return items[0] if len(set(items)) == 1 else None


def _self_first(hits: list[tuple[int, float]], own: int) -> list[tuple[int, float]]:
    """An item is its own best match; exact duplicates tie with it at score 1 and faiss may list a
    twin first, so the queried item is moved to the front when its score ties the best."""
    for pos, (i, s) in enumerate(hits):
        if i == own:
            if pos and s >= hits[0][1] - 1e-5:
                hits = [hits[pos]] + hits[:pos] + hits[pos + 1:]
            break
    return hits


def _describe_query(items, vectors, named, combine: str, q: int) -> dict[str, Any]:
    if combine == "mean":
        if items is not None:
            return {"items": items}
        if vectors is not None:
            return {"vectors": len(vectors)}
        return {"files": [n for n, _ in named]}
    if items is not None:
        return {"item": items[q]}
    if vectors is not None:
        return {"vector": q}
    return {"file": named[q][0]}
