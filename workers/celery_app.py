"""The worker process's entry point: the Celery app of ``app.core.queue`` plus worker-side signals.

    celery -A workers.celery_app worker -Q gpu -c 1     # one process per GPU: training stages
    celery -A workers.celery_app worker -Q cpu          # ingest

- The database decides, the broker only wakes workers. Every worker's main process runs the
  dispatcher (app.services.dispatcher): it drops the lease of a stage whose heartbeat went stale (its
  whole process group died; the filesystem transport never redelivers) and re-sends any run owed a
  wake-up (lost by a Redis without persistence, flushed, or never sent because the broker was down).
  The stage resumes from its checkpoint; a duplicate message is a no-op (the lease).
- CUDA is touched only inside the child process that runs a task (ml is imported lazily there).
"""

from __future__ import annotations

import logging
import threading

from celery import signals
from sqlalchemy import inspect

from app.core.db import get_engine
from app.core.queue import celery_app as _celery_app
from app.core.settings import get_settings
from app.services.dispatcher import dispatch_once

log = logging.getLogger("scan.worker")

celery_app = _celery_app()


@signals.worker_process_init.connect
def _fresh_connections_in_child(**_: object) -> None:
    # A forked child must not reuse the parent's database sockets.
    get_engine().dispose(close=False)


@signals.worker_ready.connect
def _start_dispatcher(sender=None, **_: object) -> None:  # Celery passes the consumer as sender
    """In the worker's main process: the outbox's dispatcher, every recover_interval_s."""
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
                dispatch_once(settings)
            except Exception as exc:  # noqa: BLE001 - a database or broker hiccup must not kill the dispatcher
                log.warning("dispatcher: %s: %s; retrying", type(exc).__name__, exc)
            stop.wait(settings.recover_interval_s)

    threading.Thread(target=loop, name="scan-dispatcher", daemon=True).start()
    signals.worker_shutdown.connect(lambda **_: stop.set(), weak=False)
