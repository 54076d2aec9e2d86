"""Assignment jobs: a tenant's dataset assigned to one of its finished models, on the workers.

The API side (``create``, ``get``, ``list_``, ``cancel``, ``resume``, ``assignments``) checks that the
dataset and the model belong to the tenant; the worker side (``execute``) works like a run's stage:
a lease taken with one conditional UPDATE (a duplicate message is a no-op), batches of
``batch_size`` images whose rows are written in bulk (COPY on PostgreSQL) in the same transaction
that moves the checkpoint (``processed``), a cancel flag polled between batches, and at the end the
drift report (``ml.drift``) against the training set of the run. A worker that dies stops
heart-beating; the dispatcher re-sends the job after ``stale_after_s`` and it resumes at the
checkpoint.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, func, insert, or_, select, update
from sqlalchemy.orm import Session

from app.core.errors import Conflict, Invalid, NotFound
from app.core.faults import is_infrastructure_error
from app.core.queue import enqueue_job
from app.core.settings import Settings
from app.services import datasets as dataset_service
from app.services import webhooks
from app.services.execution import refresh_lease
from app.tables import (
    AssignmentJob,
    Dataset,
    DatasetState,
    JobAssignment,
    JobState,
    ModelVersion,
    RegisteredModel,
    Run,
    RunState,
    Tenant,
    owned,
    utcnow,
)

if TYPE_CHECKING:
    from app.services.registry import ClusterMap

log = logging.getLogger("scan.worker")


class LeaseLost(Exception):
    """Another task took the job over (this one was presumed dead), or it was canceled meanwhile."""


class Canceled(Exception):
    pass


# --- API side ----------------------------------------------------------------------------------


def resolve_model(session: Session, tenant: Tenant, reference: str) -> Run:
    """The tenant's finished run a model reference names now: a run id, or a registered model
    (``name``, ``name@alias``, ``name/versions/N``, resolved by app/services/registry.py)."""
    from app.services import registry

    run = owned(session, Run, reference, tenant.id)
    if run is None:
        run = registry.resolve(session, tenant, reference).run
    if run.state != RunState.SUCCEEDED:
        raise Conflict(f"run {run.id} is {run.state}; assignment jobs need a SUCCEEDED run")
    return run


def create(session: Session, settings: Settings, tenant: Tenant, body: dict[str, Any]) -> AssignmentJob:
    dataset = dataset_service.get(session, tenant, body["dataset_id"])
    if dataset.state != DatasetState.READY:
        raise Conflict(f"dataset {dataset.id} is {dataset.state}; assignment jobs need a READY dataset")
    run = resolve_model(session, tenant, body["model"])
    trained_on = session.get(Dataset, run.dataset_id)
    if trained_on is not None and trained_on.channels and dataset.channels != trained_on.channels:
        raise Invalid(
            f"dataset {dataset.id} has {dataset.channels}-channel images; run {run.id} was trained on "
            f"{trained_on.channels}-channel images"
        )
    threshold = body.get("confidence_threshold")
    if threshold is None:
        threshold = float(((run.config or {}).get("selflabel") or {}).get("threshold", 0.99))
    job = AssignmentJob(
        tenant_id=tenant.id,
        dataset_id=dataset.id,
        run_id=run.id,
        model=body["model"],
        state=JobState.QUEUED,
        total=int(dataset.count or 0),
        processed=0,
        batch_size=int(body.get("batch_size") or settings.assignment_batch_size),
        confidence_threshold=float(threshold),
        cancel_requested=False,
        attempts=0,
    )
    session.add(job)
    session.commit()
    wake(session, job)
    return job


def wake(session: Session, job: AssignmentJob) -> None:
    """Send the wake-up after the commit; a broker that is down only delays the job (the dispatcher
    sends it: ``dispatched_at`` stays None)."""
    try:
        enqueue_job(job.id)
    except Exception as exc:
        if not is_infrastructure_error(exc):
            raise
        session.rollback()
        return
    session.execute(
        update(AssignmentJob)
        .where(AssignmentJob.id == job.id)
        .values(dispatched_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    session.commit()
    session.refresh(job)


def get(session: Session, tenant: Tenant, job_id: str) -> AssignmentJob:
    job = owned(session, AssignmentJob, job_id, tenant.id)
    if job is None:
        raise NotFound(f"assignment job {job_id} not found (list yours with GET /v1/assignment-jobs)")
    return job


def list_(
    session: Session, tenant: Tenant, *, state: str | None, limit: int, offset: int
) -> tuple[list[AssignmentJob], int]:
    query = select(AssignmentJob).where(AssignmentJob.tenant_id == tenant.id)
    if state:
        query = query.where(AssignmentJob.state == state)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(
        query.order_by(AssignmentJob.created_at.desc(), AssignmentJob.id).limit(limit).offset(offset)
    ).all()
    return list(rows), total


def cancel(session: Session, settings: Settings, tenant: Tenant, job_id: str) -> AssignmentJob:
    """A job no live worker holds ends CANCELED now; a running one stops after its current batch."""
    job = get(session, tenant, job_id)
    if job.state in JobState.TERMINAL:
        raise Conflict(f"assignment job {job.id} already ended ({job.state}); nothing to cancel")
    now = utcnow()
    stale = now - timedelta(seconds=settings.stale_after_s)
    previous = job.state
    idle = session.execute(
        update(AssignmentJob)
        .where(
            AssignmentJob.id == job.id,
            AssignmentJob.state.in_(JobState.ACTIVE),
            or_(AssignmentJob.lease_token.is_(None), AssignmentJob.heartbeat_at < stale),
        )
        .values(state=JobState.CANCELED, finished_at=now, lease_token=None, cancel_requested=True)
        .execution_options(synchronize_session=False)
    ).rowcount
    if idle:
        webhooks.state_changed(session, "assignment_job", job.id, job.tenant_id, JobState.CANCELED, previous)
    else:
        session.execute(
            update(AssignmentJob)
            .where(AssignmentJob.id == job.id)
            .values(cancel_requested=True)
            .execution_options(synchronize_session=False)
        )
    session.commit()
    session.refresh(job)
    return job


def resume(session: Session, settings: Settings, tenant: Tenant, job_id: str) -> AssignmentJob:
    """A FAILED or CANCELED job continues from its checkpoint with a fresh budget of attempts."""
    job = get(session, tenant, job_id)
    if job.state not in (JobState.FAILED, JobState.CANCELED):
        raise Conflict(f"assignment job {job.id} is {job.state}; only FAILED or CANCELED jobs can be resumed")
    run = session.get(Run, job.run_id)
    if run is None or run.state != RunState.SUCCEEDED:
        raise Conflict(f"the model of assignment job {job.id} is no longer a SUCCEEDED run")
    job.state, job.error, job.finished_at, job.cancel_requested = JobState.QUEUED, None, None, False
    job.attempts, job.lease_token, job.heartbeat_at, job.dispatched_at = 0, None, None, None
    session.commit()
    wake(session, job)
    return job


ORDERS = {
    "item": (JobAssignment.item_index,),
    "novelty_desc": (JobAssignment.distance.desc(), JobAssignment.item_index),
    "confidence_asc": (JobAssignment.confidence.asc(), JobAssignment.item_index),
}


def assignments(
    session: Session, job: AssignmentJob, *, cluster: int | None, order: str, limit: int, offset: int
) -> tuple[list[dict[str, Any]], int, int | None]:
    """(rows, total, version): the rows written so far (also while the job runs: they grow batch by
    batch), each with the cluster it is served as and that cluster's name in the job's model
    version (``model_version``; None for a job made with a run id)."""
    query = select(JobAssignment).where(JobAssignment.job_id == job.id)
    if cluster is not None:
        query = query.where(JobAssignment.cluster == cluster)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(*ORDERS[order]).limit(limit).offset(offset))
    version, clusters = model_version(session, job)
    out = [
        {
            "item_index": r.item_index,
            "cluster": r.cluster,
            **served(clusters, r.cluster),
            "confidence": r.confidence,
            "distance": r.distance,
        }
        for r in rows
    ]
    return out, total, version


def drift(session: Session, job: AssignmentJob) -> dict[str, Any]:
    """The stored report, its per-cluster rows and most novel items named as the job's model
    version serves them now (names change without rerunning the job)."""
    if job.state != JobState.SUCCEEDED or job.drift is None:
        raise Conflict(f"assignment job {job.id} is {job.state}; its drift report exists once it has SUCCEEDED")
    _, clusters = model_version(session, job)
    report = dict(job.drift)
    proportions, novelty = dict(report["proportions"]), dict(report["novelty"])
    proportions["clusters"] = [{**row, **served(clusters, row["cluster"])} for row in proportions["clusters"]]
    novelty["most_novel"] = [{**row, **served(clusters, row["cluster"])} for row in novelty["most_novel"]]
    return {**report, "proportions": proportions, "novelty": novelty}


def model_version(session: Session, job: AssignmentJob) -> tuple[int | None, ClusterMap | None]:
    """(number, cluster names and merges) of the version of the job's registered model that
    publishes the job's run: the version the reference resolved to when the job was created, even
    if its alias has moved since (a model publishes a run once). (None, None) when the job named a
    run id or the model is gone: a run's clusters have no names."""
    from app.services import registry

    try:
        name, _alias, _number = registry.parse_reference(job.model)
    except Invalid:
        return None, None
    version = session.scalar(
        select(ModelVersion)
        .join(RegisteredModel, RegisteredModel.id == ModelVersion.model_id)
        .where(
            RegisteredModel.tenant_id == job.tenant_id,
            RegisteredModel.name == name,
            ModelVersion.run_id == job.run_id,
        )
    )
    if version is None:
        return None, None
    return version.version, registry.cluster_map(registry.version_clusters(session, version))


