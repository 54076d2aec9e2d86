"""How far a new batch of images is from the data a model was trained on (a drift report).

Four views, each against the training set's own figures from the same model:

- cluster proportions: Pearson's chi-square test of the batch's cluster counts against the training
  shares (``scipy.stats.chisquare``) and the population stability index,
  PSI = sum((q - p) * ln(q / p)) over clusters (p training share, q batch share; both floored at
  ``EPS`` so an empty cluster does not make it infinite). Rule of thumb: < 0.1 stable, 0.1-0.25
  moderate shift, > 0.25 major shift.
- confidence: the two-sample Kolmogorov-Smirnov test between the training and batch confidences
  (``scipy.stats.ks_2samp``) and the share of each below the confidence threshold.
- novelty: the cosine distance from each image to its nearest training image in the run's faiss
  index, against the training set's own nearest-other-image distances: the share of the batch beyond
  the training's 95th and 99th percentiles (about 5% and 1% when the batch looks like training).

    ref = training_reference(train_clusters, train_confidence, train_nn_distance, k)
    report = drift_report(ref, clusters, confidences, distances, threshold=0.9)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

EPS = 1e-4
PSI_MODERATE, PSI_MAJOR = 0.1, 0.25


@dataclass
class TrainingReference:
    shares: np.ndarray  # (K,) training cluster proportions
    confidence: np.ndarray  # (N,) training confidences
    nn_distance: np.ndarray  # (M,) distance of training images to their nearest other training image
    count: int

    @property
    def p95(self) -> float:
        return float(np.quantile(self.nn_distance, 0.95))

    @property
    def p99(self) -> float:
        return float(np.quantile(self.nn_distance, 0.99))


def training_reference(
    clusters: np.ndarray, confidence: np.ndarray, nn_distance: np.ndarray, num_clusters: int
) -> TrainingReference:
    clusters = np.asarray(clusters, dtype=np.int64)
    counts = np.bincount(clusters, minlength=num_clusters)[:num_clusters].astype(np.float64)
    return TrainingReference(
        shares=counts / max(1.0, counts.sum()),
        confidence=np.asarray(confidence, dtype=np.float64),
        nn_distance=np.asarray(nn_distance, dtype=np.float64),
        count=len(clusters),
    )


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    p = np.maximum(np.asarray(expected, dtype=np.float64), EPS)
    q = np.maximum(np.asarray(actual, dtype=np.float64), EPS)
    return float(np.sum((q - p) * np.log(q / p)))


def psi_level(value: float) -> str:
    return "major" if value > PSI_MAJOR else "moderate" if value > PSI_MODERATE else "stable"


def drift_report(
    ref: TrainingReference,
    clusters: np.ndarray,
    confidence: np.ndarray,
    distance: np.ndarray,
    *,
    threshold: float,
    most_novel: int = 24,
) -> dict[str, Any]:
    """The report as plain JSON values. ``clusters``/``confidence``/``distance`` are per batch item,
    in item order (the most novel items are named by their index)."""
    from scipy import stats

    clusters = np.asarray(clusters, dtype=np.int64)
    confidence = np.asarray(confidence, dtype=np.float64)
    distance = np.asarray(distance, dtype=np.float64)
    n, k = len(clusters), len(ref.shares)
    if n == 0:
        raise ValueError("a drift report needs at least one item")
    counts = np.bincount(clusters, minlength=k)[:k].astype(np.float64)
    shares = counts / n
    # chisquare needs every expected count above zero and the same total as the observed counts.
    expected = np.maximum(ref.shares, EPS)
    expected = expected / expected.sum() * n
    chi = stats.chisquare(counts, expected)
    ks = stats.ks_2samp(ref.confidence, confidence)
    p95, p99 = ref.p95, ref.p99
    order = np.argsort(-distance, kind="stable")[:most_novel]
    psi_value = psi(ref.shares, shares)
    beyond95, beyond99 = float(np.mean(distance > p95)), float(np.mean(distance > p99))
    return {
        "items": n,
        "training_items": ref.count,
        "proportions": {
            "clusters": [
                {
                    "cluster": c,
                    "training_share": float(ref.shares[c]),
                    "share": float(shares[c]),
                    "count": int(counts[c]),
                }
                for c in range(k)
            ],
            "chi_square": {"statistic": _f(chi.statistic), "p_value": _f(chi.pvalue), "dof": k - 1},
            "psi": psi_value,
            "psi_level": psi_level(psi_value),
        },
        "confidence": {
            "threshold": float(threshold),
            "training_mean": float(ref.confidence.mean()) if len(ref.confidence) else None,
            "mean": float(confidence.mean()),
            "training_share_below_threshold": float(np.mean(ref.confidence < threshold))
            if len(ref.confidence)
            else None,
            "share_below_threshold": float(np.mean(confidence < threshold)),
            "ks_statistic": _f(ks.statistic),
            "ks_p_value": _f(ks.pvalue),
        },
        "novelty": {
            "training_p95_distance": p95,
            "training_p99_distance": p99,
            "share_beyond_p95": beyond95,
            "share_beyond_p99": beyond99,
            "mean_distance": float(distance.mean()),
            "training_mean_distance": float(ref.nn_distance.mean()),
            "most_novel": [
                {
                    "item_index": int(i),
                    "distance": float(distance[i]),
                    "cluster": int(clusters[i]),
                    "confidence": float(confidence[i]),
                }
                for i in order
            ],
        },
        "verdict": verdict(psi_value, beyond99),
    }


def verdict(psi_value: float, beyond99: float) -> str:
    """One word for the UI: the worse of the proportion shift and the novelty share (5x the 1% the
    training set itself has beyond its 99th percentile counts as major)."""
    if psi_value > PSI_MAJOR or beyond99 > 0.05:
        return "major"
    if psi_value > PSI_MODERATE or beyond99 > 0.02:
        return "moderate"
    return "stable"


def _f(value: Any) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def nearest_distance(index: Any, embeddings: np.ndarray) -> np.ndarray:
    """Cosine distance (1 - similarity) from each embedding to its nearest indexed training image."""
    from ml.index import search

    sims, _ = search(index, embeddings, 1)
    return np.clip(1.0 - sims[:, 0].astype(np.float64), 0.0, 2.0)


def training_nn_distance(index: Any, features: np.ndarray, sample: int = 5000, seed: int = 0) -> np.ndarray:
    """The same distance for (a sample of) the training images themselves, leaving each image out of
    its own search: the reference a new image's distance is compared with."""
    from ml.index import search

    n = len(features)
    rows = np.arange(n) if n <= sample else np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
    sims, ids = search(index, np.asarray(features[rows]), min(2, int(index.ntotal)))
    if sims.shape[1] == 1:
        return np.zeros(len(rows))
    # The first hit is the image itself, unless an exact duplicate came first: either way the
    # other one of the two is the nearest *other* image.
    other = np.where(ids[:, 0] == rows, sims[:, 1], sims[:, 0])
    return np.clip(1.0 - other.astype(np.float64), 0.0, 2.0)
