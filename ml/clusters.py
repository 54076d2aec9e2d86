"""`clusters.json`: one summary per cluster of a finished run, written once by the final stage and
read by the service, the exports and the CLI through this one typed model.

The file is a JSON list ordered by cluster index (so entry ``c`` describes cluster ``c``).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, TypeAdapter

from ml.rundir import atomic_write_text


class ClusterSummary(BaseModel):
    cluster: int
    size: int
    mean_confidence: float
    prototype: int | None  # the member closest to the mean of the most confident ones; None if empty
    top_items: list[int]  # the most confident members, most confident first
    matched_label: str | None = None  # the Hungarian match's class name, when the data had labels
    matched_class: int | None = None  # the same match as a class index


_LIST = TypeAdapter(list[ClusterSummary])


def write_clusters(path: Path, clusters: list[ClusterSummary]) -> None:
    if [c.cluster for c in clusters] != list(range(len(clusters))):
        raise ValueError("clusters.json lists every cluster once, in index order")
    atomic_write_text(path, _LIST.dump_json(clusters, indent=1).decode())


def read_clusters(path: Path) -> list[ClusterSummary]:
    """The summaries, or [] when the run has none (yet)."""
    path = Path(path)
    return _LIST.validate_json(path.read_bytes()) if path.exists() else []


def matched_labels(clusters: list[ClusterSummary], num_clusters: int) -> list[str | None] | None:
    """The matched label of each cluster index, or None when no cluster has one."""
    labels: list[str | None] = [None] * num_clusters
    for c in clusters:
        if 0 <= c.cluster < num_clusters:
            labels[c.cluster] = c.matched_label
    return labels if any(label is not None for label in labels) else None
