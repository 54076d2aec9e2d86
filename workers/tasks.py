"""One thin task per queue name: parse the message's arguments, call the service, done.

Each stage's wake-up runs the stage the database says is next and wakes the one after it
(app.services.stage_runner); ingest reads an upload into a dataset (app.services.datasets).
"""

from __future__ import annotations

from app.core.db import new_session
from app.core.queue import INGEST_TASK, STAGE_TASK, celery_app
from app.core.settings import get_settings
from app.services import datasets as dataset_service
from app.services import stage_runner


@celery_app().task(name=INGEST_TASK)
def ingest_dataset(dataset_id: str) -> None:
    with new_session() as session:
        dataset_service.ingest(session, get_settings(), dataset_id)


@celery_app().task(name=STAGE_TASK)
def run_stage(run_id: str, stage: str) -> str:
    return stage_runner.run_wakeup(run_id, stage)
