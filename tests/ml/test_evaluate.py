"""ml.evaluate: Hungarian / many-to-one accuracy, metric dict, K-means baseline, prototypes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from ml import evaluate
from ml.evaluate import (
    cluster_metrics,
    cluster_prototypes,
    hungarian_accuracy,
    hungarian_mapping,
    kmeans_baseline,
    many_to_one_accuracy,
)


def one_hot(pred, k, confidence=0.9):
    """Soft assignments whose argmax is pred; the rest of the mass spread evenly."""
    pred = np.asarray(pred)
    p = np.full((len(pred), k), (1 - confidence) / (k - 1))
    p[np.arange(len(pred)), pred] = confidence
    return p


def test_permuted_labels_give_accuracy_one():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 500)
    perm = rng.permutation(10)
    pred = perm[labels]
    assert hungarian_accuracy(pred, labels) == 1.0
    mapping = hungarian_mapping(pred, labels, 10)
    assert mapping.tolist() == np.argsort(perm).tolist()  # cluster perm[c] -> class c


def test_partial_case_computed_by_hand():
    # co-occurrence (rows cluster, cols class):   c0 c1 c2
    #   cluster 0: samples 0,1 (class 0), 2 (class 1)  -> 2 1 0
    #   cluster 1: samples 3 (class 1), 4 (class 2)    -> 0 1 1
    #   cluster 2: sample 5 (class 2)                  -> 0 0 1
    # best one-to-one: 0->0 (2), then 1->1 (1) and 2->2 (1): 4 of 6 correct.
    pred = [0, 0, 0, 1, 1, 2]
    labels = [0, 0, 1, 1, 2, 2]
    assert hungarian_mapping(pred, labels).tolist() == [0, 1, 2]
    assert hungarian_accuracy(pred, labels) == pytest.approx(4 / 6)
    # majority per cluster: 2 + 1 + 1 (cluster 1 ties between classes 1 and 2)
    assert many_to_one_accuracy(pred, labels) == pytest.approx(4 / 6)


def test_rectangular_matching_with_more_clusters_than_classes():
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    pred = np.array([2, 2, 0, 3, 3, 3, 1])  # cluster 2 -> class 0, cluster 3 -> class 1
    mapping = hungarian_mapping(pred, labels, 5)
    assert mapping.tolist() == [-1, -1, 0, 1, -1]
    assert hungarian_accuracy(pred, labels) == pytest.approx(5 / 7)
    m = cluster_metrics(one_hot(pred, 5), labels)
    assert m["acc"] == pytest.approx(5 / 7)
    assert m["confusion"] == [[2, 0], [0, 3]]
    assert m["confusion_unmatched"] == [1, 1]
    assert m["num_clusters_used"] == 4 and m["num_clusters"] == 5


def test_fewer_clusters_than_classes():
    labels = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([1, 1, 0, 0, 0, 0])
    assert hungarian_mapping(pred, labels).tolist() in ([1, 0], [2, 0])
    assert hungarian_accuracy(pred, labels) == pytest.approx(4 / 6)


def test_many_to_one_on_overclustering_is_one():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 300)
    pred = labels * 4 + rng.integers(0, 4, 300)  # each class split over 4 clusters
    assert many_to_one_accuracy(pred, labels) == 1.0
    assert hungarian_accuracy(pred, labels) < 0.6
    assert cluster_metrics(one_hot(pred, 12), labels)["many_to_one_acc"] == 1.0


def test_top5_counts_label_among_five_most_probable_clusters():
    k = 10
    labels = np.arange(k).repeat(10)
    probs = one_hot(labels, k)  # argmax right everywhere: identity mapping
    # sample 0 (class 0): argmax cluster 9, class 0 has the 5th highest probability -> top5 hit
    probs[0] = [0.10, 0.0, 0.0, 0.0, 0.0, 0.0, 0.13, 0.14, 0.15, 0.48]
    # sample 1 (class 0): class 0 ranked 6th -> miss
    probs[1] = [0.05, 0.0, 0.0, 0.0, 0.10, 0.11, 0.12, 0.13, 0.14, 0.35]
    m = cluster_metrics(probs, labels)
    assert m["acc"] == pytest.approx(98 / 100)
    assert m["top5_acc"] == pytest.approx(99 / 100)
    # with K < 5 every cluster counts, so top-5 accuracy is 1 whatever the argmax
    assert cluster_metrics(one_hot([1, 0, 2, 2], 3), [0, 0, 1, 2])["top5_acc"] == 1.0


def test_nmi_ari_match_sklearn_and_dict_is_json():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 4, 200)
    pred = np.where(rng.random(200) < 0.7, labels, rng.integers(0, 4, 200))
    m = cluster_metrics(one_hot(pred, 4), labels)
    assert m["nmi"] == pytest.approx(normalized_mutual_info_score(labels, pred))
    assert m["ari"] == pytest.approx(adjusted_rand_score(labels, pred))
    assert np.sum(m["confusion"]) == 200
    assert json.loads(json.dumps(m)) == m
    assert all(type(m[key]) is float for key in ("acc", "nmi", "ari", "top5_acc", "many_to_one_acc"))


def test_invalid_inputs_raise():
    with pytest.raises(ValueError):
        hungarian_accuracy([0, 1], [0, 1, 1])
    with pytest.raises(ValueError):
        hungarian_accuracy([0, -1], [0, 1])
    with pytest.raises(ValueError):
        cluster_metrics(np.ones((3, 2)), [0, 1])
    with pytest.raises(ValueError):
        cluster_metrics(np.full((2, 2), np.nan), [0, 1])


@pytest.mark.parametrize("backend", ["sklearn", "faiss"])
def test_kmeans_baseline_on_separated_blobs(monkeypatch, backend):
    if backend == "faiss":  # the large-N path, taken here by lowering the size threshold
        monkeypatch.setattr(evaluate, "SKLEARN_KMEANS_MAX_WORK", 0)
    rng = np.random.default_rng(3)
    centres = 10 * np.eye(8, 16)[[0, 1, 2, 3, 4]]  # orthogonal directions: separated after L2 norm
    labels = rng.integers(0, 5, 400)
    feats = centres[labels] + rng.standard_normal((400, 16))
    feats *= rng.uniform(0.5, 2.0, (400, 1))  # lengths differ; cosine geometry does not
    m = kmeans_baseline(feats, labels, k=5, seed=0)
    assert m["acc"] == 1.0 and m["nmi"] == pytest.approx(1.0) and m["ari"] == pytest.approx(1.0)
    assert json.loads(json.dumps(m)) == m


def test_prototypes_pick_sample_nearest_to_mean_of_confident_members():
    features = np.array(
        [
            [1.0, 0.0],
            [0.0, 1.0],
            [1.0, 1.0],  # cluster 0: the diagonal one is nearest their mean
            [-1.0, 0.2],  # cluster 0 but not confident enough to be in the top 3
            [5.0, -5.0],  # cluster 1, alone
        ]
    )
    probs = np.array(
        [
            [0.9, 0.1, 0.0],
            [0.8, 0.2, 0.0],
            [0.7, 0.3, 0.0],
            [0.6, 0.4, 0.0],
            [0.1, 0.9, 0.0],
        ]
    )
    assert cluster_prototypes(probs, features, top=3) == [2, 4, None]
    # with all four members the mean turns towards [-1, 0.2]; [0, 1] is then nearest
    assert cluster_prototypes(probs, features, top=4) == [1, 4, None]
