"""Results in the database: written once by the finalize task (bulk), read by the API."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, func, insert, select
from sqlalchemy.orm import Session

from app.core.errors import Conflict, NotFound
from app.tables import Assignment, Cluster, Run, RunEvent, RunMetrics, RunState, utcnow
from ml.clusters import ClusterSummary, read_clusters
from ml.rundir import RunDir


def write_results(session: Session, run: Run, run_dir: Any = None) -> int:
    """Load assignments.npz, clusters.json and metrics.json from the run dir (`run_dir`, the worker's
    local copy, or the run's own folder) into the tables.

    Idempotent (a redelivered finalize replaces what is there). Assignments go in bulk: COPY on
    PostgreSQL, one executemany INSERT elsewhere; never one ORM object per row.
    """
    import numpy as np

    rd = RunDir(run_dir or run.run_dir)
    with np.load(rd.assignments_path) as npz:
        cluster = np.asarray(npz["cluster"], dtype=np.int64)
        confidence = np.asarray(npz["confidence"], dtype=np.float64)
    clusters = read_clusters(rd.clusters_path)
    metrics = rd.read_json(rd.metrics_path, {}) or {}

    for table in (Assignment, Cluster, RunMetrics):
        session.execute(delete(table).where(table.run_id == run.id))
    _bulk_assignments(session, run.id, cluster, confidence)
    if clusters:
        session.execute(insert(Cluster), [_cluster_row(run.id, c) for c in clusters])
    session.add(RunMetrics(run_id=run.id, metrics=metrics))
    run.state, run.finished_at, run.lease_token, run.stage = RunState.SUCCEEDED, utcnow(), None, None
    session.add(
        RunEvent(
            run_id=run.id,
            kind="state",
            message=f"run succeeded: {len(cluster)} items assigned",
            data={"state": RunState.SUCCEEDED},
        )
    )
    session.commit()
    return len(cluster)


def _bulk_assignments(session: Session, run_id: str, cluster, confidence) -> None:
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        raw = connection.connection.driver_connection  # psycopg 3, same transaction as the session
        with (
            raw.cursor() as cur,
            cur.copy("COPY assignments (run_id, item_index, cluster, confidence) FROM STDIN") as copy,
        ):
            for i, (c, p) in enumerate(zip(cluster.tolist(), confidence.tolist())):
                copy.write_row((run_id, i, c, p))
        return
    session.execute(
        insert(Assignment),
        [
            {"run_id": run_id, "item_index": i, "cluster": c, "confidence": p}
            for i, (c, p) in enumerate(zip(cluster.tolist(), confidence.tolist()))
        ],
    )


def _cluster_row(run_id: str, c: ClusterSummary) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "index": c.cluster,
        "size": c.size,
        "mean_confidence": c.mean_confidence,
        "prototype": c.prototype,
        "top_items": c.top_items,
        "matched_label": c.matched_label,
    }


def _require_finished(run: Run) -> None:
    if run.state != RunState.SUCCEEDED:
        raise Conflict(f"run {run.id} is {run.state}; results exist once it has SUCCEEDED")


def clusters(session: Session, run: Run) -> list[Cluster]:
    _require_finished(run)
    return list(session.scalars(select(Cluster).where(Cluster.run_id == run.id).order_by(Cluster.index)))


def cluster(session: Session, run: Run, index: int) -> Cluster:
    _require_finished(run)
    row = session.get(Cluster, (run.id, index))
    if row is None:
        raise NotFound(f"run {run.id} has no cluster {index}")
    return row


ORDERS = {
    "item": (Assignment.item_index,),
    "confidence_desc": (Assignment.confidence.desc(), Assignment.item_index),
    "confidence_asc": (Assignment.confidence.asc(), Assignment.item_index),
}


def assignments(
    session: Session,
    run: Run,
    *,
    cluster: int | None,
    min_confidence: float | None,
    page: int,
    page_size: int,
    order: str = "item",
) -> tuple[list[Assignment], int]:
    _require_finished(run)
    query = select(Assignment).where(Assignment.run_id == run.id)
    if cluster is not None:
        query = query.where(Assignment.cluster == cluster)
    if min_confidence is not None:
        query = query.where(Assignment.confidence >= min_confidence)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(*ORDERS[order]).limit(page_size).offset((page - 1) * page_size))
    return list(rows), total


def metrics(session: Session, run: Run) -> dict[str, Any]:
    _require_finished(run)
    row = session.get(RunMetrics, run.id)
    if row is None:
        raise NotFound(f"run {run.id} has no metrics")
    return row.metrics


def stage_metrics(session: Session, run: Run) -> dict[str, Any]:
    """What the stages measured so far, also while the run is still going: the finalized copy in
    the database once the run SUCCEEDED, else the run directory's metrics.json."""
    row = session.get(RunMetrics, run.id)
    if row is not None and isinstance(row.metrics, dict) and row.metrics:
        return row.metrics
    if not run.run_dir:
        return {}
    rd = RunDir(run.run_dir)
    return rd.read_json(rd.metrics_path, default={}) or {}