def served(clusters: ClusterMap | None, cluster: int) -> dict[str, Any]:
    """``served_as`` and ``name`` of a run cluster in a version (a run id: itself, no name)."""
    if clusters is None or not 0 <= cluster < len(clusters.target):
        return {"served_as": cluster, "name": None}
    return {"served_as": clusters.target[cluster], "name": clusters.names[cluster]}


# --- worker side -------------------------------------------------------------------------------


def run_job(job_id: str) -> str:
    """The worker's task: claim the job, assign from its checkpoint, write the drift report. A
    duplicate message finds the lease taken and does nothing; an infrastructure error hands the job
    back without spending an attempt; anything else fails it with a message."""
    from app.core.artifacts import synced
    from app.core.db import new_session
    from app.core.settings import get_settings
    from app.services.failures import public_message
    from app.services.run_files import local_dataset_dir, local_run_dir
    from app.services.stage_training import Heartbeat
    from ml.data import ImageSet

    settings = get_settings()
    with new_session() as session:
        token = claim(session, settings, job_id)
        if token is None:
            return "skipped"
        job = session.get(AssignmentJob, job_id)
        try:
            # Loading the model and writing the drift report take a while with no batch committed:
            # the side thread keeps the lease fresh meanwhile.
            with Heartbeat(job_id, token, settings, beat=heartbeat):
                sync = synced(settings)
                run_dir = local_run_dir(settings, session.get(Run, job.run_id), sync)
                images = ImageSet.load(local_dataset_dir(settings, session.get(Dataset, job.dataset_id), sync)).images
                return execute(session, settings, job_id, token, run_dir, images)
        except LeaseLost:
            return "superseded"
        except Exception as exc:
            if is_infrastructure_error(exc):
                try:
                    release(session, job_id, token)
                except Exception:
                    log.exception("assignment job %s: could not hand it back; the stale-lease recovery will", job_id)
                return "interrupted"
            log.exception("assignment job %s failed", job_id)
            fail(session, job_id, token, f"assignment failed: {public_message(exc)}")
            return "failed"


