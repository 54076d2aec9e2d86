"""The drift statistics on synthetic data: the same distribution reads stable, a shifted one major."""

from __future__ import annotations

import numpy as np
import pytest

from ml.drift import drift_report, psi, training_nn_distance, training_reference
from ml.index import build_index


def _ref(rng, n=2000, k=5):
    clusters = rng.integers(0, k, n)
    conf = rng.beta(8, 2, n)
    return training_reference(clusters, conf, rng.gamma(2.0, 0.05, n), k)


def test_same_distribution_is_stable():
    rng = np.random.default_rng(0)
    ref = _ref(rng)
    n = 1000
    report = drift_report(
        ref, rng.integers(0, 5, n), rng.beta(8, 2, n), rng.gamma(2.0, 0.05, n), threshold=0.5, most_novel=3
    )
    assert report["verdict"] == "stable"
    assert report["proportions"]["psi"] < 0.02
    assert report["proportions"]["chi_square"]["p_value"] > 0.001
    assert report["confidence"]["ks_p_value"] > 0.001
    assert 0.02 < report["novelty"]["share_beyond_p95"] < 0.09
    assert len(report["novelty"]["most_novel"]) == 3


def test_shifted_distribution_is_major():
    rng = np.random.default_rng(1)
    ref = _ref(rng)
    n = 1000
    clusters = np.where(rng.random(n) < 0.8, 0, rng.integers(0, 5, n))  # one cluster takes over
    distance = rng.gamma(2.0, 0.05, n) + 0.5  # everything far from training
    report = drift_report(ref, clusters, rng.beta(2, 2, n), distance, threshold=0.5)
    assert report["verdict"] == "major" and report["proportions"]["psi_level"] == "major"
    assert report["proportions"]["chi_square"]["p_value"] < 1e-6
    assert report["confidence"]["ks_statistic"] > 0.3
    assert report["confidence"]["share_below_threshold"] > report["confidence"]["training_share_below_threshold"]
    assert report["novelty"]["share_beyond_p99"] > 0.95
    most = report["novelty"]["most_novel"]
    assert [m["distance"] for m in most] == sorted((m["distance"] for m in most), reverse=True)
    assert most[0]["distance"] == pytest.approx(float(distance.max()))


def test_psi_of_identical_shares_is_zero_and_empty_clusters_stay_finite():
    p = np.array([0.5, 0.5, 0.0])
    assert psi(p, p) == pytest.approx(0.0)
    assert np.isfinite(psi(p, np.array([0.0, 0.5, 0.5])))


def test_training_distance_leaves_each_image_out():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(300, 16)).astype(np.float32)
    index = build_index(features)
    d = training_nn_distance(index, features)
    assert d.shape == (300,) and (d > 1e-3).all()  # never the image's distance to itself
