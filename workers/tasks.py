"""One thin task per queue name: parse the message's arguments, call the service, done.

Each stage's wake-up runs the stage the database says is next and wakes the one after it
(app.services.stage_runner); ingest reads an upload into a dataset (app.services.datasets); an
assignment job assigns a dataset to a finished run (app.services.assignment_jobs).
"""

from __future__ import annotations

from app.core.db import new_session
from app.core.queue import INGEST_TASK, JOB_TASK, STAGE_TASK, celery_app
from app.core.settings import get_settings
from app.services import assignment_jobs, stage_runner
from app.services import datasets as dataset_service


@celery_app().task(name=INGEST_TASK)
def ingest_dataset(dataset_id: str) -> None:
    with new_session() as session:
        dataset_service.ingest(session, get_settings(), dataset_id)


@celery_app().task(name=STAGE_TASK)
def run_stage(run_id: str, stage: str) -> str:
    return stage_runner.run_wakeup(run_id, stage)


@celery_app().task(name=JOB_TASK)
def run_assignment_job(job_id: str) -> str:
    return assignment_jobs.run_job(job_id)
