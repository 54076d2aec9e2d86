"""num_clusters "auto" / a range: the K sweep on frozen features and its criterion (ml/num_clusters.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ml.num_clusters import candidate_ks, choose_num_clusters, neighbor_agreement, neighbor_modularity, pick


def test_candidates_are_every_k_of_a_short_range_and_a_ladder_across_a_long_one():
    assert candidate_ks(2, 20, 1000) == list(range(2, 21))
    assert candidate_ks(3, 20, 8) == [3, 4, 5, 6, 7]  # K stays below the number of images
    ladder = candidate_ks(2, 1000, 50_000)
    assert ladder[0] == 2 and ladder[-1] == 1000 and len(ladder) <= 31
    assert all(b / a <= 1.5 for a, b in zip(ladder, ladder[1:]))  # geometric: no big relative gap
    with pytest.raises(ValueError, match="num_clusters"):
        candidate_ks(10, 20, 6)


def test_modularity_counts_neighbour_pairs_kept_together_beyond_chance():
    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(4), 50)  # 4 equal groups; each image's 5 neighbours from its own group
    neighbors = np.stack([rng.choice(np.flatnonzero(truth == t), 5) for t in truth])
    assert neighbor_agreement(truth, neighbors) == (1.0, 0.25)
    assert neighbor_modularity(truth, neighbors) == pytest.approx(0.75)
    merged = truth // 2  # 2 clusters: every pair still agrees, but chance rises to 1/2
    assert neighbor_modularity(merged, neighbors) == pytest.approx(0.5)
    split = truth * 2 + rng.integers(0, 2, truth.size)  # 8 clusters, each group cut at random
    assert 0.3 < neighbor_modularity(split, neighbors) < 0.75
    assert abs(neighbor_modularity(rng.permutation(truth), neighbors)) < 0.05  # random: chance level


def test_pick_keeps_the_smallest_k_within_one_sd_of_the_best():
    def curve(values, sd):
        return [{"k": k, "criterion": v, "criterion_sd": sd} for k, v in zip(range(2, 2 + len(values)), values)]

    flat_tail = [0.45, 0.70, 0.79, 0.80, 0.802, 0.801]  # K = 2..7: the peak at 6, 5 and 7 within noise
    assert pick(curve(flat_tail, sd=0.005)) == 5
    assert pick(curve(flat_tail, sd=0.0)) == 6  # no noise measured: the highest
    assert pick(curve(flat_tail, sd=0.5)) == 2  # noise swamps the curve: the simplest answer


def _blobs(k: int, per: int, dim: int, seed: int = 0):
    """k well-separated Gaussian blobs, L2-normalised as pretext features are, with their 10 nearest
    neighbours (self excluded) mined exactly as the mining stage does."""
    from ml.index import build_index, mine_neighbors

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)) * 3
    x = (np.repeat(centres, per, axis=0) + rng.normal(size=(k * per, dim))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids, _ = mine_neighbors(x, k=10, index=build_index(x))
    return x, ids


def test_the_sweep_finds_the_number_of_planted_groups():
    torch.manual_seed(0)
    for k in (4, 7):
        features, neighbors = _blobs(k, per=60, dim=32, seed=k)
        curve, chosen = choose_num_clusters(features, neighbors, range(2, 10), steps=200)
        assert chosen == k, [(r["k"], round(r["criterion"], 3)) for r in curve]
        assert [r["k"] for r in curve] == list(range(2, 10))
        row = next(r for r in curve if r["k"] == k)
        assert row["clusters_used"] == k and row["head_agreement"] > 0.9


@pytest.mark.slow
def test_auto_picks_ten_clusters_on_digits_and_the_run_trains_that_k(tmp_path):
    """Real features: the `small` preset's pretext on scikit-learn's digits (10 classes), then the
    clustering stage with num_clusters "auto". Measured: K 10 or 11 over seeds and pretext lengths
    (docs/num_clusters.md)."""
    from ml.config import RunConfig
    from ml.data import load_source
    from ml.pipeline import load_config, prepare_run, run_stage
    from ml.predictor import Predictor

    torch.set_num_threads(1)
    data = load_source("digits")
    cfg = RunConfig.from_preset(
        "small", "auto", {"seed": 0, "pretext.epochs": 60, "clustering.epochs": 1, "selflabel.enabled": False}
    )
    prepare_run(tmp_path, cfg)
    for stage in ("pretext", "mining", "clustering"):
        summary = run_stage(stage, tmp_path, data)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    sweep = metrics["num_clusters"]
    curve = [(r["k"], round(r["criterion"], 3)) for r in sweep["curve"]]
    assert 8 <= sweep["chosen"] <= 12, curve
    assert sweep["asked"] == "auto" and sweep["range"] == [2, 20] and [k for k, _ in curve] == list(range(2, 21))
    best = max(sweep["curve"], key=lambda r: r["criterion"])
    assert best["criterion"] - best["criterion_sd"] <= sweep["curve"][sweep["chosen"] - 2]["criterion"]
    # Every later step uses the K chosen: the stage's summary, the stored config, the model, the outputs.
    k = sweep["chosen"]
    assert summary["num_clusters"] == summary["num_clusters_chosen"] == k
    stored = load_config(tmp_path)
    assert stored.num_clusters == "auto" and stored.num_clusters_chosen == k and stored.k == k
    assert Predictor.load(tmp_path, device="cpu", model="scan").num_clusters == k
    assert np.load(tmp_path / "assignments.npz")["probs"].shape == (data.n, k)
    assert metrics["scan"]["num_clusters"] == k


def test_every_seed_of_an_auto_run_trains_the_one_k_chosen_for_the_run(tmp_path):
    """seeds: N with "auto": the sweep runs once, before the seeds, and every seed trains its K."""
    from ml.config import RunConfig
    from ml.data import ImageSet, load_source
    from ml.pipeline import load_config, prepare_run, run_stage
    from ml.saved_models import load_clustering

    digits = load_source("digits")
    data = ImageSet(digits.images[:300], digits.labels[:300], digits.class_names, "digits[:300]")
    overrides = {"seeds": 2, "pretext.epochs": 1, "clustering.epochs": 1, "clustering.sweep_steps": 30}
    prepare_run(tmp_path, RunConfig.from_preset("small", {"min": 3, "max": 6}, overrides))
    for stage in ("pretext", "mining", "clustering"):
        summary = run_stage(stage, tmp_path, data)
    sweep = json.loads((tmp_path / "metrics.json").read_text())["num_clusters"]
    k = sweep["chosen"]
    assert [r["k"] for r in sweep["curve"]] == [3, 4, 5, 6] and summary["num_clusters_chosen"] == k
    assert load_config(tmp_path).num_clusters_chosen == k
    for i in range(2):
        assert "num_clusters" not in json.loads((tmp_path / "seeds" / str(i) / "metrics.json").read_text())
        assert load_clustering(tmp_path / "seeds" / str(i) / "scan.pt")[1]["num_clusters"] == k
