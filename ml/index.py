"""Nearest-neighbour index over image features (faiss, cosine similarity).

SCAN's second step mines, for every image, the K images whose pretext features are closest
(section 2.2 of the paper: the neighbour set N_X used by the SCAN loss, Eq. 2). Similarity is the
inner product of L2-normalised features, i.e. cosine; every function here normalises its inputs, so
callers pass raw features.

Index choice (measured with `bench/mining.py`, 2 busy CPU cores, 128-d clustered features, k=20):
- N <= exact_threshold (50k by default): exact search, `IndexIDMap2(IndexFlatIP)`; it grows as N^2
  (exact mining of 100k already takes minutes on two cores).
- beyond: `IndexIVFFlat`, nlist ~ 4 sqrt(N) lists trained on ~40 points per list, nprobe from
  `_ivf_nprobe`. HNSW (M=32) lost on both counts: at 1M its graph took 527 s to build (IVF: 73 s
  training + 21 s adding) and reached recall@20 0.87 with efSearch=128 (IVF: 1.00 at nprobe 8-32);
  it also has no faiss GPU version and costs ~256 extra bytes a vector. `write_index` stores the
  IVF's ids and nprobe (a test checks it), so a loaded index searches exactly like the saved one.

Sharding (`shards=S`): the rows are cut into S contiguous blocks, each indexed on its own (on GPU
s mod G when there are G GPUs) under one `faiss.IndexShards` that broadcasts every query and merges
the S top-k lists. All shards are cut from one template: the same flat index, or the same trained IVF
quantizer with the same nprobe, so every query probes the same lists in every shard and the merged
answer is the unsharded one (a test checks ids and scores are identical). Memory and search time per
device divide by S; `save_index` merges the shards back into one index for serving.

    index = build_index(features)                  # exact or IVF, on the GPU when there is one
    index = build_index(features, shards=4)        # the same index cut by rows into 4 shards
    scores, ids = search(index, queries, k=10)
    neighbors, sims = mine_neighbors(features, k=20)   # (N, 20), the image itself excluded
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import faiss
import numpy as np

from ml.device import cpu_cores
from ml.limits import MAX_K

# Queries per faiss call while mining: bounds the (batch, k) result buffers and, for the exact
# index, faiss's internal (batch x N) similarity blocks.
MINE_BATCH = 16_384
# IVF lists: ~4 sqrt(N) (faiss wiki "Guidelines to choose an index"), each trained on ~40 points;
# faiss warns below 39 points per centroid.
IVF_POINTS_PER_LIST = 40
IVF_TRAIN_ITERATIONS = 20
TRAIN_SEED = 1234

P = ParamSpec("P")
R = TypeVar("R")


def on_all_cores(fn: Callable[P, R]) -> Callable[P, R]:
    """Run `fn` with faiss's OpenMP loops on every core this process may run on, then put back the
    thread count the caller had. The OpenMP pool is the process's, torch's intra-op threads
    included: left raised, a worker told OMP_NUM_THREADS=1 beside other jobs trained every stage
    after mining on all cores (measured 5-10x slower on a loaded 2-core machine, docs/fashion.md)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(cpu_cores())
        try:
            return fn(*args, **kwargs)
        finally:
            faiss.omp_set_num_threads(before)

    return wrapper