def claim(session: Session, settings: Settings, job_id: str) -> str | None:
    """The lease token, or None (ended, canceled, held by a live task, or out of attempts)."""
    job = session.get(AssignmentJob, job_id)
    if job is None or job.state in JobState.TERMINAL:
        return None
    if job.cancel_requested:
        _end(session, job_id, None, JobState.CANCELED, None)
        return None
    token, now = secrets.token_hex(16), utcnow()
    cutoff = now - timedelta(seconds=settings.stale_after_s)
    won = session.execute(
        update(AssignmentJob)
        .where(
            AssignmentJob.id == job_id,
            AssignmentJob.state.in_(JobState.ACTIVE),
            AssignmentJob.cancel_requested.is_(False),
            or_(AssignmentJob.lease_token.is_(None), AssignmentJob.heartbeat_at < cutoff),
        )
        .values(lease_token=token, heartbeat_at=now, attempts=AssignmentJob.attempts + 1)
        .execution_options(synchronize_session=False)
    ).rowcount
    session.commit()
    if won != 1:
        return None
    session.refresh(job)
    if job.attempts > settings.max_stage_attempts:
        _end(
            session,
            job_id,
            token,
            JobState.FAILED,
            f"the job was started {job.attempts} times and never finished: the worker running it "
            f"stopped heart-beating each time (process killed, e.g. by the OOM killer); giving up "
            f"after max_stage_attempts={settings.max_stage_attempts}. POST /v1/assignment-jobs/"
            f"{job_id}/resume continues from item {job.processed}.",
        )
        return None
    job.state, job.started_at = JobState.RUNNING, job.started_at or now
    session.commit()
    return token


