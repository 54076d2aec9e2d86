"""Cost curves for docs/scaling.md that the other benches do not give: ingest and result writing.

    python bench/scaling.py ingest --sizes 2000 20000        # a folder of 32x32 RGB PNGs -> ImageSet
    python bench/scaling.py copy --rows 100000 1000000 --db postgresql://postgres@127.0.0.1:5432/test
    python bench/scaling.py index --sizes 10000 100000 300000 --shards 2

ingest: `ml.data.load_source` on a folder of PNGs plus `ImageSet.save` (what the cpu worker does),
in MB/s of PNG bytes and images/s; the baseline is reading the same files' bytes without decoding.
copy: assignments rows (run_id, item_index, cluster, confidence) into PostgreSQL, COPY row by row
as `app/services/results.py` does, against one executemany INSERT of the same rows (the baseline),
both into a temporary table shaped like `assignments`, in rows/s.
index: for each N, 128-d clustered features (`bench/mining.py`'s mixture) through what the mining
stage does: `build_index` (exact up to 50k, IVF beyond) and `mine_neighbors` K=20, timed together;
then the same with the index cut into `--shards` faiss shards (the ratio against the unsharded run
above it, and the count of rows whose neighbours differ from the unsharded ones: 0 is identical);
then the index saved and loaded as the API loads a run's `index.faiss`, and single-vector k=10
searches (what one `/neighbors` query does in process, without HTTP), p50/p99 over 300 queries.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def ingest(sizes: list[int]) -> None:
    from PIL import Image

    from ml.data import load_source

    rng = np.random.default_rng(0)
    print(f"{'images':>8} {'PNG MB':>8} {'ingest s':>9} {'MB/s':>7} {'img/s':>8} {'raw read MB/s':>14} {'ratio':>6}")
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "images"
            for c in range(10):
                (folder / f"class{c}").mkdir(parents=True)
            # Smooth random images (a few blobs), so PNG compresses them as it would photos, not noise.
            base = rng.integers(0, 255, size=(64, 4, 4, 3), dtype=np.uint8)
            for i in range(n):
                img = np.kron(base[i % 64], np.ones((8, 8, 1), dtype=np.uint8))
                img = np.clip(img.astype(np.int16) + rng.integers(-8, 8, img.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"class{i % 10}" / f"{i}.png")
            files = sorted(folder.rglob("*.png"))
            mb = sum(f.stat().st_size for f in files) / 1e6
            t0 = time.perf_counter()
            for f in files:
                f.read_bytes()
            raw = time.perf_counter() - t0
            t0 = time.perf_counter()
            data = load_source(folder)
            data.save(Path(tmp) / "out")
            took = time.perf_counter() - t0
            assert data.n == n
            print(
                f"{n:>8} {mb:>8.1f} {took:>9.2f} {mb / took:>7.1f} {n / took:>8.0f} {mb / raw:>14.1f} "
                f"{raw / took:>6.3f}",
                flush=True,
            )


def copy(rows: list[int], db: str) -> None:
    import psycopg

    print(f"{'rows':>9} {'COPY s':>8} {'COPY rows/s':>12} {'INSERT s':>9} {'INSERT rows/s':>14} {'ratio':>6}")
    with psycopg.connect(db) as conn:
        conn.execute(
            "CREATE TEMP TABLE bench_assignments (run_id varchar(36), item_index integer, "
            "cluster integer, confidence double precision)"
        )
        for n in rows:
            cluster = np.random.default_rng(0).integers(0, 100, n)
            confidence = np.random.default_rng(1).random(n)
            run_id = "00000000-0000-0000-0000-000000000000"
            conn.execute("TRUNCATE bench_assignments")
            t0 = time.perf_counter()
            with (
                conn.cursor() as cur,
                cur.copy("COPY bench_assignments (run_id, item_index, cluster, confidence) FROM STDIN") as cp,
            ):
                for i, (c, p) in enumerate(zip(cluster.tolist(), confidence.tolist())):
                    cp.write_row((run_id, i, c, p))
            conn.commit()
            t_copy = time.perf_counter() - t0
            conn.execute("TRUNCATE bench_assignments")
            t0 = time.perf_counter()
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO bench_assignments VALUES (%s, %s, %s, %s)",
                    [(run_id, i, c, p) for i, (c, p) in enumerate(zip(cluster.tolist(), confidence.tolist()))],
                )
            conn.commit()
            t_insert = time.perf_counter() - t0
            print(
                f"{n:>9} {t_copy:>8.2f} {n / t_copy:>12,.0f} {t_insert:>9.2f} {n / t_insert:>14,.0f} "
                f"{t_insert / t_copy:>6.1f}",
                flush=True,
            )


def index(sizes: list[int], shards: int) -> None:
    from bench.mining import clustered_features
    from ml.index import build_index, describe_index, load_index, mine_neighbors, save_index, search

    print(
        f"{'N':>9} {'index':>22} {'mine s':>8} {f'{shards} shards s':>11} {'ratio':>6} {'rows differ':>11} "
        f"{'search p50 ms':>14} {'p99 ms':>7}"
    )
    for n in sizes:
        x = clustered_features(n, seed=0)
        t0 = time.perf_counter()
        whole = build_index(x)
        ids, _ = mine_neighbors(x, k=20, index=whole)
        mine_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        sharded = build_index(x, shards=shards)
        sharded_ids, _ = mine_neighbors(x, k=20, index=sharded)
        shard_s = time.perf_counter() - t0
        differ = int((ids != sharded_ids).any(axis=1).sum())  # 0: the same neighbours, in order
        del sharded, sharded_ids
        info = describe_index(whole)
        kind = info["kind"] + (f" nlist={info['nlist']} nprobe={info['nprobe']}" if info["kind"] == "ivf" else "")
        with tempfile.TemporaryDirectory() as tmp:
            save_index(whole, Path(tmp) / "index.faiss")
            del whole
            served = load_index(Path(tmp) / "index.faiss")
            queries = clustered_features(300, seed=1)
            for q in queries[:20]:
                search(served, q, 10)  # warm-up
            lat = []
            for q in queries:
                t0 = time.perf_counter()
                search(served, q, 10)
                lat.append(time.perf_counter() - t0)
        p50, p99 = np.percentile(np.array(lat) * 1000, [50, 99])
        print(
            f"{n:>9} {kind:>22} {mine_s:>8.1f} {shard_s:>11.1f} {shard_s / mine_s:>6.2f} {differ:>11} "
            f"{p50:>14.2f} {p99:>7.2f}",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    a = sub.add_parser("ingest")
    a.add_argument("--sizes", type=int, nargs="+", default=[2_000, 20_000])
    b = sub.add_parser("copy")
    b.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    b.add_argument("--db", default="postgresql://postgres@127.0.0.1:5432/test")
    c = sub.add_parser("index")
    c.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 300_000])
    c.add_argument("--shards", type=int, default=2)
    args = ap.parse_args()
    if args.what == "ingest":
        ingest(args.sizes)
    elif args.what == "copy":
        copy(args.rows, args.db)
    else:
        index(args.sizes, args.shards)


if __name__ == "__main__":
    main()
