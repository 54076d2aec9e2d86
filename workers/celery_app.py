"""The worker process's entry point: the Celery app of ``app.core.queue`` plus worker-side signals.

    celery -A workers.celery_app worker -Q gpu -c 1     # one process per GPU: training stages
    celery -A workers.celery_app worker -Q cpu          # ingest

- A worker whose whole process group died cannot requeue anything, and the filesystem transport of
  embedded mode never redelivers; every worker therefore re-enqueues stages whose heartbeat went
  stale (app.services.execution.stale_runs), and the stage resumes from its checkpoint.
- CUDA is touched only inside the child process that runs a task (ml is imported lazily there).
"""
from __future__ import annotations

import logging
import threading

from celery import signals
from sqlalchemy import inspect

from app.core.db import get_engine, new_session
from app.core.queue import celery_app as _celery_app
from app.core.queue import enqueue_stage
from app.core.settings import get_settings
from app.services.execution import stale_runs

log = logging.getLogger("scan.worker")

celery_app = _celery_app()


@signals.worker_process_init.connect
def _fresh_connections_in_child(**_: object) -> None:
    # A forked child must not reuse the parent's database sockets.
    get_engine().dispose(close=False)


@signals.worker_ready.connect
def _start_recovery(sender=None, **_: object) -> None:  # Celery passes the consumer as sender
    """In the worker's main process: re-enqueue stages whose worker died (stale heartbeat)."""
    settings = get_settings()
    stop = threading.Event()

    def loop() -> None:
        schema_seen = said_waiting = False
        while not stop.is_set():
            try:
                if not schema_seen:
                    # Workers may start before the API (or `scan db upgrade`) made the schema: wait for
                    # it quietly instead of logging "no such table" tracebacks every interval.
                    schema_seen = inspect(get_engine()).has_table("runs")
                    if not schema_seen:
                        if not said_waiting:
                            log.info("database schema not there yet; waiting for migrations")
                            said_waiting = True
                        stop.wait(settings.recover_interval_s)
                        continue
                with new_session() as session:
                    for run_id, stage in stale_runs(session, settings):
                        log.warning("run %s: %s has no live worker; re-enqueued to resume", run_id, stage)
                        enqueue_stage(run_id, stage)
            except Exception:  # a database hiccup must not kill the watcher
                log.exception("stale-run recovery failed; retrying")
            stop.wait(settings.recover_interval_s)

    threading.Thread(target=loop, name="scan-recovery", daemon=True).start()
    signals.worker_shutdown.connect(lambda **_: stop.set(), weak=False)
