"""What a worker does to a run's rows: claim a stage, report progress, finish, fail, cancel, recover.

A stage is guarded by a lease (``runs.lease_token`` + ``heartbeat_at``) taken with one conditional
UPDATE, so a duplicate delivery (broker redelivery, recovery re-enqueue) never runs a stage twice at
the same time. A worker that dies stops heart-beating; after ``stale_after_s`` any worker re-enqueues
the stage, which resumes from its last epoch checkpoint. Attempts are counted per stage and the run
fails with a clear message beyond ``max_stage_attempts`` (an OOM-killed task must not loop forever).

The database decides what runs; the broker only wakes workers (a transactional outbox): every run
that should be moving and that no live worker holds is re-sent by ``due_for_dispatch`` once its last
message is older than ``dispatch_after_s``, so a lost message costs latency, never a run. An
interruption by the infrastructure (``release``) hands the run back without spending an attempt.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from app.core.settings import Settings
from app.tables import Run, RunEvent, RunState, StageState, StageStatus, utcnow
from ml.stages import STAGES

FINALIZE = "finalize"
RUNNING_STATES = {stage: stage.upper() for stage in STAGES}


@dataclass
class Claim:
    token: str
    attempt: int


class LeaseLost(Exception):
    """Another task took this stage over (this one was presumed dead); stop without touching the run."""


def next_stage(stage: str) -> str | None:
    if stage == FINALIZE:
        return None
    i = STAGES.index(stage)
    return STAGES[i + 1] if i + 1 < len(STAGES) else FINALIZE


def claim(session: Session, settings: Settings, run_id: str, stage: str) -> Claim | str | None:
    """Take the stage's lease. Returns a Claim, "advance" (stage done but the run was not moved on:
    enqueue the next one) or None (nothing to do: ended, canceled, superseded or held by a live task)."""
    run = session.get(Run, run_id)
    if run is None or run.state in RunState.TERMINAL:
        return None
    if run.cancel_requested:
        mark_canceled(session, run_id, stage, None)
        return None
    status = session.get(StageStatus, (run_id, stage)) if stage != FINALIZE else None
    if status is not None and status.state == StageState.SUCCEEDED:
        return "advance" if run.stage == stage else None
    if run.stage != stage:
        return None  # a stale duplicate of a stage the run has already left
    token = secrets.token_hex(16)
    now = utcnow()
    cutoff = now - timedelta(seconds=settings.stale_after_s)
    # A lease still held here belongs to a task that stopped heart-beating: this claim takes it over.
    # The dispatcher's sweep (stale_runs) says so when it gets there first; when a redelivered message
    # gets here first, this claim is what recovers the run and has to say so instead.
    held = session.scalar(select(Run.lease_token).where(Run.id == run_id))
    # State and cancel flag are in the condition too: an API cancel of an idle run races with this.
    won = session.execute(
        update(Run)
        .where(
            Run.id == run_id,
            Run.state.in_(RunState.ACTIVE),
            Run.cancel_requested.is_(False),
            or_(Run.lease_token.is_(None), Run.heartbeat_at.is_(None), Run.heartbeat_at < cutoff),
        )
        .values(lease_token=token, heartbeat_at=now)
        .execution_options(synchronize_session=False)
    ).rowcount
    session.commit()
    if won != 1:
        return None
    session.refresh(run)
    attempt = 1
    if status is not None:
        status.attempts += 1
        attempt = status.attempts
        if attempt > 1:
            run.redeliveries += 1
        if attempt > settings.max_stage_attempts:
            session.commit()
            mark_failed(
                session,
                run_id,
                stage,
                f"stage {stage} was started {attempt} times and never finished: the worker running "
                f"it stopped heart-beating each time without reporting an error (process killed, "
                f"e.g. SIGKILL or the kernel's OOM killer, or its machine lost); giving up after "
                f"max_stage_attempts={settings.max_stage_attempts}. The worker's log names the "
                f"signal; POST /v1/runs/{run_id}/retry resumes from the last checkpoint.",
            )
            return None
        status.state = StageState.RUNNING
        status.started_at = status.started_at or now
        status.finished_at = None
    run.state = RUNNING_STATES.get(stage, run.state)
    run.started_at = run.started_at or now
    if held is not None:
        session.add(
            RunEvent(
                run_id=run_id,
                kind="recovered",
                stage=stage,
                message=f"no heartbeat for {settings.stale_after_s:.0f}s from the task running {stage}; "
                "this worker took it over",
            )
        )
    session.add(
        RunEvent(
            run_id=run_id,
            kind="stage_started",
            stage=stage,
            attempt=attempt,
            message=f"{stage} started" + (f" (attempt {attempt}, resuming)" if attempt > 1 else ""),
        )
    )
    session.commit()
    return Claim(token, attempt)


def pick(session: Session, settings: Settings, run_id: str, stage: str) -> tuple[str, str, Claim | str] | None:
    """(run_id, stage, claim) of the first candidate whose lease this worker wins, or None. The
    candidate is the stage the message names; with ``queue_order`` "oldest_run" the runs waiting
    longest come first, so a free worker takes the oldest work whichever message woke it."""
    candidates = [(run_id, stage)]
    if settings.queue_order == "oldest_run":
        candidates = [c for c in waiting_runs(session, settings) if c != (run_id, stage)] + candidates
    for rid, st in candidates:
        got = claim(session, settings, rid, st)
        if got is not None:
            return rid, st, got
    return None


def refresh_lease(session: Session, table, row_id: str, token: str) -> bool:
    """Refresh the lease of a run or an assignment job (the same lease columns); False when it is
    no longer ours."""
    held = session.execute(
        update(table)
        .where(table.id == row_id, table.lease_token == token)
        .values(heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    ).rowcount
    session.commit()
    return held == 1


def heartbeat(session: Session, run_id: str, token: str) -> bool:
    return refresh_lease(session, Run, run_id, token)


def waiting_runs(session: Session, settings: Settings, limit: int = 20) -> list[tuple[str, str]]:
    """(run_id, stage) of runs that should be moving and that no live task holds, oldest run first:
    what a free worker should take when ``queue_order`` is ``oldest_run``."""
    cutoff = utcnow() - timedelta(seconds=settings.stale_after_s)
    rows = session.execute(
        select(Run.id, Run.stage)
        .where(
            Run.state.in_(RunState.ACTIVE),
            Run.stage.is_not(None),
            or_(Run.lease_token.is_(None), Run.heartbeat_at < cutoff),
        )
        .order_by(Run.created_at, Run.id)
        .limit(limit)
    ).all()
    return [(r[0], r[1]) for r in rows]


def cancel_requested(session: Session, run_id: str) -> bool:
    return bool(session.scalar(select(Run.cancel_requested).where(Run.id == run_id)))


def _num(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def record_progress(session: Session, run_id: str, stage: str, attempt: int, progress: Any, token: str) -> None:
    """One progress report from ml.pipeline (a Progress object) into stage_status and run_events."""
    get = progress.get if isinstance(progress, dict) else lambda k, d=None: getattr(progress, k, d)
    fields = dict(
        epoch=_int(get("epoch")),
        epochs=_int(get("epochs")),
        step=_int(get("step")),
        steps=_int(get("steps")),
        loss=_num(get("loss")),
        images_per_s=_num(get("images_per_s")),
        eta_s=_num(get("eta_s")),
    )
    status = session.get(StageStatus, (run_id, stage))
    if status is not None:
        for key, value in fields.items():
            if value is not None:
                setattr(status, key, value)
    extra = get("extra") or get("metrics") or None
    message = get("message")
    session.add(
        RunEvent(
            run_id=run_id,
            kind="progress",
            stage=stage,
            attempt=attempt,
            epoch=fields["epoch"],
            epochs=fields["epochs"],
            step=fields["step"],
            steps=fields["steps"],
            loss=fields["loss"],
            message=str(message) if message else None,
            data=_jsonable(
                {k: v for k, v in fields.items() if k in ("images_per_s", "eta_s")}
                | ({"extra": extra} if extra else {})
            ),
        )
    )
    held = session.execute(
        update(Run)
        .where(Run.id == run_id, Run.lease_token == token)
        .values(heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    ).rowcount
    session.commit()
    if held != 1:
        raise LeaseLost(f"run {run_id}: the lease on {stage} was taken over or the run ended")


def finish_stage(
    session: Session, run_id: str, stage: str, summary: dict[str, Any] | None, token: str | None = None
) -> str | None:
    """Mark the stage done, move the run to the next one and release the lease; returns the next.
    With ``token``, only while that lease is still held (else LeaseLost: another task owns it)."""
    session.rollback()
    now = utcnow()
    nxt = next_stage(stage)
    run = session.get(Run, run_id, populate_existing=True)
    if token is not None and (run is None or run.lease_token != token):
        raise LeaseLost(f"run {run_id}: the lease on {stage} was taken over or the run ended")
    status = session.get(StageStatus, (run_id, stage))
    if status is not None:
        status.state, status.finished_at = StageState.SUCCEEDED, now
        if status.started_at is not None:
            status.duration_s = (now - _aware(status.started_at)).total_seconds()
        status.summary = _jsonable(summary or {})
        if status.epochs is not None:
            status.epoch = status.epochs
        status.eta_s = 0.0
    chosen = (summary or {}).get("num_clusters_chosen")
    if chosen is not None:  # "auto" or a range: the config records the K the clustering stage chose
        run.config = run.recipe().with_chosen_k(chosen).model_dump(mode="json")
    run.stage = nxt
    if nxt in RUNNING_STATES:
        run.state = RUNNING_STATES[nxt]
    # dispatched_at=None: a wake-up for the next stage is owed (sent right after this commit; if
    # that send fails, the dispatcher sends it).
    run.lease_token, run.heartbeat_at, run.dispatched_at = None, now, None
    session.add(
        RunEvent(
            run_id=run_id,
            kind="stage_finished",
            stage=stage,
            message=f"{stage} finished",
            data=_jsonable(summary or {}),
        )
    )
    session.commit()
    return nxt


def mark_failed(session: Session, run_id: str, stage: str | None, message: str) -> None:
    session.rollback()
    run = session.get(Run, run_id)
    if run is None or run.state in RunState.TERMINAL:
        return
    status = session.get(StageStatus, (run_id, stage)) if stage in STAGES else None
    if status is not None:
        status.state, status.finished_at = StageState.FAILED, utcnow()
    run.state, run.error, run.finished_at, run.lease_token = RunState.FAILED, message, utcnow(), None
    session.add(RunEvent(run_id=run_id, kind="error", stage=stage, message=message, data={"state": RunState.FAILED}))
    session.commit()


def mark_canceled(session: Session, run_id: str, stage: str | None, summary: str | None) -> None:
    session.rollback()
    run = session.get(Run, run_id)
    if run is None or run.state in RunState.TERMINAL:
        return
    status = session.get(StageStatus, (run_id, stage)) if stage in STAGES else None
    if status is not None and status.state == StageState.RUNNING:
        status.state, status.finished_at = StageState.CANCELED, utcnow()
    run.state, run.finished_at, run.lease_token = RunState.CANCELED, utcnow(), None
    session.add(
        RunEvent(
            run_id=run_id,
            kind="state",
            stage=stage,
            message=summary or "run canceled",
            data={"state": RunState.CANCELED},
        )
    )
    session.commit()


def release(session: Session, run_id: str, stage: str, token: str, why: str) -> None:
    """Hand a stage back after an interruption by the infrastructure: drop the lease, owe a wake-up,
    and do not count the attempt (a database restart is not the stage's fault)."""
    session.rollback()
    run = session.get(Run, run_id, populate_existing=True)
    if run is None or run.lease_token != token:
        return
    status = session.get(StageStatus, (run_id, stage)) if stage in STAGES else None
    if status is not None and status.attempts > 0:
        status.attempts -= 1
    run.lease_token, run.heartbeat_at, run.dispatched_at = None, utcnow(), None
    session.add(
        RunEvent(
            run_id=run_id,
            kind="interrupted",
            stage=stage,
            message=f"{stage} paused: {why}; it resumes from its last checkpoint",
        )
    )
    session.commit()


def rewind(session: Session, run_id: str, stage: str, token: str, producer: str, missing: str) -> None:
    """An input of ``stage`` is gone from the run directory: move the run back to the stage that
    writes it (its later stages run again too) instead of failing. Attempts are kept, so a stage that
    never writes what it should still ends in max_stage_attempts."""
    session.rollback()
    run = session.get(Run, run_id, populate_existing=True)
    if run is None or run.lease_token != token:
        return
    redo = STAGES[STAGES.index(producer) :]
    for status in session.scalars(select(StageStatus).where(StageStatus.run_id == run_id, StageStatus.stage.in_(redo))):
        status.state, status.finished_at = StageState.PENDING, None
    run.stage, run.state = producer, RUNNING_STATES[producer]
    run.lease_token, run.heartbeat_at, run.dispatched_at = None, utcnow(), None
    session.add(
        RunEvent(
            run_id=run_id,
            kind="rewound",
            stage=stage,
            message=f"{missing} is missing from the run directory; re-running {producer} "
            f"(from its checkpoint) before {stage}",
        )
    )
    session.commit()


def stale_runs(session: Session, settings: Settings) -> list[tuple[str, str]]:
    """(run_id, stage) of runs whose running task has not heart-beaten for stale_after_s (worker
    died). Only leased runs count: a run waiting between stages holds no lease and is not dead.
    Drops the dead lease and owes the run a wake-up (``dispatched_at=None``)."""
    cutoff = utcnow() - timedelta(seconds=settings.stale_after_s)
    rows = session.scalars(
        select(Run).where(
            Run.state.in_(RunState.ACTIVE),
            Run.lease_token.is_not(None),
            Run.heartbeat_at < cutoff,
            Run.stage.is_not(None),
        )
    ).all()
    found = []
    for run in rows:
        found.append((run.id, run.stage))
        run.lease_token, run.heartbeat_at, run.dispatched_at = None, utcnow(), None
        session.add(
            RunEvent(
                run_id=run.id,
                kind="recovered",
                stage=run.stage,
                message=f"no heartbeat for {settings.stale_after_s:.0f}s; re-enqueued {run.stage}",
            )
        )
    session.commit()
    return found


def due_for_dispatch(session: Session, settings: Settings, queue_empty: bool) -> list[tuple[str, str]]:
    """(run_id, stage) of runs owed a wake-up message, each marked dispatched now (a conditional
    UPDATE, so two dispatchers never both send it). Owed: never sent (``dispatched_at`` is None and
    the run is older than a moment, so the API's own send after commit goes first), or sent longer
    than dispatch_after_s ago while the queue is empty (the message was lost: a Redis without
    persistence restarted, or flushed). A run waiting behind others in a non-empty queue is left
    alone, so waiting never grows the queue."""
    now = utcnow()
    old = now - timedelta(seconds=settings.dispatch_after_s)
    grace = now - timedelta(seconds=min(5.0, settings.dispatch_after_s))
    # heartbeat_at is "when the lease was last dropped" for an unleased run (finish, release, recovery).
    never = Run.dispatched_at.is_(None) & (func.coalesce(Run.heartbeat_at, Run.created_at) < grace)
    owed = or_(never, Run.dispatched_at < old) if queue_empty else never
    rows = session.execute(
        select(Run.id, Run.stage, Run.dispatched_at)
        .where(Run.state.in_(RunState.ACTIVE), Run.stage.is_not(None), Run.lease_token.is_(None), owed)
        .order_by(Run.created_at)
    ).all()
    due = []
    for run_id, stage, seen in rows:
        same = Run.dispatched_at.is_(None) if seen is None else Run.dispatched_at == seen
        if session.execute(
            update(Run)
            .where(Run.id == run_id, Run.lease_token.is_(None), same)
            .values(dispatched_at=now)
            .execution_options(synchronize_session=False)
        ).rowcount:
            due.append((run_id, stage))
            if seen is not None:
                session.add(
                    RunEvent(
                        run_id=run_id,
                        kind="redispatched",
                        stage=stage,
                        message=f"no worker took {stage} within {settings.dispatch_after_s:.0f}s "
                        "and the queue is empty (message lost); sent it again",
                    )
                )
    session.commit()
    return due


def mark_dispatched(session: Session, run_id: str) -> None:
    session.execute(
        update(Run).where(Run.id == run_id).values(dispatched_at=utcnow()).execution_options(synchronize_session=False)
    )
    session.commit()


def _aware(dt):  # SQLite gives naive datetimes back
    from datetime import timezone

    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def _jsonable(value: Any) -> Any:
    """Stage summaries may hold numpy scalars or NaN; JSON columns need plain, finite values."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if hasattr(value, "tolist"):
        return _jsonable(value.tolist())
    number = _num(value)
    return number if number is not None else str(value)
