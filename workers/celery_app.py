"""The Celery application, configured for long GPU stages.

    celery -A workers.celery_app worker -Q gpu -c 1     # one process per GPU: training stages
    celery -A workers.celery_app worker -Q cpu          # ingest

- acks late + prefetch 1: a stage is acknowledged only when it finished, and a worker reserves no
  second long stage behind the one it is running.
- task_reject_on_worker_lost: a child killed mid-task (OOM) puts the message back; the number of
  such redeliveries is bounded by ``runs``/``stage_status.attempts`` in the database
  (SCAN_MAX_STAGE_ATTEMPTS), because brokers do not count them.
- The visibility timeout (Redis) exceeds the longest stage, or Redis would hand a running stage to a
  second worker every hour; the database lease makes such a duplicate a no-op anyway.
- A worker whose whole process group died cannot requeue anything, and the filesystem transport of
  embedded mode never redelivers; every worker therefore re-enqueues stages whose heartbeat went
  stale (app.services.execution.stale_runs), and the stage resumes from its checkpoint.
- CUDA is touched only inside the child process that runs a task (ml is imported lazily there).
"""
from __future__ import annotations

import logging
import threading

from celery import Celery, signals
from kombu import Queue

from app.core.settings import Settings, get_settings

log = logging.getLogger("scan.worker")


def make_celery(settings: Settings) -> Celery:
    app = Celery("scan", broker=settings.broker, include=["workers.tasks"])
    transport_options: dict = {"visibility_timeout": settings.visibility_timeout_s}
    if settings.broker.startswith("filesystem"):
        settings.make_dirs()  # the worker may start before the API ever ran
        folder = str(settings.broker_dir / "queue")
        transport_options.update(data_folder_in=folder, data_folder_out=folder, store_processed=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_queues=(Queue("gpu"), Queue("cpu")),
        task_default_queue="cpu",
        task_routes={"workers.tasks.run_stage": {"queue": "gpu"},
                     "workers.tasks.ingest_dataset": {"queue": "cpu"}},
        worker_hijack_root_logger=False,
    )
    return app


celery_app = make_celery(get_settings())


@signals.worker_process_init.connect
def _fresh_connections_in_child(**_: object) -> None:
    # A forked child must not reuse the parent's database sockets.
    from app.core.db import get_engine

    get_engine().dispose(close=False)


@signals.worker_ready.connect
def _start_recovery(sender=None, **_: object) -> None:  # noqa: ANN001
    """In the worker's main process: re-enqueue stages whose worker died (stale heartbeat)."""
    settings = get_settings()
    stop = threading.Event()

    def loop() -> None:
        from app.core.db import new_session
        from app.services.execution import stale_runs
        from app.services.queue import enqueue_stage

        schema_seen = said_waiting = False
        while not stop.is_set():
            try:
                if not schema_seen:
                    # Workers may start before the API (or `scan db upgrade`) made the schema: wait for
                    # it quietly instead of logging "no such table" tracebacks every interval.
                    from sqlalchemy import inspect

                    from app.core.db import get_engine

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
            except Exception:  # noqa: BLE001 - a database hiccup must not kill the watcher
                log.exception("stale-run recovery failed; retrying")
            stop.wait(settings.recover_interval_s)

    threading.Thread(target=loop, name="scan-recovery", daemon=True).start()
    signals.worker_shutdown.connect(lambda **_: stop.set(), weak=False)
