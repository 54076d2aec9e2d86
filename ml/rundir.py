"""Layout of a run directory: one place that names every file a run reads or writes."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def ensure(self) -> RunDir:
        (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)
        return self

    config_path = property(lambda self: self.path / "config.json")
    pretext_path = property(lambda self: self.path / "pretext.pt")
    scan_model_path = property(lambda self: self.path / "scan.pt")
    model_path = property(lambda self: self.path / "model.pt")
    features_path = property(lambda self: self.path / "features.npy")
    neighbors_path = property(lambda self: self.path / "neighbors.npy")
    index_path = property(lambda self: self.path / "index.faiss")
    assignments_path = property(lambda self: self.path / "assignments.npz")
    clusters_path = property(lambda self: self.path / "clusters.json")
    metrics_path = property(lambda self: self.path / "metrics.json")
    history_path = property(lambda self: self.path / "history.json")
    timings_path = property(lambda self: self.path / "timings.json")

    def checkpoint(self, stage: str) -> Path:
        return self.path / "checkpoints" / f"{stage}.pt"

    def seed(self, index: int) -> SeedDir:
        """The folder of seed `index` of a run trained over several seeds (ml/stages/seeds.py)."""
        return SeedDir(self, index)

    def read_json(self, path: Path, default: Any = None) -> Any:
        if not path.exists():
            return default
        return json.loads(path.read_text())

    def update_json(self, path: Path, key: str, value: Any) -> None:
        data = self.read_json(path, {})
        data[key] = value
        atomic_write_text(path, json.dumps(data, indent=1))


class SeedDir(RunDir):
    """One seed's folder, ``seeds/<index>/`` in the run directory: its own models, checkpoints,
    assignments, metrics and history; the pretext model, features, neighbours and index of the run
    it belongs to (every seed trains on the one pretext and the one mining)."""

    def __init__(self, run: RunDir, index: int):
        super().__init__(run.path / "seeds" / str(index))
        self.run, self.index = run, index

    config_path = property(lambda self: self.run.config_path)
    pretext_path = property(lambda self: self.run.pretext_path)
    features_path = property(lambda self: self.run.features_path)
    neighbors_path = property(lambda self: self.run.neighbors_path)
    index_path = property(lambda self: self.run.index_path)


def save_torch(path: Path, obj: Any) -> None:
    """torch.save, atomically."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, lambda f: f.write(buf.getbuffer()))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: a killed process leaves
    either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
