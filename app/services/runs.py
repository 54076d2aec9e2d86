"""Runs as the API sees them: submit (validated against ml.config), list, read, cancel, retry, events."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.artifacts import synced
from app.core.db import new_session
from app.core.errors import Conflict, Invalid, NotFound, Unavailable
from app.core.faults import is_infrastructure_error, which_service
from app.core.queue import enqueue_stage
from app.core.settings import Settings, get_settings
from app.services import datasets as dataset_service
from app.services import devices, webhooks, weights
from app.tables import DatasetState, Run, RunEvent, RunState, StageState, StageStatus, Tenant, owned, utcnow
from ml.rundir import RunDir
from ml.stages import STAGES


def request_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def validate_config(preset: str, num_clusters: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    """RunConfig.from_preset; a pydantic.ValidationError reaches the 422 handler with field paths."""
    from pydantic import ValidationError

    from ml.config import RunConfig

    try:
        return RunConfig.from_preset(preset, num_clusters=num_clusters, overrides=overrides).model_dump(mode="json")
    except ValidationError:
        raise
    except (ValueError, TypeError, AttributeError) as exc:  # unknown preset, overrides of the wrong shape
        raise Invalid(f"invalid run configuration: {exc}") from exc


def _overrides(body: dict[str, Any]) -> dict[str, Any]:
    """The body's overrides with its top-level run options (seeds) folded in; the two may not
    disagree."""
    overrides = dict(body.get("overrides") or {})
    if body.get("seeds") is not None:
        given = overrides.get("seeds", body["seeds"])
        if given != body["seeds"]:
            raise Invalid(f"seeds: the body says {body['seeds']}, overrides.seeds says {given!r}; give one")
        overrides["seeds"] = body["seeds"]
    return overrides


def submit(
    session: Session, settings: Settings, tenant: Tenant, body: dict[str, Any], idempotency_key: str | None
) -> tuple[Run, bool]:
    """create, then wake a worker. The run is committed before the broker hears of it; if the
    broker cannot be reached the run is withdrawn and the client gets 503 (its key stays free)."""
    run, created = create(session, settings, tenant, body, idempotency_key)
    if created:
        try:
            dispatch(session, run)
        except Exception as exc:
            if not is_infrastructure_error(exc):
                raise
            withdraw(session, run)
            raise Unavailable(
                f"the {which_service(exc)} is unreachable, so the run was not started "
                f"({type(exc).__name__}); retry the same request (same Idempotency-Key) "
                "in a few seconds"
            ) from exc
    return run, created


def create(
    session: Session, settings: Settings, tenant: Tenant, body: dict[str, Any], idempotency_key: str | None
) -> tuple[Run, bool]:
    """Returns (run, created). Same Idempotency-Key and body: the first run, created=False."""
    digest = request_hash(body)
    if idempotency_key:
        existing = _by_idempotency_key(session, tenant, idempotency_key)
        if existing is not None:
            return _replay(existing, digest, idempotency_key), False
    dataset = dataset_service.get(session, tenant, body["dataset_id"])
    if dataset.state != DatasetState.READY:
        raise Conflict(f"dataset {dataset.id} is {dataset.state}; runs need a READY dataset")
    config = validate_config(body["preset"], body["num_clusters"], _overrides(body))
    weights.check_reference(session, tenant, config)
    _check_num_clusters(body["num_clusters"], dataset.count)
    config, estimate = devices.plan(session, settings, config, dataset, body.get("budget_minutes"))
    run = Run(
        tenant_id=tenant.id,
        dataset_id=dataset.id,
        config=config,
        estimate=estimate,
        idempotency_key=idempotency_key,
        request_hash=digest,
        stage=STAGES[0],
    )
    session.add(run)
    try:
        session.flush()
    except IntegrityError:  # a concurrent request with the same key won the race
        session.rollback()
        existing = _by_idempotency_key(session, tenant, idempotency_key or "")
        if existing is None:
            raise
        return _replay(existing, digest, idempotency_key or ""), False
    run.run_dir = str(settings.runs_dir / run.id)
    for stage in STAGES:
        session.add(StageStatus(run_id=run.id, stage=stage, state=StageState.PENDING))
    session.add(RunEvent(run_id=run.id, kind="state", message="run queued", data={"state": RunState.QUEUED}))
    session.commit()
    return run, True


def _check_num_clusters(asked: Any, count: int | None) -> None:
    """K below the number of images: a number, a range's max, or for "auto" at least its smallest
    K ("auto" sweeps up to count - 1 on a small set)."""
    from ml.config import AUTO_MIN

    if count is None:
        return
    if isinstance(asked, int) and asked >= count:
        raise Invalid(f"num_clusters: {asked} must be below the dataset's {count} images")
    if isinstance(asked, dict) and asked["max"] >= count:
        raise Invalid(f"num_clusters: max {asked['max']} must be below the dataset's {count} images")
    if asked == "auto" and AUTO_MIN >= count:
        raise Invalid(f'num_clusters: "auto" needs more than {AUTO_MIN} images; the dataset has {count}')


def _by_idempotency_key(session: Session, tenant: Tenant, key: str) -> Run | None:
    return session.scalar(select(Run).where(Run.tenant_id == tenant.id, Run.idempotency_key == key))


def _replay(existing: Run, digest: str, key: str) -> Run:
    if existing.request_hash != digest:
        raise Conflict(
            f"Idempotency-Key {key!r} was already used with a different request body "
            f"(run {existing.id}); use a new key for a new run"
        )
    return existing


def get(session: Session, tenant: Tenant, run_id: str) -> Run:
    run = owned(session, Run, run_id, tenant.id)
    if run is None:
        raise NotFound(f"run {run_id} not found (list yours with GET /v1/runs)")
    return run


def servable_run_dir(run: Run) -> Path:
    """The run directory that /predict, /neighbors, /model and the UI serve from."""
    if run.state != RunState.SUCCEEDED:
        raise Conflict(f"run {run.id} is {run.state}; serving needs a run in state SUCCEEDED")
    settings = get_settings()
    if settings.artifact_store:
        # Another machine trained it: fetch the run once (a SUCCEEDED run never changes), without the
        # training checkpoints and the other seeds (the kept one's files are the run's own). Blocks
        # the first request for this run on this API process only.
        local = settings.runs_dir / run.id
        if not (local / "model.pt").is_file():
            synced(settings).pull(f"runs/{run.id}", skip=("checkpoints/", "seeds/"))
        if not (local / "model.pt").is_file():
            raise Conflict(f"run {run.id} has no model files in the artifact store")
        return local
    if not run.run_dir or not Path(run.run_dir).is_dir():
        raise Conflict(f"run {run.id} has no model files on this server")
    return Path(run.run_dir)


# (tenant id, run id) -> (run directory, monotonic time until which it is trusted). A SUCCEEDED run
# never changes; the expiry bounds how long a deleted one (its dataset deleted) is still served here.
_servable: dict[tuple[str, str], tuple[Path, float]] = {}
_servable_lock = threading.Lock()


def cached_servable_dir(tenant: Tenant, run_id: str) -> Path | None:
    """The run directory `servable_dir` found lately for this tenant and run, else None. No I/O."""
    with _servable_lock:
        hit = _servable.get((tenant.id, run_id))
    return hit[0] if hit is not None and hit[1] > time.monotonic() else None


def servable_dir(tenant: Tenant, run_id: str) -> Path:
    """The owner check and `servable_run_dir` in a session of their own, remembered for
    `auth_cache_s`: a small /predict request pays no database round trip for its run. Blocking."""
    with new_session() as session:
        run_dir = servable_run_dir(get(session, tenant, run_id))
    ttl = float(get_settings().auth_cache_s)
    if ttl > 0:
        with _servable_lock:
            if len(_servable) >= 10_000:
                _servable.clear()
            _servable[(tenant.id, run_id)] = (run_dir, time.monotonic() + ttl)
    return run_dir


def list_(
    session: Session, tenant: Tenant, *, state: str | None, dataset_id: str | None, limit: int, offset: int
) -> tuple[list[Run], int]:
    query = select(Run).where(Run.tenant_id == tenant.id)
    if state:
        query = query.where(Run.state == state)
    if dataset_id:
        query = query.where(Run.dataset_id == dataset_id)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(Run.created_at.desc(), Run.id).limit(limit).offset(offset)).all()
    return list(rows), total


def stages(session: Session, run: Run) -> list[StageStatus]:
    rows = {s.stage: s for s in session.scalars(select(StageStatus).where(StageStatus.run_id == run.id))}
    return [rows[s] for s in STAGES if s in rows]


def history(session: Session, run: Run) -> dict[str, list[dict[str, Any]]]:
    """Per-stage, per-epoch records: history.json once a stage ends, progress events while it runs."""
    history: dict[str, list[dict[str, Any]]] = {}
    if run.run_dir:
        rd = RunDir(run.run_dir)
        data = rd.read_json(rd.history_path, default={}) or {}
        history = {k: v for k, v in data.items() if isinstance(v, list)}
    live: dict[str, dict[int, dict[str, Any]]] = {}
    for ev in session.scalars(
        select(RunEvent)
        .where(RunEvent.run_id == run.id, RunEvent.kind == "progress", RunEvent.epoch.is_not(None))
        .order_by(RunEvent.id)
    ):
        if ev.stage in history or ev.loss is None:
            continue
        data = ev.data or {}
        fields = {**data, **(data.get("extra") if isinstance(data.get("extra"), dict) else {})}
        rec = {
            "epoch": ev.epoch,
            "loss": ev.loss,
            **{k: v for k, v in fields.items() if isinstance(v, (int, float)) and k not in ("epoch", "loss")},
        }
        live.setdefault(ev.stage, {})[ev.epoch] = rec  # the last report of an epoch wins
    for stage, by_epoch in live.items():
        history[stage] = [by_epoch[e] for e in sorted(by_epoch)]
    return history


def cancel(session: Session, settings: Settings, tenant: Tenant, run_id: str) -> Run:
    """A run no live worker holds (queued, waiting between stages, or whose worker died) ends
    CANCELED in this request; a running stage gets the flag its training loop polls."""
    run = get(session, tenant, run_id)
    if run.state in RunState.TERMINAL:
        raise Conflict(f"run {run.id} already ended ({run.state}); nothing to cancel")
    now = utcnow()
    stale = now - timedelta(seconds=settings.stale_after_s)
    # One conditional UPDATE: a worker's claim sets the lease only while the run is active and not
    # flagged, so exactly one of the two wins.
    idle = session.execute(
        update(Run)
        .where(
            Run.id == run.id,
            Run.state.in_(RunState.ACTIVE),
            or_(Run.lease_token.is_(None), Run.heartbeat_at.is_(None), Run.heartbeat_at < stale),
        )
        .values(state=RunState.CANCELED, finished_at=now, lease_token=None, cancel_requested=True)
        .execution_options(synchronize_session=False)
    ).rowcount
    if idle:
        for status in session.scalars(
            select(StageStatus).where(StageStatus.run_id == run.id, StageStatus.state == StageState.RUNNING)
        ):
            status.state, status.finished_at = StageState.CANCELED, now
        started = run.state != RunState.QUEUED
        # A bulk UPDATE passes by the ORM's flush hook: queue the webhook deliveries here.
        webhooks.state_changed(session, "run", run.id, run.tenant_id, RunState.CANCELED, run.state, stage=run.stage)
        session.add(
            RunEvent(
                run_id=run.id,
                kind="state",
                stage=run.stage,
                message=("canceled while no worker was running it" if started else "canceled before it started"),
                data={"state": RunState.CANCELED},
            )
        )
    else:
        session.execute(
            update(Run)
            .where(Run.id == run.id)
            .values(cancel_requested=True)
            .execution_options(synchronize_session=False)
        )
        session.add(
            RunEvent(
                run_id=run.id,
                kind="cancel_requested",
                stage=run.stage,
                message="cancel requested; the stage stops at its next step",
            )
        )
    session.commit()
    session.refresh(run)
    return run


def retry(session: Session, settings: Settings, tenant: Tenant, run_id: str) -> Run:
    """Resume a FAILED or CANCELED run where it stopped: its finished stages are kept, the stage it
    stopped in resumes from its last epoch checkpoint with a fresh budget of attempts."""
    run = get(session, tenant, run_id)
    if run.state not in (RunState.FAILED, RunState.CANCELED):
        raise Conflict(f"run {run.id} is {run.state}; only FAILED or CANCELED runs can be retried")
    if run.stage is None:
        raise Conflict(f"run {run.id} has no stage left to run")
    ended = run.state
    why = run.error or "canceled"
    redo = STAGES[STAGES.index(run.stage) :] if run.stage in STAGES else ()
    for status in session.scalars(select(StageStatus).where(StageStatus.run_id == run.id, StageStatus.stage.in_(redo))):
        if status.state != StageState.SUCCEEDED:
            status.state, status.finished_at = StageState.PENDING, None
        if status.stage == run.stage:
            status.attempts = 0
    run.state = (
        RunState.QUEUED
        if run.stage == STAGES[0]
        else (run.stage.upper() if run.stage in STAGES else RunState.SELFLABEL)
    )
    run.error, run.finished_at, run.cancel_requested = None, None, False
    run.lease_token, run.heartbeat_at, run.dispatched_at = None, None, None
    session.add(
        RunEvent(
            run_id=run.id,
            kind="retried",
            stage=run.stage,
            message=f"retry requested after the run ended {ended} ({why}); resuming {run.stage} "
            f"from its last checkpoint with a fresh budget of "
            f"{settings.max_stage_attempts} attempts",
            data={"state": run.state},
        )
    )
    session.commit()
    wake(session, run)
    return run


def dispatch(session: Session, run: Run) -> None:
    """Send the wake-up for a committed run and record it (the outbox's fast path); raises when the
    broker is unreachable (the run stays owed: dispatched_at is None)."""
    enqueue_stage(run.id, run.stage)
    run.dispatched_at = utcnow()
    session.commit()


def wake(session: Session, run: Run) -> None:
    """dispatch, but a broker that is down only delays the run: the dispatcher sends it later."""
    try:
        dispatch(session, run)
    except Exception as exc:
        if not is_infrastructure_error(exc):
            raise
        session.rollback()


def withdraw(session: Session, run: Run) -> None:
    """Undo a create whose answer is an error (the broker was down): nothing runs behind the back of
    a client that was told 503, and its Idempotency-Key is free for the retry."""
    session.rollback()
    session.execute(delete(Run).where(Run.id == run.id, Run.lease_token.is_(None)))
    session.commit()


def events(session: Session, run: Run, *, after: int, limit: int) -> list[RunEvent]:
    rows = session.scalars(
        select(RunEvent).where(RunEvent.run_id == run.id, RunEvent.id > after).order_by(RunEvent.id).limit(limit)
    ).all()
    return list(rows)


def events_since(run_id: str, after: int, limit: int = 500) -> tuple[list[RunEvent], str]:
    """Events after ``after`` and the run's state, in a session of their own (the event stream polls
    this for as long as the client listens; it must not hold the request's session)."""
    with new_session() as session:
        run = session.get(Run, run_id)
        return events(session, run, after=after, limit=limit), run.state


def count_events(session: Session, run: Run) -> int:
    return session.scalar(select(func.count()).select_from(RunEvent).where(RunEvent.run_id == run.id)) or 0
