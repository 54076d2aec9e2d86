"""Cluster probabilities for decoded images through the run's dynamic batcher, as /predict answers."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from app.serving.images import to_model_input
from app.serving.model_cache import ServedRun

# Up to this many images, the JSON answer is built on the event loop: a thread hop costs more.
_INLINE_ANSWER = 8


async def probabilities(served: ServedRun, named: list[tuple[str, bytes]] | None, tensor: np.ndarray | None):
    """(N, K) cluster probabilities of encoded images (`named`) or of a uint8 NCHW tensor at the
    run's shape, through the run's dynamic batcher."""
    if tensor is None:
        p = served.predictor
        tensor = await run_in_threadpool(to_model_input, named, p.image_size, p.channels)
    return await served.batcher.submit(tensor)


async def predict_images(
    served: ServedRun, named: list[tuple[str, bytes]], k: int, run_id: str, tensor: np.ndarray | None = None
) -> bytes:
    """The answer as JSON bytes: each image's cluster, confidence, top-k clusters (and labels).
    `tensor`: the images as uint8 NCHW already (then `named` only names them)."""
    probs = await probabilities(served, None if tensor is not None else named, tensor)
    labels = served.cluster_labels

    def answer() -> bytes:
        return json.dumps({"run_id": run_id, "predictions": format_predictions(named, probs, k, labels)}).encode()

    # Up to 256 images x 1,000 clusters of JSON: built in a worker thread, not on the event loop.
    return answer() if len(named) <= _INLINE_ANSWER else await run_in_threadpool(answer)


def format_predictions(
    named: list[tuple[str, bytes]], probs: np.ndarray, k: int, labels: list[str | None] | None
) -> list[dict[str, Any]]:
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    out = []
    for (name, _), row, order in zip(named, probs, top):
        c = int(order[0])
        entry: dict[str, Any] = {
            "file": name,
            "cluster": c,
            "confidence": float(row[c]),
            "top_k": [
                {"cluster": int(j), "probability": float(row[j]), **({"label": labels[j]} if labels else {})}
                for j in order
            ],
        }
        if labels:
            entry["label"] = labels[c]
        out.append(entry)
    return out
