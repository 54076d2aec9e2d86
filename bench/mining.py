"""Neighbour-mining benchmark: time and recall@k of `ml.index.mine_neighbors` on clustered features.

    python -m bench.mining                       # n = 10k, 100k, 1M; k = 20
    python -m bench.mining --sizes 100000 --hnsw # also time HNSW (the alternative we measured)
    python -m bench.mining --sizes 10000000 --query-sample 200000   # 10M: all of the build, a sample of the queries

Features: a Gaussian mixture in 128-d (one centre per ~1000 points, 100 to 1000 centres, noise of
per-cluster scale), so neighbours are meaningful and each cluster spans several IVF lists.
Recall@k = |mined ids & exact ids| / k averaged over the queries, self excluded on both sides. Exact
ground truth for every query costs N^2, so above 100k it is computed for a random sample of 2,000
queries only (brute force over all N vectors with faiss), and the table says so. "mine s" includes
building the index.

--query-sample Q (for N too large to mine whole on this machine in a session): the index over all N
vectors is built as mining builds it (timed), then only Q of the N queries are searched, in
mining's batches, and "mine s" is the build time plus N times the measured seconds per query
(queries are independent, so the search part is linear in their number); the table marks it
"projected" and says over how many queries the rate was measured.
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from ml.device import cpu_cores
from ml.index import MINE_BATCH, _normalized, build_index, describe_index, mine_neighbors, search

DIM = 128
SAMPLE_QUERIES = 2_000
EXACT_ALL_UP_TO = 100_000
HNSW_M, HNSW_EF_SEARCH = 32, 128


def clustered_features(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n_centres = int(np.clip(n // 1000, 100, 1000))
    centres = rng.standard_normal((n_centres, dim), dtype=np.float32)
    # Noise radius ~0.7-1.1 x the centre's length: clusters touch, neighbour purity stays high.
    scale = rng.uniform(0.7, 1.1, size=n_centres).astype(np.float32)
    assign = rng.integers(0, n_centres, size=n)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x *= scale[assign, None]
    x += centres[assign]
    return x


def exact_neighbors(x: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids (self excluded) of the query rows, brute force over all of x (normalised)."""
    out = np.empty((len(rows), k), dtype=np.int64)
    for start in range(0, len(rows), 16_384):
        part = rows[start : start + 16_384]
        _, ids = faiss.knn(x[part], x, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
        for i, (found, r) in enumerate(zip(ids, part)):
            out[start + i] = found[found != r][:k]
    return out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(np.intersect1d(a, b)) for a, b in zip(found, truth))
    return hits / truth.size


def hnsw_neighbors(x: np.ndarray, k: int) -> np.ndarray:
    index = faiss.IndexHNSWFlat(x.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.add(x)
    index.hnsw.efSearch = HNSW_EF_SEARCH
    out = np.empty((len(x), k), dtype=np.int64)
    for start in range(0, len(x), 16_384):
        _, ids = index.search(x[start : start + 16_384], k + 1)
        for i, row in enumerate(ids):
            row = row[row != start + i]
            out[start + i] = row[:k]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--query-sample", type=int, default=0, help="search only this many of the N queries")
    parser.add_argument("--hnsw", action="store_true", help=f"also time HNSW (M={HNSW_M}, efSearch={HNSW_EF_SEARCH})")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    k = args.k

    print(
        f"faiss {faiss.__version__}, {cpu_cores()} cores, dim {DIM}, k {k}, seed {args.seed}; "
        f"recall against exact brute force (all queries up to {EXACT_ALL_UP_TO:,}, "
        f"a random sample of {SAMPLE_QUERIES:,} queries above)"
    )
    header = (
        f"{'n':>9}  {'index':<28} {'mine s':>8} {'recall@' + str(k):>9} {'recall over':>14} "
        f"{'exact s':>8} {'speedup':>8}"
    )
    print(header)
    print("-" * len(header), flush=True)
    for n in sizes:
        feats = clustered_features(n, args.seed)
        t0 = time.perf_counter()
        index = build_index(feats)
        sample = args.query_sample and args.query_sample < n
        if sample:
            t_build = time.perf_counter() - t0
            queried = np.sort(np.random.default_rng(args.seed + 1).choice(n, args.query_sample, replace=False))
            ids = np.full((n, k), -1, dtype=np.int64)
            t0 = time.perf_counter()
            for start in range(0, len(queried), MINE_BATCH):
                part = queried[start : start + MINE_BATCH]
                found = search(index, feats[part], k + 1)[1]
                ids[part] = [row[row != r][:k] for row, r in zip(found, part)]
            per_query = (time.perf_counter() - t0) / len(queried)
            t_mine = t_build + n * per_query
            print(f"build {t_build:.1f} s, {1 / per_query:,.0f} queries/s over {len(queried):,} queries", flush=True)
        else:
            ids, _ = mine_neighbors(feats, k=k, index=index)
            t_mine = time.perf_counter() - t0
        info = describe_index(index)
        kind = info["kind"] + (f" nlist={info['nlist']} nprobe={info['nprobe']}" if info["kind"] == "ivf" else "")
        del index

        x = _normalized(feats, "features")
        if n <= EXACT_ALL_UP_TO:
            rows = np.arange(n)
            t0 = time.perf_counter()
            truth = exact_neighbors(x, rows, k)
            t_exact = time.perf_counter() - t0
            over = f"all {n:,}"
            exact_col, speed_col = f"{t_exact:8.1f}", f"{t_exact / t_mine:7.1f}x"
        else:
            pool = queried if sample else np.arange(n)
            rows = np.sort(np.random.default_rng(args.seed).choice(pool, min(SAMPLE_QUERIES, len(pool)), replace=False))
            truth = exact_neighbors(x, rows, k)
            over = f"{len(rows):,} sampled"
            exact_col, speed_col = f"{'-':>8}", f"{'-':>8}"
        print(
            f"{n:>9,}  {kind:<28} {t_mine:8.1f} {recall(ids[rows], truth):9.4f} {over:>14} {exact_col} {speed_col}"
            + (" (mine s projected)" if sample else ""),
            flush=True,
        )
        if args.hnsw:
            t0 = time.perf_counter()
            hnsw_ids = hnsw_neighbors(x, k)
            t_hnsw = time.perf_counter() - t0
            label = f"hnsw M={HNSW_M} ef={HNSW_EF_SEARCH}"
            print(f"{n:>9,}  {label:<28} {t_hnsw:8.1f} {recall(hnsw_ids[rows], truth):9.4f} {over:>14}", flush=True)


if __name__ == "__main__":
    main()