def execute(
    session: Session,
    settings: Settings,
    job_id: str,
    token: str,
    run_dir: str,
    images: Any,
    on_batch: Callable[[], None] | None = None,
) -> str:
    """Assign the job's items from its checkpoint on, then write the drift report. ``images`` is the
    dataset's (N, C, H, W) uint8 array (memory-mapped); ``run_dir`` the run's folder on this machine.
    Returns the job's final state."""
    import numpy as np

    from ml.drift import nearest_distance
    from ml.index import load_index
    from ml.predictor import Predictor
    from ml.rundir import RunDir

    job = session.get(AssignmentJob, job_id)
    predictor = Predictor.load(run_dir, device=settings.serving_device)
    index = load_index(RunDir(run_dir).index_path)
    start, total, size = job.processed, job.total, job.batch_size
    for offset in range(start, total, size):
        if _cancel_requested(session, job_id):
            _end(session, job_id, token, JobState.CANCELED, None)
            return JobState.CANCELED
        batch = np.ascontiguousarray(images[offset : offset + size])
        probs = predictor.predict(batch)
        distance = nearest_distance(index, predictor.embed(batch))
        save_batch(session, job_id, token, offset, probs.argmax(1), probs.max(1), distance)
        if on_batch is not None:
            on_batch()
    report = _drift_report(session, job, run_dir, index)
    _end(session, job_id, token, JobState.SUCCEEDED, None, drift=report)
    return JobState.SUCCEEDED


