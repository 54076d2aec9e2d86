"""The Celery application and the names of its tasks: the one place the API and the workers meet.

The services enqueue by task name (``send_task``), so the API never imports the task code, torch
or the worker package; ``workers/tasks.py`` registers functions under these names. This module
imports neither side.

- acks late + prefetch 1: a stage is acknowledged only when it finished, and a worker reserves no
  second long stage behind the one it is running.
- task_reject_on_worker_lost: a child killed mid-task (OOM) puts the message back; the number of
  such redeliveries is bounded by ``runs``/``stage_status.attempts`` in the database
  (SCAN_MAX_STAGE_ATTEMPTS), because brokers do not count them.
- The visibility timeout (Redis) exceeds the longest stage, or Redis would hand a running stage to a
  second worker every hour; the database lease makes such a duplicate a no-op anyway.
- A broker connection loss does not cancel a running stage; the worker reconnects forever.
"""

from __future__ import annotations

from functools import lru_cache

from celery import Celery
from kombu import Queue

from app.core.settings import Settings, get_settings

STAGE_TASK = "workers.tasks.run_stage"
INGEST_TASK = "workers.tasks.ingest_dataset"
JOB_TASK = "workers.tasks.run_assignment_job"
TASK_MODULE = "workers.tasks"  # loaded by the worker process only (Celery's `include`)


def make_celery(settings: Settings) -> Celery:
    app = Celery("scan", broker=settings.broker, include=[TASK_MODULE])
    transport_options: dict = {"visibility_timeout": settings.visibility_timeout_s}
    if settings.broker.startswith("filesystem"):
        settings.make_dirs()  # the worker may start before the API ever ran
        folder = str(settings.broker_dir / "queue")
        transport_options.update(data_folder_in=folder, data_folder_out=folder, store_processed=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A Redis restart must not kill a stage that is training fine: the task keeps running, and
        # its late ack may be lost with the old connection; the redelivered duplicate is a no-op
        # (the stage is done or leased). The worker itself reconnects forever.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_retry=True,
        broker_connection_max_retries=None,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_queues=(Queue("gpu"), Queue("cpu")),
        task_default_queue="cpu",
        task_routes={STAGE_TASK: {"queue": "gpu"}, INGEST_TASK: {"queue": "cpu"}, JOB_TASK: {"queue": "gpu"}},
        worker_hijack_root_logger=False,
    )
    return app


@lru_cache(maxsize=1)
def celery_app() -> Celery:
    """The process's Celery app, built from the settings on first use."""
    return make_celery(get_settings())


def enqueue_ingest(dataset_id: str) -> None:
    celery_app().send_task(INGEST_TASK, args=[dataset_id], queue="cpu")


def enqueue_stage(run_id: str, stage: str) -> None:
    celery_app().send_task(STAGE_TASK, args=[run_id, stage], queue="gpu")


def enqueue_job(job_id: str) -> None:
    """An assignment job runs the model, so it goes where the models run."""
    celery_app().send_task(JOB_TASK, args=[job_id], queue="gpu")


def queue_depth(queue: str = "gpu") -> int:
    """Messages waiting in ``queue`` (not those a worker holds unacknowledged)."""
    from amqp.exceptions import ChannelError

    with celery_app().connection_for_write() as conn:
        try:
            return conn.default_channel.queue_declare(queue=queue, passive=True).message_count
        except ChannelError:  # never declared (no worker consumed it yet): nothing in it
            return 0
