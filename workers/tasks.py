"""One thin task per step: ingest a dataset, run one SCAN stage, finalize a run.

Each stage task enqueues the next one when it has finished, so the chain lives in the database (the
run's ``stage``) rather than in a message: a redelivered or re-enqueued message simply resumes where
the database says the run is.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

from app.core.artifacts import Synced, synced
from app.core.db import new_session
from app.core.queue import INGEST_TASK, STAGE_TASK, celery_app, enqueue_stage
from app.core.settings import get_settings
from app.models import Dataset, Run
from app.services import datasets as dataset_service
from app.services import execution, results, weights
from app.services.failures import public_message

log = logging.getLogger("scan.worker")


@celery_app().task(name=INGEST_TASK)
def ingest_dataset(dataset_id: str) -> None:
    with new_session() as session:
        dataset_service.ingest(session, get_settings(), dataset_id)


@celery_app().task(name=STAGE_TASK)
def run_stage(run_id: str, stage: str) -> str:
    settings = get_settings()
    with new_session() as session:
        claim = execution.claim(session, settings, run_id, stage)
        if claim is None:
            return "skipped"
        if claim == "advance":
            nxt = execution.next_stage(stage)
            execution.finish_stage(session, run_id, stage, None)
            if nxt:
                enqueue_stage(run_id, nxt)
            return "advanced"
        with _Heartbeat(run_id, claim.token, settings.heartbeat_s):
            try:
                if stage == execution.FINALIZE:
                    run = session.get(Run, run_id)
                    results.write_results(session, run, _pull_run(settings, run))
                    return "succeeded"
                summary = _run_ml_stage(session, run_id, stage, claim)
            except Exception as exc:  # noqa: BLE001 - whatever the stage raised fails the run with its message
                return _stage_failed(session, run_id, stage, exc)
        nxt = execution.finish_stage(session, run_id, stage, summary)
    if nxt:
        enqueue_stage(run_id, nxt)
    return "done"


def _stage_failed(session, run_id: str, stage: str, exc: Exception) -> str:
    from ml.pipeline import Canceled

    if isinstance(exc, Canceled):
        execution.mark_canceled(session, run_id, stage, f"canceled during {stage}")
        return "canceled"
    log.exception("run %s: %s failed", run_id, stage)
    execution.mark_failed(session, run_id, stage, f"{stage} failed: {public_message(exc)}")
    return "failed"


def _run_ml_stage(session, run_id: str, stage: str, claim: execution.Claim) -> dict[str, Any]:
    from ml.config import RunConfig
    from ml.data import ImageSet
    from ml.pipeline import prepare_run
    from ml.pipeline import run_stage as ml_run_stage

    settings = get_settings()
    run = session.get(Run, run_id)
    dataset = session.get(Dataset, run.dataset_id)
    sync = synced(settings)
    run_dir = _pull_run(settings, run, sync)
    if sync.store is not None:
        sync.pull(f"datasets/{dataset.id}")
        data = ImageSet.load(settings.datasets_dir / dataset.id)
    else:
        data = ImageSet.load(dataset.storage_path)
    # A "run:<id>" weights reference becomes that run's file on this machine (pulled if need be).
    config = weights.resolve(session, run, run.config, lambda source: _pull_run(settings, source, sync))
    rd = prepare_run(run_dir, RunConfig.model_validate(config))

    last_write, last_epoch = 0.0, None

    def progress(p: Any) -> None:
        nonlocal last_write, last_epoch
        epoch, step, steps = getattr(p, "epoch", None), getattr(p, "step", None), getattr(p, "steps", None)
        epoch_end = getattr(p, "epoch_end", False) or (bool(steps) and step == steps)
        now = time.monotonic()
        if getattr(p, "epoch_end", False):
            # The epoch's checkpoint reaches the store before the progress says the epoch is done:
            # a worker that takes the stage over from here resumes from it.
            sync.push(f"runs/{run_id}")
        if epoch_end or epoch != last_epoch or now - last_write >= settings.progress_interval_s:
            execution.record_progress(session, run_id, stage, claim.attempt, p, claim.token)
            last_write, last_epoch = now, epoch

    last_check, canceled = 0.0, False

    def should_cancel() -> bool:
        nonlocal last_check, canceled
        now = time.monotonic()
        if not canceled and now - last_check >= settings.cancel_check_interval_s:
            canceled, last_check = execution.cancel_requested(session, run_id), now
        return canceled

    summary = ml_run_stage(stage, rd.path, data, progress=progress, should_cancel=should_cancel) or {}
    sync.push(f"runs/{run_id}")
    return summary


def _pull_run(settings, run: Run, sync: Synced | None = None) -> str:
    """The run's folder on this machine: with an artifact store, this worker's own copy (under its
    artifacts folder, brought up to date from the store); without one, the shared folder."""
    sync = sync or synced(settings)
    if sync.store is None:
        return run.run_dir
    sync.pull(f"runs/{run.id}")
    return str(settings.runs_dir / run.id)


class _Heartbeat:
    """Marks the stage alive every few seconds from a side thread, even through long steps (mining
    on a large set reports no progress for a while) so no other worker takes it over."""

    def __init__(self, run_id: str, token: str, every_s: float):
        self.run_id, self.token, self.every_s = run_id, token, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="scan-heartbeat", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                with new_session() as session:
                    execution.heartbeat(session, self.run_id, self.token)
            except Exception:
                log.exception("heartbeat failed; retrying")