def save_batch(session: Session, job_id: str, token: str, offset: int, cluster, confidence, distance) -> None:
    """Rows [offset, offset + n) and the checkpoint in one transaction, while the lease is ours.
    Rows a killed attempt left past the checkpoint are replaced."""
    n = len(cluster)
    moved = session.execute(
        update(AssignmentJob)
        .where(AssignmentJob.id == job_id, AssignmentJob.lease_token == token, AssignmentJob.processed == offset)
        .values(processed=offset + n, heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    ).rowcount
    if moved != 1:
        session.rollback()
        raise LeaseLost(f"assignment job {job_id}: the lease was taken over or the job ended")
    session.execute(
        delete(JobAssignment).where(
            JobAssignment.job_id == job_id, JobAssignment.item_index >= offset, JobAssignment.item_index < offset + n
        )
    )
    rows = zip(range(offset, offset + n), cluster.tolist(), confidence.tolist(), distance.tolist())
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        raw = connection.connection.driver_connection  # psycopg 3, same transaction as the session
        with (
            raw.cursor() as cur,
            cur.copy("COPY job_assignments (job_id, item_index, cluster, confidence, distance) FROM STDIN") as copy,
        ):
            for i, c, p, d in rows:
                copy.write_row((job_id, i, c, p, d))
    else:
        session.execute(
            insert(JobAssignment),
            [{"job_id": job_id, "item_index": i, "cluster": c, "confidence": p, "distance": d} for i, c, p, d in rows],
        )
    session.commit()


def heartbeat(session: Session, job_id: str, token: str) -> bool:
    return refresh_lease(session, AssignmentJob, job_id, token)


def fail(session: Session, job_id: str, token: str | None, message: str) -> None:
    _end(session, job_id, token, JobState.FAILED, message)


def release(session: Session, job_id: str, token: str) -> None:
    """Hand the job back after an infrastructure interruption, without spending an attempt."""
    session.rollback()
    session.execute(
        update(AssignmentJob)
        .where(AssignmentJob.id == job_id, AssignmentJob.lease_token == token)
        .values(lease_token=None, heartbeat_at=utcnow(), dispatched_at=None, attempts=AssignmentJob.attempts - 1)
        .execution_options(synchronize_session=False)
    )
    session.commit()


def _end(
    session: Session, job_id: str, token: str | None, state: str, error: str | None, drift: dict | None = None
) -> None:
    session.rollback()
    job = session.get(AssignmentJob, job_id, populate_existing=True)
    if job is None or job.state in JobState.TERMINAL or (token is not None and job.lease_token != token):
        return
    job.state, job.error, job.finished_at, job.lease_token = state, error, utcnow(), None
    if drift is not None:
        job.drift = drift
    session.commit()


def _cancel_requested(session: Session, job_id: str) -> bool:
    return bool(session.scalar(select(AssignmentJob.cancel_requested).where(AssignmentJob.id == job_id)))


def _drift_report(session: Session, job: AssignmentJob, run_dir: str, index: Any) -> dict[str, Any]:
    import numpy as np

    from ml.drift import drift_report, training_nn_distance, training_reference
    from ml.rundir import RunDir

    rd = RunDir(run_dir)
    with np.load(rd.assignments_path) as npz:
        train_cluster, train_conf = npz["cluster"], npz["confidence"]
        num_clusters = int(npz["probs"].shape[1]) if "probs" in npz.files else int(train_cluster.max()) + 1
    features = np.load(rd.features_path, mmap_mode="r")
    ref = training_reference(train_cluster, train_conf, training_nn_distance(index, features), num_clusters)
    rows = session.execute(
        select(JobAssignment.cluster, JobAssignment.confidence, JobAssignment.distance)
        .where(JobAssignment.job_id == job.id)
        .order_by(JobAssignment.item_index)
    ).all()
    arr = np.asarray(rows, dtype=np.float64).reshape(-1, 3)
    return drift_report(ref, arr[:, 0].astype(np.int64), arr[:, 1], arr[:, 2], threshold=job.confidence_threshold)


# --- the outbox's dispatcher -------------------------------------------------------------------


def due_for_dispatch(session: Session, settings: Settings, queue_empty: bool) -> list[str]:
    """Ids of jobs owed a wake-up, each marked dispatched now (conditional UPDATE). Stale leases
    (worker died) are dropped first; then: never sent (older than a moment), or sent longer than
    dispatch_after_s ago while the queue is empty (the message was lost)."""
    now = utcnow()
    stale = now - timedelta(seconds=settings.stale_after_s)
    session.execute(
        update(AssignmentJob)
        .where(
            AssignmentJob.state.in_(JobState.ACTIVE),
            AssignmentJob.lease_token.is_not(None),
            AssignmentJob.heartbeat_at < stale,
        )
        .values(lease_token=None, heartbeat_at=now, dispatched_at=None)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    grace = now - timedelta(seconds=min(5.0, settings.dispatch_after_s))
    old = now - timedelta(seconds=settings.dispatch_after_s)
    never = AssignmentJob.dispatched_at.is_(None) & (
        func.coalesce(AssignmentJob.heartbeat_at, AssignmentJob.created_at) < grace
    )
    owed = or_(never, AssignmentJob.dispatched_at < old) if queue_empty else never
    rows = session.execute(
        select(AssignmentJob.id, AssignmentJob.dispatched_at).where(
            AssignmentJob.state.in_(JobState.ACTIVE), AssignmentJob.lease_token.is_(None), owed
        )
    ).all()
    due = []
    for job_id, seen in rows:
        same = AssignmentJob.dispatched_at.is_(None) if seen is None else AssignmentJob.dispatched_at == seen
        if session.execute(
            update(AssignmentJob)
            .where(AssignmentJob.id == job_id, AssignmentJob.lease_token.is_(None), same)
            .values(dispatched_at=now)
            .execution_options(synchronize_session=False)
        ).rowcount:
            due.append(job_id)
    session.commit()
    return due
