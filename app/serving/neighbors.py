"""Nearest dataset items for a /neighbors query: items, raw vectors or images, combined or not.

Several queries are averaged into one (``combine="mean"``, FiftyOne's default aggregation) or
answered one by one (``combine="separate"``); every query is L2-normalised first so each weighs the
same whatever its norm.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from app.core.errors import Invalid
from app.core.settings import get_settings
from app.serving.images import to_model_input
from app.serving.model_cache import ServedRun


def check_size(n_queries: int, k: int, combine: str) -> None:
    """Before any work: a 30 KB request once asked for 10,000 x 1,024 neighbours (539 MB of JSON)."""
    settings = get_settings()
    if n_queries > settings.neighbors_max_queries:
        raise Invalid(
            f"query: {n_queries} queries in one request; at most "
            f"{settings.neighbors_max_queries} (SCAN_NEIGHBORS_MAX_QUERIES)"
        )
    lists = n_queries if combine == "separate" else 1
    if lists * k > settings.neighbors_max_results:
        raise Invalid(
            f"k: {lists} queries x k={k} = {lists * k} neighbours; at most "
            f"{settings.neighbors_max_results} per request (SCAN_NEIGHBORS_MAX_RESULTS): "
            "lower k or send fewer queries"
        )


async def find_neighbors(
    served: ServedRun,
    k: int,
    combine: str,
    *,
    items: list[int] | None,
    vectors: list[list[float]] | None,
    named: list[tuple[str, bytes]] | None,
    run_id: str,
    resolved=None,
) -> bytes:
    """The answer as JSON bytes (served through a model version, ``resolved`` (registry.ResolvedModel):
    with its merged cluster numbers and names). Decoding, embedding, the faiss search and the JSON of the answer
    all run in one worker thread: the event loop keeps answering /livez and other requests."""
    check_size(len(items or vectors or named or ()), k, combine)
    return await run_in_threadpool(_find, served, k, combine, items, vectors, named, run_id, resolved)


def _find(
    served: ServedRun,
    k: int,
    combine: str,
    items: list[int] | None,
    vectors: list[list[float]] | None,
    named: list[tuple[str, bytes]] | None,
    run_id: str,
    resolved=None,
) -> bytes:
    features = served.features
    n_items, dim = features.shape

    if items is not None:
        bad = [i for i in items if not 0 <= i < n_items]
        if bad:
            raise Invalid(f"item index {bad[0]} is out of range: the dataset has {n_items} items (0..{n_items - 1})")
        queries = np.asarray(features[np.asarray(items)], dtype=np.float32)
    elif vectors is not None:
        wrong = next((i for i, v in enumerate(vectors) if len(v) != dim), None)
        if wrong is not None:
            raise Invalid(
                f"vectors[{wrong}] has dimension {len(vectors[wrong])}; this run's "
                f"index holds {dim}-dimensional vectors"
            )
        queries = np.asarray(vectors, dtype=np.float32)
        if not np.isfinite(queries).all():
            raise Invalid("vectors contain NaN or infinite values")
    else:
        p = served.predictor
        queries = p.embed(to_model_input(named, p.image_size, p.channels))

    queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    if not np.any(queries):
        raise Invalid("query vectors are all zero")
    if combine == "mean":
        queries = queries.mean(axis=0, keepdims=True)
    k_eff = min(k, n_items)
    scores, ids = served.search(queries, k_eff)

    cluster = served.assignments["cluster"]
    names = None
    if resolved is not None:
        cluster, names = resolved.clusters.apply(cluster), resolved.clusters.names
    results = []
    for q in range(len(queries)):
        hits = [(int(i), float(s)) for i, s in zip(ids[q], scores[q]) if i >= 0]
        own = _own_item(items, combine, q)
        if own is not None:
            hits = _self_first(hits, own)
        results.append(
            {
                "query": _describe_query(items, vectors, named, combine, q),
                "neighbors": [_neighbor(i, s, int(cluster[i]), names) for i, s in hits],
            }
        )
    head = resolved.describe() if resolved is not None else {"run_id": run_id}
    return json.dumps({**head, "k": k_eff, "combine": combine, "results": results}).encode()


def _neighbor(item: int, score: float, cluster: int, names) -> dict[str, Any]:
    if names is None:
        return {"item": item, "score": score, "cluster": cluster}
    return {"item": item, "score": score, "cluster": cluster, "name": names[cluster]}


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
                hits = [hits[pos]] + hits[:pos] + hits[pos + 1 :]
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
