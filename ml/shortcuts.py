"""Shortcut diagnostic: do the neighbours and clusters follow what an image *shows*, or a trivial
statistic of it (brightness, colour, polarity, how much of it is foreground)?

SCAN trusts its pretext features; if they encode lighting or background colour more than content,
neighbours and clusters follow the lighting, and the accuracy-free metrics look fine. This measures
it without labels:

- neighbours: for each statistic, how closely an image and its mined neighbours agree on it,
  relative to random pairs (0: the neighbours ignore the statistic, 1: they always share its value);
- clusters: how well each statistic (and all of them together) predicts the cluster of an image,
  cross-validated with a 15-nearest-neighbour classifier, against how well the learned features
  predict it the same way; both as the accuracy gained
  over always answering the largest cluster (0: no better than that, 1: perfect).

A warning in plain words is added when the trivial statistics explain the grouping (nearly) as well
as the features do. ``image size`` is not among the statistics: every image of a set is conformed to
one size at ingest, so it cannot separate anything here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["image_statistics", "neighbor_shortcuts", "cluster_shortcuts"]

# Neighbours agreeing on a statistic beyond this are flagged. Measured on digits (8 px): neighbours
# by class agree at most ~0.5 (on brightness: a 1 has less ink than an 8); neighbours that follow
# inversion agree ~0.9 on polarity.
NEIGHBOR_WARN = 0.75
# Clusters follow trivial statistics when these predict them at least this well (gain over the
# majority answer) and at least WARN_RATIO of what the learned features achieve.
CLUSTER_WARN = 0.5
WARN_RATIO = 0.8
_SAMPLE = 3000


def image_statistics(images: np.ndarray, chunk: int = 4096) -> dict[str, np.ndarray]:
    """Trivial statistics of uint8 (N, C, H, W) images, each (N,) or (N, 3), in [0, 1] units.

    brightness: mean luma; contrast: luma standard deviation; polarity: 1 for a ground lighter than
    the image's mean (dark content on a light ground), else 0 (a yes/no, so the shape of the
    content, which moves a border-vs-centre difference, does not count as polarity); foreground: fraction of pixels
    further than 0.25 from the border's median luma; colour (RGB only): mean of each channel.
    """
    n, c = images.shape[0], images.shape[1]
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("brightness", "contrast", "polarity", "foreground")}
    if c == 3:
        out["colour"] = []
    weights = np.array([0.299, 0.587, 0.114], np.float32)
    for i in range(0, n, chunk):
        x = np.asarray(images[i : i + chunk], dtype=np.float32) / 255.0
        luma = x[:, 0] if c == 1 else np.tensordot(x, weights, axes=([1], [0]))
        h, w = luma.shape[1:]
        b = max(1, min(h, w) // 8)
        border = np.concatenate(
            [
                luma[:, :b].reshape(len(x), -1),
                luma[:, -b:].reshape(len(x), -1),
                luma[:, :, :b].reshape(len(x), -1),
                luma[:, :, -b:].reshape(len(x), -1),
            ],
            axis=1,
        )
        ground = np.median(border, axis=1)
        out["brightness"].append(luma.mean(axis=(1, 2)))
        out["contrast"].append(luma.std(axis=(1, 2)))
        out["polarity"].append((border.mean(axis=1) > luma.mean(axis=(1, 2))).astype(np.float32))
        out["foreground"].append((np.abs(luma - ground[:, None, None]) > 0.25).mean(axis=(1, 2)))
        if c == 3:
            out["colour"].append(x.mean(axis=(2, 3)))
    return {k: np.concatenate(v) for k, v in out.items()}


def neighbor_shortcuts(stats: dict[str, np.ndarray], neighbors: np.ndarray) -> dict[str, Any]:
    """For each statistic, how much an image and its neighbours agree on it: 1 - E|s_i - s_j|^2 over
    (image, neighbour) pairs divided by the same over random pairs (2 x its variance). 0: the
    neighbours ignore the statistic; 1: a neighbour always has the same value."""
    agreement = {}
    for name, values in stats.items():
        v = values if values.ndim == 2 else values[:, None]
        spread = 2 * v.var(axis=0).sum()
        if spread <= 1e-12:  # constant over the set: cannot drive anything
            agreement[name] = 0.0
            continue
        pair = np.square(v[:, None, :] - v[neighbors]).sum(-1).mean()
        agreement[name] = round(float(1 - pair / spread), 4)
    worst = max(agreement, key=agreement.get)
    out: dict[str, Any] = {"neighbor_agreement": agreement, "worst": worst}
    if agreement[worst] >= NEIGHBOR_WARN:
        out["warning"] = (
            f"Neighbours follow {_words(worst)}: an image and its mined neighbours agree on it "
            f"{agreement[worst]:.0%} of the way (0% would be no more than random pairs). "
            f"Clusters built on them may group images by {_words(worst)} rather than by what "
            f"they show; {_cure(worst)}"
        )
    return out


def cluster_shortcuts(
    stats: dict[str, np.ndarray], features: np.ndarray, clusters: np.ndarray, seed: int = 0
) -> dict[str, Any]:
    """How well each trivial statistic, all of them together, and the learned features predict the
    clusters: 3-fold cross-validated, as gain over the largest cluster's share."""
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(clusters), size=min(len(clusters), _SAMPLE), replace=False))
    y = clusters[idx]
    counts = np.bincount(y)
    if (counts > 0).sum() < 2 or counts[counts > 0].min() < 3:
        return {"skipped": "too few images per cluster to cross-validate"}
    majority = counts.max() / len(y)

    def gain(x: np.ndarray, model) -> float:
        acc = cross_val_score(make_pipeline(StandardScaler(), model), x, y, cv=3).mean()
        return round(float((acc - majority) / max(1 - majority, 1e-9)), 4)

    def knn():
        return KNeighborsClassifier(n_neighbors=15)

    columns = {k: (v if v.ndim == 2 else v[:, None])[idx] for k, v in stats.items()}
    per_stat = {k: gain(v, knn()) for k, v in columns.items()}
    trivial = gain(np.concatenate(list(columns.values()), axis=1), knn())
    learned = gain(features[idx], knn())
    worst = max(per_stat, key=per_stat.get)
    out: dict[str, Any] = {"stat_gain": per_stat, "trivial_gain": trivial, "feature_gain": learned, "worst": worst}
    if trivial >= CLUSTER_WARN and trivial >= WARN_RATIO * learned:
        out["warning"] = (
            f"Clusters follow trivial image statistics: {_words(worst)} alone predicts an image's "
            f"cluster with {per_stat[worst]:.0%} of the possible gain, all simple statistics together "
            f"{trivial:.0%}, the learned features {learned:.0%}. The clusters likely group images by "
            f"{_words(worst)}, not content; {_cure(worst)}"
        )
    return out


def _cure(stat: str) -> str:
    """What a user can do about a run that follows ``stat``."""
    if stat in ("brightness", "contrast", "colour", "polarity"):
        # CanonicalColour removes exactly these (tests/ml/test_invariance.py).
        return (
            "where that is not what tells the classes apart, retrain with canonicalise: true (each image's "
            "colours, brightness, contrast and polarity are normalised away inside the model)."
        )
    return "consider the pretext.invariances that remove it, and retrain."


def _words(stat: str) -> str:
    return {
        "brightness": "brightness",
        "contrast": "contrast",
        "colour": "colour",
        "polarity": "polarity (dark-on-light vs light-on-dark)",
        "foreground": "how much of the image is foreground",
    }.get(stat, stat)
