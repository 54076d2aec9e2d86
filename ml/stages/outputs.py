"""What a finished clustering model says about the dataset: assignments, per-cluster summaries
(size, confidence, prototype, most confident members, matched label) and the metrics."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ml import evaluate, shortcuts
from ml.clusters import ClusterSummary, write_clusters
from ml.rundir import atomic_write
from ml.stages.common import StageContext, predict_all

TOP_ITEMS = 10


def write_outputs(ctx: StageContext, model, images: torch.Tensor, data, name: str, final: bool) -> dict[str, Any]:
    """Metrics of this stage's model go to metrics.json[name]; when `final`, the assignments and
    cluster summaries the service serves are written too."""
    run = ctx.run
    model.eval()
    probs = predict_all(lambda x: model(x)[0].float().softmax(-1), images, ctx.rt).numpy()
    metrics: dict[str, Any] = {}
    labels = np.asarray(data.labels) if data.labels is not None else None
    if labels is not None:
        metrics = evaluate.cluster_metrics(probs, labels)
    # Label-free: could brightness, colour or polarity alone tell the clusters apart?
    metrics["shortcuts"] = shortcuts.cluster_shortcuts(
        shortcuts.image_statistics(data.images), np.load(run.features_path), probs.argmax(1), seed=ctx.cfg.seed
    )
    if metrics["shortcuts"].get("warning"):
        ctx.note(
            metrics["shortcuts"]["warning"],
            {
                "shortcut_trivial_gain": metrics["shortcuts"]["trivial_gain"],
                "shortcut_feature_gain": metrics["shortcuts"]["feature_gain"],
            },
        )
    run.update_json(run.metrics_path, name, metrics)
    if final:
        _write_final(ctx, probs, labels, data, name)
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def _write_final(ctx: StageContext, probs: np.ndarray, labels, data, name: str) -> None:
    run = ctx.run
    cluster = probs.argmax(1).astype(np.int64)
    confidence = probs.max(1).astype(np.float32)
    atomic_write(
        run.assignments_path,
        lambda f: np.savez(f, cluster=cluster, confidence=confidence, probs=probs.astype(np.float32)),
    )
    features = np.load(run.features_path)
    prototypes = evaluate.cluster_prototypes(probs, features, top=TOP_ITEMS)
    mapping = evaluate.hungarian_mapping(cluster, labels, probs.shape[1]) if labels is not None else None
    names = data.class_names
    clusters = []
    for c in range(probs.shape[1]):
        members = np.flatnonzero(cluster == c)
        order = members[np.argsort(-confidence[members], kind="stable")]
        matched = None
        if mapping is not None and mapping[c] >= 0:
            matched = names[mapping[c]] if names else str(int(mapping[c]))
        clusters.append(
            ClusterSummary(
                cluster=c,
                size=int(members.size),
                mean_confidence=float(confidence[members].mean()) if members.size else 0.0,
                prototype=prototypes[c],
                top_items=[int(i) for i in order[:TOP_ITEMS]],
                matched_label=matched,
                matched_class=int(mapping[c]) if mapping is not None and mapping[c] >= 0 else None,
            )
        )
    write_clusters(run.clusters_path, clusters)
    run.update_json(run.metrics_path, "final", name)
