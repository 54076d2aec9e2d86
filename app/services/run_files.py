"""A run's and a dataset's files on the machine of the process that needs them.

With an artifact store, each machine works on its own copy under its artifacts folder, brought up
to date from the store before use and pushed back after each epoch; without one, every process
reads and writes the shared folders the rows name.
"""

from __future__ import annotations

from pathlib import Path

from app.core.artifacts import Synced, synced
from app.core.settings import Settings
from app.tables import Dataset, Run


def local_run_dir(settings: Settings, run: Run, sync: Synced | None = None) -> str:
    """The run's folder on this machine (pulled from the store first when there is one)."""
    sync = sync or synced(settings)
    if sync.store is None:
        return run.run_dir
    sync.pull(f"runs/{run.id}")
    return str(settings.runs_dir / run.id)


def local_dataset_dir(settings: Settings, dataset: Dataset, sync: Synced | None = None) -> Path:
    """The ingested dataset's folder on this machine (pulled from the store first when there is one)."""
    sync = sync or synced(settings)
    if sync.store is None:
        return Path(dataset.storage_path)
    sync.pull(f"datasets/{dataset.id}")
    return settings.datasets_dir / dataset.id
