"""ml.index: exact and IVF cosine search, self-excluded neighbour mining, persistence."""

from __future__ import annotations

import numpy as np
import pytest

from ml.index import build_index, describe_index, load_index, mine_neighbors, neighbor_purity, save_index, search


def blobs(n: int, dim: int = 32, centres: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim)).astype(np.float32)
    labels = rng.integers(0, centres, n)
    x = c[labels] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return (x * rng.uniform(0.5, 3.0, (n, 1))).astype(np.float32), labels  # raw, un-normalised


def brute_force(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine top-k per row, itself excluded, in float64 numpy."""
    xn = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    sim = xn @ xn.T
    np.fill_diagonal(sim, -np.inf)
    ids = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(sim, ids, axis=1)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return sum(len(np.intersect1d(a, b)) for a, b in zip(found, truth)) / truth.size


def test_exact_mining_matches_numpy_brute_force():
    x, _ = blobs(600)
    ids, scores = mine_neighbors(x, k=10)
    want_ids, want_scores = brute_force(x, 10)
    assert ids.shape == (600, 10) and ids.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    # Ids agree except where two neighbours tie in float32; compare as sets per row then.
    assert recall(ids, want_ids) > 0.999
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # sorted, most similar first


def test_self_excluded_even_with_duplicates():
    x, _ = blobs(200)
    x[100:110] = x[0]  # ten exact copies of sample 0 (scaled copies are duplicates for cosine too)
    x[110] = 5 * x[0]
    ids, scores = mine_neighbors(x, k=5)
    rows = np.arange(len(x))
    assert not np.any(ids == rows[:, None])
    twins = {0, *range(100, 111)}
    for r in twins:  # every twin finds 5 other twins at similarity 1
        assert set(ids[r]) <= twins - {r}
        np.testing.assert_allclose(scores[r], 1.0, atol=1e-5)


def test_approximate_path_reaches_high_recall_and_returns_valid_ids():
    x, _ = blobs(5000, dim=32, centres=50)
    index = build_index(x, exact_threshold=1000)
    info = describe_index(index)
    assert info["kind"] == "ivf" and info["ntotal"] == 5000 and 1 <= info["nprobe"] <= info["nlist"]
    ids, _ = mine_neighbors(x, k=10, index=index)
    exact_ids, _ = mine_neighbors(x, k=10)
    assert describe_index(build_index(x))["kind"] == "exact"
    assert recall(ids, exact_ids) >= 0.9
    assert ids.min() >= 0 and not np.any(ids == np.arange(5000)[:, None])


def test_rows_the_ivf_cannot_fill_fall_back_to_exact_search():
    x, _ = blobs(2000, centres=40)
    index = build_index(x, exact_threshold=10)  # IVF with 50 lists of ~40 vectors
    index.nprobe = 1  # one list rarely holds k + 1 = 51 vectors: faiss pads with -1
    assert (search(index, x, 51)[1] < 0).any()
    ids, scores = mine_neighbors(x, k=50, index=index)
    exact_ids, exact_scores = mine_neighbors(x, k=50)
    assert ids.min() >= 0 and not np.any(ids == np.arange(2000)[:, None])
    short = (search(index, x, 51)[1] < 0).any(axis=1)
    np.testing.assert_allclose(scores[short], exact_scores[short], atol=1e-5)


def test_mining_rejects_index_of_other_data():
    x, _ = blobs(300)
    with pytest.raises(ValueError):
        mine_neighbors(x, k=5, index=build_index(x[:200]))


@pytest.mark.parametrize("kind_kw", [{}, {"exact_threshold": 500}])
def test_save_load_round_trip_gives_identical_results(tmp_path, kind_kw):
    x, _ = blobs(3000)
    index = build_index(x, **kind_kw)
    if kind_kw:  # a non-default nprobe must survive the file
        index.nprobe = 7
    path = tmp_path / "sub" / "features.faiss"
    save_index(index, path)
    assert path.exists() and [p.name for p in path.parent.iterdir()] == ["features.faiss"]
    queries = x[:50] + 0.1
    want = search(index, queries, 15)
    for mmap in (False, True):
        loaded = load_index(path, mmap=mmap)
        assert describe_index(loaded) == describe_index(index)
        got = search(loaded, queries, 15)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
    if kind_kw:
        assert describe_index(load_index(path))["nprobe"] == 7


def test_search_normalises_and_keeps_external_ids():
    x, _ = blobs(100)
    index = build_index(x, ids=np.arange(100) + 1000)
    scores, ids = search(index, 7 * x[3], k=1)  # 1-D query, scaled: cosine ignores length
    assert ids.tolist() == [[1003]]
    assert scores[0, 0] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("k", [0, -1, 2049, 1.5, True, 101])
def test_search_validates_k(k):
    index = build_index(blobs(100)[0])
    with pytest.raises(ValueError):
        search(index, np.ones((2, 32), np.float32), k)


def test_search_and_build_validate_shapes_and_values():
    index = build_index(blobs(100)[0])
    with pytest.raises(ValueError, match="dimension"):
        search(index, np.ones((2, 31), np.float32), 5)
    bad = blobs(100)[0]
    bad[5, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        build_index(bad)
    with pytest.raises(ValueError):
        build_index(np.ones((0, 32), np.float32))
    with pytest.raises(ValueError):
        mine_neighbors(blobs(10)[0], k=10)  # only 9 other samples


def test_neighbor_purity():
    labels = np.array([0, 0, 1, 1])
    neighbors = np.array([[1, 2], [0, 3], [3, 0], [2, -1]])
    assert neighbor_purity(neighbors, labels) == pytest.approx(4 / 7)  # -1 is not counted
    x, y = blobs(500, centres=5)
    ids, _ = mine_neighbors(x, k=5)
    assert neighbor_purity(ids, y) > 0.95


@pytest.mark.parametrize(
    "threshold", [10_000, pytest.param(500, marks=pytest.mark.slow)], ids=["exact", "ivf"]
)  # the IVF variant trains quantizers: make test only
def test_sharded_index_answers_exactly_like_the_unsharded_one(tmp_path, threshold):
    # Exact: every shard is a flat index, so the merged top-k is the global top-k. IVF: every shard
    # shares one trained quantizer and nprobe, and the lists a query probes are chosen once for all
    # shards, so they scan what the unsharded index scans. The last 200 rows repeat the first 200,
    # in another shard: their exact ties must come back in one order (by id) both ways.
    x = np.random.default_rng(3).standard_normal((3001, 24)).astype(np.float32)
    x = np.concatenate([x, x[:200]])
    whole = build_index(x, exact_threshold=threshold)
    sharded = build_index(x, exact_threshold=threshold, shards=3)
    assert describe_index(sharded)["shards"] == 3
    assert describe_index(sharded)["kind"] == describe_index(whole)["kind"]
    ids, scores = mine_neighbors(x, k=15, index=whole)
    sharded_ids, sharded_scores = mine_neighbors(x, k=15, index=sharded)
    np.testing.assert_array_equal(sharded_ids, ids)
    np.testing.assert_array_equal(sharded_scores, scores)
    assert ids[0, 0] == 3001 and ids[3001, 0] == 0 and scores[0, 0] == scores[3001, 0]  # twins, found
    # Saved for serving, the shards become the one index they equal.
    save_index(sharded, tmp_path / "index.faiss")
    loaded = load_index(tmp_path / "index.faiss")
    assert describe_index(loaded) == describe_index(whole)
    np.testing.assert_array_equal(search(loaded, x[:50], 10)[1], search(whole, x[:50], 10)[1])
    # The sharded index still answers after saving (merging copied the shards, it did not empty them).
    np.testing.assert_array_equal(search(sharded, x[:50], 10)[1], search(whole, x[:50], 10)[1])


def test_shards_are_validated():
    x = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    for bad in (0, 11, True, 2.0):
        with pytest.raises(ValueError, match="shards"):
            build_index(x, shards=bad)


def test_mining_gives_the_callers_thread_count_back():
    """faiss and torch share the process's OpenMP threads: mining (all cores) must not leave the
    stages after it on more threads than the worker was given (OMP_NUM_THREADS=1 beside other jobs)."""
    import faiss
    import torch

    from ml.device import cpu_cores

    if cpu_cores() < 2:
        pytest.skip("one core: mining's thread count is the caller's anyway")
    # Whether the two share one OpenMP runtime depends on which was imported first (torch first, as in
    # a worker, they do): both are set to one thread, and both must read one after each call.
    saved = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    try:
        x, _ = blobs(3000, centres=10)
        index = build_index(x, exact_threshold=1000)  # IVF: training and adding run OpenMP loops
        assert torch.get_num_threads() == faiss.omp_get_max_threads() == 1
        mine_neighbors(x, k=5, index=index)
        assert torch.get_num_threads() == faiss.omp_get_max_threads() == 1
    finally:
        torch.set_num_threads(saved[0])
        faiss.omp_set_num_threads(saved[1])