def gpu_available() -> bool:
    """True when the installed faiss has GPU support and sees at least one GPU (never on faiss-cpu)."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _normalized(x: Any, name: str) -> np.ndarray:
    """A float32, C-contiguous, row-wise L2-normalised copy of a 2-D array (1-D = one row)."""
    if hasattr(x, "detach"):  # torch tensor, possibly on the GPU
        x = x.detach().cpu().numpy()
    arr = np.array(x, dtype=np.float32, order="C", copy=True)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array (n, dim), got shape {arr.shape}")
    faiss.normalize_L2(arr)  # leaves all-zero rows at zero
    # After normalisation every entry is in [-1, 1], so the sum cannot overflow: a non-finite sum
    # means a NaN or inf in the input (inf / inf turns into NaN).
    if not np.isfinite(arr.sum(dtype=np.float64)):
        raise ValueError(f"{name} contain NaN or infinite values")
    return arr


def _check_k(k: Any, ntotal: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an integer, got {k!r}")
    k = int(k)
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must be between 1 and {MAX_K}, got {k}")
    if k > ntotal:
        raise ValueError(f"k={k} exceeds the {ntotal} vectors in the index")
    return k


def _ivf_nlist(n: int) -> int:
    return max(1, min(round(4 * math.sqrt(n)), n // IVF_POINTS_PER_LIST))


def _ivf_nprobe(nlist: int) -> int:
    # Work per query grows with nprobe * N / nlist. On the bench's clustered features recall@20 was
    # >= 0.999 with 16 probes at 100k (nlist 1265) and with 8 at 1M (nlist 4000); 32 probes at 1M
    # put mining at 11 minutes on two shared cores, over the 10-minute budget, so sqrt(nlist) / 4
    # with a floor of 16 (16 at 1M) keeps a 2x margin over what the bench needed.
    return min(nlist, max(16, round(math.sqrt(nlist) / 4)))


def _base_index(index: faiss.Index) -> faiss.Index:
    """The index doing the work, seen through IndexIDMap wrappers, downcast to its real class."""
    index = faiss.downcast_index(index)
    while isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        index = faiss.downcast_index(index.index)
    return index


def _is_gpu(index: faiss.Index) -> bool:
    return type(_base_index(index)).__name__.startswith("Gpu")


def describe_index(index: faiss.Index) -> dict:
    """Kind and search parameters of an index, read from the index itself (so also after load)."""
    parts = _shards(index)
    if parts is not None:
        return {**describe_index(parts[0]), "ntotal": int(index.ntotal), "shards": len(parts)}
    base = _base_index(index)
    info: dict[str, Any] = {"ntotal": int(index.ntotal), "dim": int(index.d), "gpu": _is_gpu(index)}
    if isinstance(base, faiss.IndexHNSW):
        info.update(kind="hnsw", efSearch=int(base.hnsw.efSearch))
    elif hasattr(base, "nprobe") and hasattr(base, "nlist"):
        info.update(kind="ivf", nlist=int(base.nlist), nprobe=int(base.nprobe))
    else:
        info.update(kind="exact")
    return info


def _to_gpu(index: faiss.Index, device: int = 0) -> faiss.Index:
    resources = faiss.StandardGpuResources()
    gpu_index = faiss.index_cpu_to_gpu(resources, device, index)
    # The GPU index only borrows the resources; keep them alive as long as the index.
    gpu_index.referenced_objects = [resources]
    return gpu_index


def _train_ivf(x: np.ndarray) -> faiss.Index:
    """An empty IVF index whose coarse quantizer is trained on a sample of x."""
    n, dim = x.shape
    nlist = _ivf_nlist(n)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = IVF_TRAIN_ITERATIONS
    index.cp.seed = TRAIN_SEED
    n_train = min(n, nlist * IVF_POINTS_PER_LIST)
    sample = np.random.default_rng(TRAIN_SEED).choice(n, size=n_train, replace=False)
    index.train(x[np.sort(sample)])
    index.nprobe = _ivf_nprobe(nlist)
    return index  # faiss's Python wrapper keeps `quantizer` alive with the index


def _empty_index(x: np.ndarray, exact_threshold: int) -> faiss.Index:
    """The index kind x calls for, trained but holding no vectors."""
    if x.shape[0] <= exact_threshold:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(x.shape[1]))
    return _train_ivf(x)


def build_index(
    features: Any, *, exact_threshold: int = 50_000, use_gpu: bool | None = None, ids: Any = None, shards: int = 1
) -> faiss.Index:
    """Index features (N, d) for cosine search: exact up to `exact_threshold` vectors, IVF beyond.

    ids: int64 (N,) external ids returned by `search`; default 0..N-1 (row numbers).
    use_gpu: None = on a GPU when faiss has GPU support and sees one; True requires one.
    shards: cut the rows into this many shards under one `faiss.IndexShards` (same answers).
    """
    return _build(
        _normalized(features, "features"), exact_threshold=exact_threshold, use_gpu=use_gpu, ids=ids, shards=shards
    )


@on_all_cores
def _build(
    x: np.ndarray, *, exact_threshold: int = 50_000, use_gpu: bool | None = None, ids: Any = None, shards: int = 1
) -> faiss.Index:
    n = x.shape[0]
    ids = np.arange(n, dtype=np.int64) if ids is None else np.ascontiguousarray(ids, dtype=np.int64)
    if ids.shape != (n,):
        raise ValueError(f"ids must have shape ({n},), got {ids.shape}")
    if exact_threshold < 1:
        raise ValueError(f"exact_threshold must be >= 1, got {exact_threshold}")
    if use_gpu is None:
        use_gpu = gpu_available()
    elif use_gpu and not gpu_available():
        raise RuntimeError("use_gpu=True but faiss has no GPU support or sees no GPU")

    if isinstance(shards, bool) or not isinstance(shards, (int, np.integer)) or not 1 <= shards <= n:
        raise ValueError(f"shards must be an integer in [1, {n}], got {shards!r}")
    template = _empty_index(x, exact_threshold)
    lists = _ivf_lists(template, x)
    if shards == 1:
        _add(template, x, ids, lists)
        return _to_gpu(template) if use_gpu else template
    # threaded: the shards search in parallel (one per GPU); successive_ids=False: every shard
    # answers with the global ids it was given, so the merged ids need no offset.
    sharded = faiss.IndexShards(x.shape[1], True, False)
    gpus = faiss.get_num_gpus() if use_gpu else 0
    parts = []
    for s, rows in enumerate(np.array_split(np.arange(n), int(shards))):
        part = faiss.clone_index(template)
        lo, hi = rows[0], rows[-1] + 1
        _add(part, x[lo:hi], ids[lo:hi], None if lists is None else lists[lo:hi])
        parts.append(_to_gpu(part, s % gpus) if gpus else part)
        sharded.add_shard(parts[-1])
    sharded.referenced_objects = parts  # the shards must live as long as the index that borrows them
    return sharded


# Rows per block when assigning vectors to IVF lists (bounds the (block, nlist) score buffer).
IVF_ADD_BLOCK = 65_536


def _ivf_lists(template: faiss.Index, x: np.ndarray) -> np.ndarray | None:
    """For an IVF template: every row's list, assigned once over the whole array in fixed blocks
    (None for a flat index). Sharded and unsharded builds both add with these: a shard assigning
    its own rows would run the quantizer's matrix product on other block shapes, whose last-bit
    differences could move a vector lying between two centroids to the other list (the same reason
    `_search` chooses the probed lists once for all shards)."""
    base = faiss.downcast_index(template)
    if not isinstance(base, faiss.IndexIVF):
        return None
    blocks = range(0, x.shape[0], IVF_ADD_BLOCK)
    return np.concatenate([base.quantizer.assign(x[i : i + IVF_ADD_BLOCK], 1).ravel() for i in blocks]).astype(np.int64)


def _add(index: faiss.Index, x: np.ndarray, ids: np.ndarray, lists: np.ndarray | None) -> None:
    """Add rows with their ids; to an IVF index into the lists given (IndexIVF.add_core)."""
    if lists is None:
        index.add_with_ids(x, ids)
        return
    x, ids, lists = (np.ascontiguousarray(a) for a in (x, ids, lists))
    index.add_core(x.shape[0], faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(lists))


def _shards(index: faiss.Index) -> list[faiss.Index] | None:
    """The shards of a `build_index(..., shards=S)` index, or None for an unsharded one."""
    index = faiss.downcast_index(index)
    if not isinstance(index, faiss.IndexShards):
        return None
    return [faiss.downcast_index(index.at(i)) for i in range(index.count())]


def _merged(parts: list[faiss.Index]) -> faiss.Index:
    """One CPU index holding every shard's vectors and ids (the shards are left as they are)."""
    cpu = [faiss.index_gpu_to_cpu(p) if _is_gpu(p) else p for p in parts]
    merged = faiss.clone_index(cpu[0])
    for part in cpu[1:]:
        merged.merge_from(faiss.clone_index(part), 0)  # merge_from empties its argument: give it a copy
    return merged


