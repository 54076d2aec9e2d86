"""Stage 2: mine the K nearest neighbours of every image in pretext-feature space (SCAN section
2.1), build the faiss index the service answers /neighbors from, and, when labels exist, record the
neighbours' purity and the K-means-on-pretext-features baseline of the paper's Table 1."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ml import evaluate, shortcuts
from ml import index as faiss_index
from ml.rundir import atomic_write
from ml.stages.common import Progress, StageContext


def run_mining(ctx: StageContext, data) -> dict[str, Any]:
    cfg, run = ctx.cfg, ctx.run
    if not run.features_path.exists():
        raise FileNotFoundError(f"{run.features_path} is missing: run the pretext stage first")
    features = np.load(run.features_path)
    ctx.report(Progress("mining", 1, 1, 0, 1))
    summary: dict[str, Any] = {}
    # One index serves both: mining now, /neighbors later (persisted with the run).
    if run.index_path.exists():
        idx = faiss_index.load_index(run.index_path)
    else:
        shards = min(cfg.mining.shards, len(features))
        idx = faiss_index.build_index(features, exact_threshold=cfg.mining.exact_threshold, shards=shards)
        faiss_index.save_index(idx, run.index_path)
    ctx.check_cancel()
    if not run.neighbors_path.exists():
        t0 = time.perf_counter()
        ids, _ = faiss_index.mine_neighbors(features, k=min(cfg.mining.num_neighbors, len(features) - 1), index=idx)
        summary["mining_s"] = time.perf_counter() - t0
        atomic_write(run.neighbors_path, lambda f: np.save(f, ids.astype(np.int64)))
    neighbors = np.load(run.neighbors_path)

    metrics: dict[str, Any] = {"num_neighbors": int(neighbors.shape[1])}
    # Label-free: do the neighbours follow brightness, colour or polarity rather than content?
    metrics["shortcuts"] = shortcuts.neighbor_shortcuts(shortcuts.image_statistics(data.images), neighbors)
    if data.labels is not None:
        metrics["neighbor_purity"] = float(faiss_index.neighbor_purity(neighbors, np.asarray(data.labels)))
        # K not chosen yet ("auto" or a range): the baseline gets as many clusters as there are classes.
        k = cfg.k if cfg.k is not None else int(np.asarray(data.labels).max()) + 1
        metrics["kmeans"] = evaluate.kmeans_baseline(features, np.asarray(data.labels), k, seed=cfg.seed)
    run.update_json(run.metrics_path, "mining", metrics)
    ctx.report(
        Progress(
            "mining", 1, 1, 1, 1, epoch_end=True, metrics=_scalars(metrics), message=metrics["shortcuts"].get("warning")
        )
    )
    return {**summary, **_scalars(metrics)}


def _scalars(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update({f"{k}_{kk}": vv for kk, vv in v.items() if isinstance(vv, (int, float))})
        elif isinstance(v, (int, float)):
            out[k] = v
    return out
