"""Sending work to the workers by task name, so the API never imports the task code (or torch)."""
from __future__ import annotations

STAGE_TASK = "workers.tasks.run_stage"
INGEST_TASK = "workers.tasks.ingest_dataset"


def _celery():
    from workers.celery_app import celery_app
    return celery_app


def enqueue_ingest(dataset_id: str) -> None:
    _celery().send_task(INGEST_TASK, args=[dataset_id], queue="cpu")


def enqueue_stage(run_id: str, stage: str) -> None:
    _celery().send_task(STAGE_TASK, args=[run_id, stage], queue="gpu")
