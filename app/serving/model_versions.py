"""Serving a model version: warmed before an alias points at it, and answering with the version's
cluster names and merges (app/services/registry.py holds them; the run's model is unchanged).

    served = await run_in_threadpool(warm, run_dir)   # before the alias moves
    body = await predict_version(served, named, k, resolved)
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from app.core.errors import Conflict
from app.services import registry
from app.services import runs as run_service
from app.serving.images import to_model_input
from app.serving.model_cache import ServedRun, model_cache
from app.tables import utcnow

log = logging.getLogger(__name__)


# How long after an alias moved a process may still answer with the previous version while it
# loads the new one (the process that moved the alias loaded it first; the others had no warning).
SWAP_GRACE_S = 300
_warming: set[str] = set()
_warming_lock = threading.Lock()


def choose_warm(session, resolved: registry.ResolvedModel) -> tuple[registry.ResolvedModel, Path]:
    """(resolved, run_dir) to serve: the version the reference points at, unless this API process
    has not loaded it yet, the alias moved in the last SWAP_GRACE_S seconds and the version it
    pointed at before is loaded here: then that one answers (and says so) while the new one loads
    in the background. So with several API processes no request waits for a cold model either."""
    run_dir = run_service.servable_run_dir(resolved.run)
    cache = model_cache()
    if cache.peek(run_dir) is not None or resolved.previous_version_id is None or resolved.moved_at is None:
        return resolved, run_dir
    if (utcnow() - resolved.moved_at).total_seconds() > SWAP_GRACE_S:
        return resolved, run_dir
    before = registry.previous(session, resolved)
    if before is None or before.run.state != resolved.run.state:
        return resolved, run_dir
    before_dir = run_service.servable_run_dir(before.run)
    if cache.peek(before_dir) is None:
        return resolved, run_dir
    _warm_in_background(run_dir)
    return before, before_dir


def _warm_in_background(run_dir: Path) -> None:
    key = str(run_dir)
    with _warming_lock:
        if key in _warming:
            return
        _warming.add(key)

    def load() -> None:
        try:
            warm(run_dir)
        except Exception:
            log.exception("warming %s failed; its first request will load it", run_dir)
        finally:
            with _warming_lock:
                _warming.discard(key)

    threading.Thread(target=load, name="warm-model", daemon=True).start()


def warm(run_dir: Path) -> ServedRun:
    """Load the run into this process's model cache and push one image through the model, so the
    first request after an alias move finds weights loaded and kernels chosen. Blocking."""
    served = model_cache().get(run_dir)
    p = served.predictor
    p.predict(np.zeros((1, p.channels, p.image_size, p.image_size), dtype=np.uint8))
    return served


async def predict_version(
    served: ServedRun, named: list[tuple[str, bytes]], k: int, resolved: registry.ResolvedModel
) -> bytes:
    """/v1/models/{ref}/predict: like /v1/runs/{id}/predict, over the version's served clusters
    (a merged group's probability is the sum of its members') with their names."""
    p = served.predictor
    if len(resolved.clusters.target) != p.num_clusters:
        raise Conflict(
            f"{resolved.model} version {resolved.version} names {len(resolved.clusters.target)} clusters "
            f"but its run's model has {p.num_clusters}"
        )
    images = await run_in_threadpool(to_model_input, named, p.image_size, p.channels)
    probs = await served.batcher.submit(images)
    return await run_in_threadpool(_answer, named, probs, k, resolved)


def _answer(named: list[tuple[str, bytes]], probs: np.ndarray, k: int, resolved) -> bytes:
    return json.dumps(
        {**resolved.describe(), "predictions": named_predictions(named, probs, k, resolved.clusters)}
    ).encode()


def named_predictions(named: list[tuple[str, bytes]], probs: np.ndarray, k: int, clusters) -> list[dict[str, Any]]:
    """Per image: its served cluster, that cluster's name, the confidence, and the top-k served
    clusters. ``clusters`` is a registry.ClusterMap."""
    grouped, served = clusters.merge_probs(probs)
    k = min(k, grouped.shape[1])
    top = np.argsort(-grouped, axis=1, kind="stable")[:, :k]
    out = []
    for (name, _), row, order in zip(named, grouped, top):
        best = served[int(order[0])]
        out.append(
            {
                "file": name,
                "cluster": best,
                "name": clusters.name_of(best),
                "confidence": float(row[order[0]]),
                "top_k": [
                    {"cluster": served[int(j)], "name": clusters.name_of(served[int(j)]), "probability": float(row[j])}
                    for j in order
                ],
            }
        )
    return out


def version_assignments(
    served: ServedRun, clusters, *, cluster: int | None, min_confidence: float | None, page: int, page_size: int
) -> tuple[list[dict[str, Any]], int]:
    """The training images' served cluster, its name and confidence, as /predict would answer for
    them (a merged group's probability is the sum of its members'), filtered and paged. Blocking."""
    probs = served.assignments["probs"]
    if clusters.merged:
        grouped, ids = clusters.merge_probs(np.asarray(probs, dtype=np.float32))
        best = np.argmax(grouped, axis=1)
        assigned = np.asarray(ids, dtype=np.int64)[best]
        confidence = grouped[np.arange(len(best)), best]
    else:
        assigned = np.asarray(served.assignments["cluster"], dtype=np.int64)
        confidence = np.asarray(served.assignments["confidence"], dtype=np.float64)
    keep = np.ones(len(assigned), dtype=bool)
    if cluster is not None:
        keep &= assigned == cluster
    if min_confidence is not None:
        keep &= confidence >= min_confidence
    items = np.flatnonzero(keep)
    chosen = items[(page - 1) * page_size : page * page_size]
    rows = [
        {
            "item_index": int(i),
            "cluster": int(assigned[i]),
            "name": clusters.name_of(int(assigned[i])),
            "confidence": float(confidence[i]),
        }
        for i in chosen
    ]
    return rows, len(items)
