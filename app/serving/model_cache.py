"""Finished runs loaded for serving: model, dynamic batcher, faiss index and assignments.

Each run is loaded once per process and kept in a bounded LRU (`model_cache_size` runs); a run
that falls out of the cache has its batcher closed. Loading is thread-safe: concurrent first
requests for the same run wait for one load instead of loading twice, while other runs keep
being served. The parts a route does not need (the index, the features) load on first use.

    served = model_cache().get(run_dir)         # blocking: call it from a worker thread
    probs = await served.batcher.submit(images)
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from app.observability import MODEL_LOADS, PREDICT_QUEUE, observe_batch
from app.serving.batcher import DynamicBatcher
from ml.clusters import matched_labels, read_clusters
from ml.rundir import RunDir


def _settings():
    from app.core.settings import get_settings

    return get_settings()


def serving_device() -> str:
    configured = _settings().serving_device
    if configured != "auto":
        return configured
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class ServedRun:
    """Everything about one finished run that /predict and /neighbors read."""

    run_dir: Path
    predictor: Any  # ml.predictor.Predictor
    batcher: DynamicBatcher
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _index: Any = field(default=None, repr=False)
    _index_lock: threading.Lock | None = field(default=None, repr=False)

    @property
    def rundir(self) -> RunDir:
        return RunDir(self.run_dir)

    @property
    def num_clusters(self) -> int:
        n = getattr(self.predictor, "num_clusters", None)
        return int(n) if n is not None else int(self.assignments["probs"].shape[1])

    @cached_property
    def assignments(self) -> dict[str, np.ndarray]:
        with np.load(self.rundir.assignments_path) as npz:
            return {k: npz[k] for k in npz.files}

    @cached_property
    def cluster_labels(self) -> list[str | None] | None:
        """Matched label name per cluster (Hungarian mapping of the run's evaluation), if any."""
        return matched_labels(read_clusters(self.rundir.clusters_path), self.num_clusters)

    @cached_property
    def features(self) -> np.ndarray:
        """The stored (N, D) features the index was built on; memory-mapped."""
        return np.load(self.rundir.features_path, mmap_mode="r")

    @property
    def index(self):
        """The run's faiss index (written at mining time), loaded on first use."""
        with self._lock:
            if self._index is None:
                from ml.index import gpu_available, load_index

                gpu = gpu_available()
                self._index = load_index(self.rundir.index_path, use_gpu=gpu)
                # faiss GPU indexes are not thread-safe even for searches; CPU ones are.
                self._index_lock = threading.Lock() if gpu else None
            return self._index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        from ml.index import search

        index = self.index
        if self._index_lock is None:
            return search(index, queries, k)
        with self._index_lock:
            return search(index, queries, k)

    def close(self) -> None:
        self.batcher.close()


@lru_cache(maxsize=4096)
def _resolved(run_dir: str) -> str:
    return str(Path(run_dir).resolve())


def _key(run_dir: str | Path) -> str:
    """The cache key of a run directory: its resolved path. Resolving stats every component of the
    path, and /predict asks for every request: a run directory's place is fixed once it has finished,
    so each path is resolved once per process."""
    return _resolved(str(run_dir))


class ModelCache:
    """A bounded LRU of `ServedRun`s keyed by run directory."""

    def __init__(
        self, capacity: int = 4, max_batch_size: int = 64, max_delay_ms: float = 5.0, instances: int = 1
    ) -> None:
        self.capacity = max(1, capacity)
        self.max_batch_size = max_batch_size
        self.max_delay_ms = max_delay_ms
        self.instances = instances
        self._entries: OrderedDict[str, ServedRun] = OrderedDict()
        self._loading: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, run_dir: str | Path) -> ServedRun:
        key = _key(run_dir)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:  # one loader per run; the others wait here and then find it cached
            with self._lock:
                if key in self._entries:
                    self._entries.move_to_end(key)
                    return self._entries[key]
            served = self._load(Path(key))
            with self._lock:
                self._entries[key] = served
                self._loading.pop(key, None)
                evicted = []
                while len(self._entries) > self.capacity:
                    evicted.append(self._entries.popitem(last=False)[1])
            for old in evicted:
                old.close()
            return served

    def peek(self, run_dir: str | Path) -> ServedRun | None:
        """The run if it is loaded already (no I/O once the path has been seen: safe on the event
        loop), else None."""
        key = _key(run_dir)
        with self._lock:
            served = self._entries.get(key)
            if served is not None:
                self._entries.move_to_end(key)
            return served

    def _load(self, run_dir: Path) -> ServedRun:
        from ml.predictor import Predictor

        device = serving_device()
        predictor = Predictor.load(run_dir, device=device)
        MODEL_LOADS.inc()
        batcher = DynamicBatcher(
            predictor.predict,
            max_batch_size=self.max_batch_size,
            max_delay_ms=self.max_delay_ms,
            # Concurrent batches on one GPU only queue behind each other on its stream.
            instances=self.instances if device == "cpu" else 1,
            on_batch=observe_batch,
        )
        return ServedRun(run_dir=run_dir, predictor=predictor, batcher=batcher)

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def queue_rows(self) -> int:
        with self._lock:
            entries = list(self._entries.values())
        return sum(e.batcher.queue_depth() for e in entries)

    def clear(self) -> None:
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
        for e in entries:
            e.close()


def load_served(run_dir: Path) -> ServedRun:
    """Blocking (reads model and arrays on first use): call from a worker thread."""
    return model_cache().get(run_dir)


async def served_run(run_dir: Path) -> ServedRun:
    """The loaded run: straight from the cache when it is there, else loaded in a worker thread
    (a thread hop costs more than the lookup itself on a busy machine)."""
    from starlette.concurrency import run_in_threadpool

    return model_cache().peek(run_dir) or await run_in_threadpool(load_served, run_dir)


def set_torch_threads(threads: int, instances: int) -> int:
    """Set this process's torch intra-op threads for serving: `threads`, or with 0 the cores divided
    among `instances` (torch's default left alone with one instance). Answers the count in force."""
    import torch

    from ml.device import cpu_cores

    if threads == 0 and instances > 1:
        threads = max(1, cpu_cores() // instances)
    if threads > 0 and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return torch.get_num_threads()


_cache: ModelCache | None = None
_cache_lock = threading.Lock()


def model_cache() -> ModelCache:
    """The process-wide cache, sized from settings on first use."""
    global _cache
    with _cache_lock:
        if _cache is None:
            s = _settings()
            set_torch_threads(s.serving_torch_threads, s.serving_instances)
            _cache = ModelCache(
                capacity=s.model_cache_size,
                max_batch_size=s.predict_max_batch_size,
                max_delay_ms=s.predict_max_delay_ms,
                instances=s.serving_instances,
            )
            cache = _cache
            PREDICT_QUEUE.set_function(lambda: float(cache.queue_rows()))
        return _cache
