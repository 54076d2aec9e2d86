"""The shortcut diagnostic on digits, where we know what the grouping follows."""

from __future__ import annotations

import numpy as np
import pytest

from ml.data import load_source
from ml.shortcuts import cluster_shortcuts, image_statistics, neighbor_shortcuts


@pytest.fixture(scope="module")
def inverted_half():
    """Digits with a random half inverted (light-on-dark vs dark-on-light), as RGB."""
    d = load_source("digits")
    rng = np.random.default_rng(0)
    flip = rng.random(len(d.labels)) < 0.5
    x = np.asarray(d.images).repeat(3, axis=1)
    x[flip] = 255 - x[flip]
    return x, np.asarray(d.labels), flip.astype(np.int64)


def _neighbors_by(group: np.ndarray, k: int = 10, seed: int = 0) -> np.ndarray:
    """k random neighbours of each image from its own group (what a learned kNN would give if it
    followed `group` perfectly)."""
    rng = np.random.default_rng(seed)
    out = np.empty((len(group), k), np.int64)
    for g in np.unique(group):
        members = np.flatnonzero(group == g)
        out[members] = rng.choice(members, size=(members.size, k))
    return out


def test_statistics_see_polarity(inverted_half):
    x, _, flip = inverted_half
    stats = image_statistics(x)
    assert set(stats) == {"brightness", "contrast", "polarity", "foreground", "colour"}
    assert stats["colour"].shape == (len(x), 3)
    # Digits are light strokes on a dark ground; inverted ones dark on light.
    assert (stats["polarity"] == flip).mean() > 0.95


def test_neighbours_following_polarity_are_flagged_and_by_class_are_not(inverted_half):
    x, labels, flip = inverted_half
    stats = image_statistics(x)
    by_polarity = neighbor_shortcuts(stats, _neighbors_by(flip))
    assert by_polarity["worst"] in ("polarity", "brightness", "colour")
    assert "warning" in by_polarity, by_polarity
    by_class = neighbor_shortcuts(stats, _neighbors_by(labels))
    assert "warning" not in by_class, by_class


@pytest.mark.slow  # fits probes on raw pixels: seconds of CPU, in make test, not make test-fast
def test_clusters_following_polarity_are_flagged_and_by_class_are_not(inverted_half):
    x, labels, flip = inverted_half
    stats = image_statistics(x)
    pixels = x.reshape(len(x), -1).astype(np.float32) / 255  # stand-in for learned features
    trivial = cluster_shortcuts(stats, pixels, flip)
    assert trivial["trivial_gain"] > 0.9 and "warning" in trivial, trivial
    semantic = cluster_shortcuts(stats, pixels, labels)
    assert semantic["feature_gain"] > 0.8 and "warning" not in semantic, semantic
