"""Latency and recall@10 of the /neighbors search path for 100k and 1M stored 128-d vectors.

    python bench/neighbors.py                    # 100k and 1M, in-process and over HTTP
    python bench/neighbors.py --sizes 100000 --no-http

For each size: clustered synthetic features (a Gaussian mixture, like learned features, which
approximate indexes rely on) are indexed with `ml.index.build_index`, the code mining uses (exact
up to 50k vectors, IVF beyond), and written as a run's `index.faiss`. Then single-vector queries
(held-out points of the same mixture) go through
- in-process: `ServedRun.search`, what the route calls, on the loaded index file;
- over HTTP: POST /v1/runs/{id}/neighbors {"k": 10, "query": {"vectors": [...]}} to a real uvicorn
  process (the run's model files are random-weight stand-ins; this route does not run them);
and recall@10 is measured against exact brute-force inner-product search on the same vectors.
Target: p50 <= 10 ms with recall >= 0.95 at 1M.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DIM = 128


def mixture(n: int, centers: np.ndarray, rng: np.random.Generator, spread: float = 0.35) -> np.ndarray:
    labels = rng.integers(0, len(centers), n)
    x = centers[labels] + spread * rng.standard_normal((n, DIM), dtype=np.float32) / np.sqrt(DIM)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def exact_top(features: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    import faiss

    _, ids = faiss.knn(queries, features, k, metric=faiss.METRIC_INNER_PRODUCT)
    return ids


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def pct(lat_s: list[float]) -> str:
    ms = np.array(lat_s) * 1000
    return f"p50 {np.percentile(ms, 50):.2f} ms, p99 {np.percentile(ms, 99):.2f} ms"


def bench_size(n: int, args, rng: np.random.Generator, tmp: Path) -> None:
    from app.serving.model_cache import ModelCache
    from ml.index import build_index, describe_index, save_index

    centers = rng.standard_normal((1000, DIM), dtype=np.float32)
    features = mixture(n, centers, rng)
    queries = mixture(args.queries, centers, rng)
    run_dir = tmp / f"run-{n}"
    run_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    index = build_index(features, use_gpu=False)
    build_s = time.perf_counter() - t0
    save_index(index, run_dir / "index.faiss")
    del index
    np.save(run_dir / "features.npy", features)
    np.savez(run_dir / "assignments.npz", cluster=rng.integers(0, 10, n), confidence=np.ones(n, np.float32))
    truth = exact_top(features, queries, args.k)

    # In-process: the route's path (ServedRun.search on the index loaded from the run's file).
    from bench.serve import synthetic_run

    synthetic_run(run_dir, "convnet", 8, 1, 10)
    served = ModelCache(capacity=1).get(run_dir)
    info = describe_index(served.index)
    lat, found = [], []
    for q in queries[:20]:
        served.search(q[None], args.k)  # warm-up
    for q in queries:
        t0 = time.perf_counter()
        _, ids = served.search(q[None], args.k)
        lat.append(time.perf_counter() - t0)
        found.append(ids[0])
    kind = f"{info['kind']}" + (f" nlist={info['nlist']} nprobe={info['nprobe']}" if info["kind"] == "ivf" else "")
    print(
        f"{n:>9,} vectors ({kind}, built in {build_s:.1f} s): in-process search {pct(lat)}, "
        f"recall@{args.k} {recall(np.array(found), truth):.3f}"
    )

    if args.http:
        from bench.serve import register_runs, start_api
        from scan_client import Client

        key, (run_id,) = register_runs(tmp / f"var-{n}", [(run_dir, 8, 1, 10)])
        proc, base = start_api(tmp / f"var-{n}", {})
        try:
            with Client(base, key, timeout=300) as scan:
                scan.neighbors(run_id, vectors=[queries[0].tolist()], k=args.k)  # loads the index in the server
                lat, found = [], []
                for q in queries:
                    vector = [q.tolist()]
                    t0 = time.perf_counter()
                    answer = scan.neighbors(run_id, vectors=vector, k=args.k)
                    lat.append(time.perf_counter() - t0)
                    found.append([h.item for h in answer.results[0].neighbors])
            print(
                f"{n:>9,} vectors over HTTP /neighbors: {pct(lat)}, recall@{args.k} "
                f"{recall(np.array(found), truth):.3f}"
            )
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    served.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--no-http", dest="http", action="store_false")
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPUs; {DIM}-d vectors; {args.queries} single-vector queries per size")
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench-neighbors-"))
    for n in args.sizes:
        bench_size(n, args, rng, tmp)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
