"""A worker's wake-up for a run, start to end: pick the stage whose lease this worker wins, check
its inputs, train it (app.services.stage_training) or load the results (finalize), record how it
ended, and wake the run's next stage. The Celery task only calls ``run_wakeup``.

The chain lives in the database (the run's ``stage``), not in the messages: a redelivered or
re-sent message resumes where the database says the run is. Infrastructure errors anywhere end the
wake-up quietly; the run stays owed one and the dispatcher re-sends it once the database and broker
answer again.
"""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from app.core.db import new_session
from app.core.faults import is_infrastructure_error, retry_infra, which_service
from app.core.queue import enqueue_stage
from app.core.settings import Settings, get_settings
from app.services import execution, results
from app.services.failures import public_message
from app.services.run_files import local_run_dir
from app.services.stage_training import Heartbeat, train
from app.tables import Run

log = logging.getLogger("scan.worker")


def run_wakeup(run_id: str, stage: str) -> str:
    """Run one stage of the run the database says should go next (see ``queue_order``); what
    happened, as one word (done, advanced, skipped, rewound, succeeded, failed, canceled,
    superseded, interrupted)."""
    settings = get_settings()
    try:
        with new_session() as session:
            return _run_next(session, settings, run_id, stage)
    except Exception as exc:
        if is_infrastructure_error(exc):
            log.warning(
                "run %s: %s interrupted by the infrastructure (%s: %s); the dispatcher resumes it",
                run_id,
                stage,
                type(exc).__name__,
                exc,
            )
            return "interrupted"
        raise


def _run_next(session: Session, settings: Settings, run_id: str, stage: str) -> str:
    picked = _infra(lambda: execution.pick(session, settings, run_id, stage), session, settings, "claim")
    if picked is None:
        return "skipped"
    run_id, stage, claim = picked
    if claim == "advance":
        nxt = execution.next_stage(stage)
        execution.finish_stage(session, run_id, stage, None)
        if nxt:
            _wake(session, run_id, nxt)
        return "advanced"
    with Heartbeat(run_id, claim.token, settings):
        try:
            gone = _missing_input(session, settings, run_id, stage)
            if gone is not None:
                return _rewind(session, settings, run_id, stage, claim, *gone)
            if stage == execution.FINALIZE:
                return _finalize(session, settings, run_id)
            summary = train(session, settings, run_id, stage, claim)
        except execution.LeaseLost:
            log.warning("run %s: %s was taken over by another task; this one stops", run_id, stage)
            return "superseded"
        except Exception as exc:  # noqa: BLE001 - whatever the stage raised: paused (infrastructure) or failed
            if is_infrastructure_error(exc):
                why = f"the {which_service(exc)} was unreachable too long"
                log.warning("run %s: %s paused by the infrastructure: %s", run_id, stage, exc)
                _try(lambda: execution.release(session, run_id, stage, claim.token, why))
                return "interrupted"
            return _stage_failed(session, settings, run_id, stage, exc)
    try:
        nxt = _infra(
            lambda: execution.finish_stage(session, run_id, stage, summary, claim.token), session, settings, "finish"
        )
    except execution.LeaseLost:
        return "superseded"
    if nxt:
        _wake(session, run_id, nxt)
    return "done"


def _missing_input(session: Session, settings: Settings, run_id: str, stage: str) -> tuple[str, str] | None:
    from ml.pipeline import missing_input

    run = session.get(Run, run_id)
    return missing_input(local_run_dir(settings, run), stage) if run.run_dir else None


def _rewind(session, settings, run_id: str, stage: str, claim: execution.Claim, missing: str, producer: str) -> str:
    """An input of the stage is gone: the stage that writes it runs again."""
    _infra(
        lambda: execution.rewind(session, run_id, stage, claim.token, producer, missing), session, settings, "rewind"
    )
    _wake(session, run_id, producer)
    return "rewound"


def _finalize(session: Session, settings: Settings, run_id: str) -> str:
    """Load the run's results into the tables; the run is SUCCEEDED."""

    def write() -> None:
        run = session.get(Run, run_id)
        results.write_results(session, run, local_run_dir(settings, run))

    _infra(write, session, settings, "finalize")
    return "succeeded"


def _infra(fn, session: Session, settings: Settings, what: str):
    """Database work of the wake-up, retried with backoff through a database restart."""
    return retry_infra(fn, what=what, budget_s=settings.infra_retry_s, on_error=session.rollback)


def _try(fn) -> None:
    try:
        fn()
    except Exception:
        log.exception("could not hand the run back; the stale-lease recovery will")


def _wake(session: Session, run_id: str, stage: str) -> None:
    """Send the wake-up for the run's next stage after its commit (the outbox's fast path). A broker
    that is down only delays it: the run stays owed and the dispatcher sends it later."""
    try:
        enqueue_stage(run_id, stage)
        execution.mark_dispatched(session, run_id)
    except Exception as exc:
        if not is_infrastructure_error(exc):
            raise
        session.rollback()
        log.warning("run %s: could not send %s now (%s); the dispatcher will", run_id, stage, exc)


def _stage_failed(session: Session, settings: Settings, run_id: str, stage: str, exc: Exception) -> str:
    from ml.pipeline import Canceled

    if isinstance(exc, Canceled):
        _infra(
            lambda: execution.mark_canceled(session, run_id, stage, f"canceled during {stage}"),
            session,
            settings,
            "cancel",
        )
        return "canceled"
    log.exception("run %s: %s failed", run_id, stage)
    message = f"{stage} failed: {public_message(exc)}"
    if _is_out_of_memory(exc):
        message += (
            " (out of memory: retry with a smaller batch_size, or on a worker with more memory; "
            f"POST /v1/runs/{run_id}/retry resumes from the last checkpoint)"
        )
    _infra(lambda: execution.mark_failed(session, run_id, stage, message), session, settings, "fail")
    return "failed"


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover
        pass
    return "out of memory" in str(exc).lower()
