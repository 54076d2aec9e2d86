"""The outbox's dispatcher: the database decides what should run, this sends the wake-ups.

Every worker's main process calls ``dispatch_once`` every ``recover_interval_s``. It drops the lease
of a stage whose worker stopped heart-beating (app.services.execution.stale_runs) and sends a
message for every run owed one (app.services.execution.due_for_dispatch): never sent, or sent long
ago while the queue is empty. Several dispatchers never send the same run twice in one round (a
conditional UPDATE), and a duplicate message is a no-op anyway (the lease).
"""

from __future__ import annotations

import logging

from sqlalchemy import update

from app.core.db import new_session
from app.core.queue import enqueue_job, enqueue_stage, queue_depth
from app.core.settings import Settings
from app.services import assignment_jobs
from app.services.execution import due_for_dispatch, stale_runs
from app.tables import AssignmentJob, Run

log = logging.getLogger("scan.dispatcher")


def dispatch_once(settings: Settings) -> list[tuple[str, str]]:
    """One round; returns the (run_id, stage) sent (assignment jobs as (job_id, "assign"))."""
    sent = []
    with new_session() as session:
        for run_id, stage in stale_runs(session, settings):
            log.warning("run %s: %s has no live worker; dispatching it again to resume", run_id, stage)
        try:
            queue_empty = queue_depth("gpu") == 0
        except Exception:  # noqa: BLE001 - broker down: only never-sent runs are tried (and fail below)
            queue_empty = False
        for run_id, stage in due_for_dispatch(session, settings, queue_empty):
            try:
                enqueue_stage(run_id, stage)
            except Exception:
                # Still owed: the next round sends it.
                session.execute(update(Run).where(Run.id == run_id).values(dispatched_at=None))
                session.commit()
                raise
            log.info("run %s: dispatched %s", run_id, stage)
            sent.append((run_id, stage))
        for job_id in assignment_jobs.due_for_dispatch(session, settings, queue_empty):
            try:
                enqueue_job(job_id)
            except Exception:
                session.execute(update(AssignmentJob).where(AssignmentJob.id == job_id).values(dispatched_at=None))
                session.commit()
                raise
            log.info("assignment job %s: dispatched", job_id)
            sent.append((job_id, "assign"))
    return sent