def search(index: faiss.Index, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most similar indexed vectors for each query: (scores (Q, k) float32, ids (Q, k) int64).

    Scores are cosine similarities. An approximate index can return fewer than k hits for a query;
    the missing slots have id -1 (faiss's convention).
    """
    k = _check_k(k, index.ntotal)
    q = _normalized(queries, "queries")
    if q.shape[1] != index.d:
        raise ValueError(f"queries have dimension {q.shape[1]}, the index {index.d}")
    return _search(index, q, k)


def _search(index: faiss.Index, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """index.search, with the same answer sharded or not.

    For IVF (CPU) the lists each query probes are chosen here, by one quantizer call on the whole
    batch, and every shard (or the one index) scans those lists (IndexIVF.search_preassigned).
    Left to faiss, each shard of an IndexShards runs its quantizer in its own thread, and
    IndexIVF.search runs it on per-thread slices of the batch: the quantizer's BLAS scores change
    in the last bit with the batch shape and thread count, so a query nearly equidistant from its
    16th and 17th list probed different lists sharded and unsharded (300k-vector mining differed).
    Equal scores (duplicate images) are then listed by id, whatever order a heap or a merge left
    them in; TIE_SLACK extra hits decide which of several equal scores at the k-th place are kept.
    """
    wanted = k
    k = min(k + TIE_SLACK, int(index.ntotal))
    parts = _shards(index) or [index]
    bases = [_base_index(p) for p in parts]
    if not all(isinstance(b, faiss.IndexIVF) for b in bases):  # flat, HNSW, GPU indexes
        return _ties_by_id(*index.search(x, k), wanted)
    probe_scores, probes = bases[0].quantizer.search(x, bases[0].nprobe)
    if len(bases) == 1:
        return _ties_by_id(*bases[0].search_preassigned(x, k, probes, probe_scores), wanted)
    with ThreadPoolExecutor(len(bases)) as pool:  # faiss releases the GIL: the shards scan in parallel
        answers = list(pool.map(lambda base: base.search_preassigned(x, k, probes, probe_scores), bases))
    scores, ids = faiss.merge_knn_results(
        np.stack([a[0] for a in answers]), np.stack([a[1] for a in answers]), keep_max=True
    )
    return _ties_by_id(scores, ids, wanted)


# Equal scores at the k-th place are settled by id among k + TIE_SLACK hits: more twins than that of
# one image, straddling the k-th place, could still come back in another order sharded.
TIE_SLACK = 4


def _ties_by_id(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first k of each row by decreasing score, equal scores by increasing id (missing slots,
    id -1, last)."""
    order = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def _drop_self(ids: np.ndarray, scores: np.ndarray, self_ids: np.ndarray):
    """Remove each query's own id from its k+1 results, else (approximate miss) the last column.

    The own id is looked up rather than assumed in column 0: duplicate images tie at similarity 1
    and faiss may list a twin first.
    """
    rows, width = ids.shape
    is_self = ids == self_ids[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), width - 1)
    keep = np.ones(ids.shape, dtype=bool)
    keep[np.arange(rows), drop] = False
    return ids[keep].reshape(rows, width - 1), scores[keep].reshape(rows, width - 1)


@on_all_cores
def mine_neighbors(
    features: Any, k: int = 20, *, index: faiss.Index | None = None, **build_kw: Any
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest neighbours of every sample, itself excluded (SCAN section 2.2).

    Returns (ids (N, k) int64, scores (N, k) float32), neighbours sorted by decreasing similarity.
    index: an index already built on exactly these features with the default ids (saves a second
    build when the caller also keeps the index); otherwise `build_index(features, **build_kw)`.
    """
    x = _normalized(features, "features")
    n = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k < min(n, MAX_K):
        raise ValueError(f"k must be an integer in [1, {min(n, MAX_K) - 1}] for {n} samples, got {k!r}")
    k = int(k)
    if index is None:
        index = _build(x, **build_kw)  # x is normalised already; skip a second copy
    elif index.ntotal != n or index.d != x.shape[1]:
        raise ValueError(f"index holds {index.ntotal}x{index.d} vectors, features are {x.shape}")

    out_ids = np.empty((n, k), dtype=np.int64)
    out_scores = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, MINE_BATCH):
        stop = min(n, start + MINE_BATCH)
        scores, ids = _search(index, x[start:stop], k + 1)
        self_ids = np.arange(start, stop, dtype=np.int64)
        out_ids[start:stop], out_scores[start:stop] = _drop_self(ids, scores, self_ids)

    # An IVF index returns -1 when the probed lists hold fewer than k+1 vectors. A -1 would silently
    # index the last sample downstream, so those rows are answered by exact brute force.
    missing = np.flatnonzero((out_ids < 0).any(axis=1))
    if missing.size:
        scores, ids = faiss.knn(x[missing], x, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
        out_ids[missing], out_scores[missing] = _drop_self(ids, scores, missing.astype(np.int64))
    return out_ids, out_scores


def save_index(index: faiss.Index, path: str | Path) -> None:
    """Write a CPU copy of the index to `path` atomically (temp file in the same folder + rename).
    A sharded index is written as the one unsharded index it equals."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = _shards(index)
    if parts is not None:
        cpu_index = _merged(parts)
    else:
        cpu_index = faiss.index_gpu_to_cpu(index) if _is_gpu(index) else index
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        faiss.write_index(cpu_index, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_index(path: str | Path, mmap: bool = False, use_gpu: bool | None = False) -> faiss.Index:
    """Read an index written by `save_index`, with the nprobe / efSearch it was saved with.

    mmap: map the file instead of reading it (large indexes, shared between processes; read-only).
    use_gpu: False (default) keeps it on the CPU; None = on a GPU when one is available.
    """
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    index = faiss.read_index(str(path), flags)
    if use_gpu is None:
        use_gpu = gpu_available()
    return _to_gpu(index) if use_gpu else index


def neighbor_purity(neighbors: Any, labels: Any) -> float:
    """Fraction of mined neighbours that share their anchor's label (SCAN Fig. 2).

    Slots holding -1 (no neighbour found) are left out of the count.
    """
    neighbors = np.asarray(neighbors)
    labels = np.asarray(labels)
    if neighbors.ndim != 2 or labels.ndim != 1 or neighbors.shape[0] != labels.shape[0]:
        raise ValueError(f"need neighbors (N, k) and labels (N,), got {neighbors.shape} and {labels.shape}")
    valid = neighbors >= 0
    if not valid.any():
        raise ValueError("no valid neighbour ids")
    same = labels[np.where(valid, neighbors, 0)] == labels[:, None]
    return float(same[valid].mean())
