"""One thin task per step: ingest a dataset, run one SCAN stage, finalize a run.

Each stage task enqueues the next one when it has finished, so the chain lives in the database (the
run's ``stage``) rather than in a message: a redelivered or re-enqueued message simply resumes where
the database says the run is.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from typing import Any

from app.core.artifacts import Synced, synced
from app.core.db import new_session
from app.core.faults import is_infrastructure_error, retry_infra, which_service
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
    """A wake-up: run one stage of the run the database says should go next (see ``queue_order``).
    Infrastructure errors anywhere here end the task quietly; the run stays owed a wake-up and the
    dispatcher re-sends it once the database and broker answer again."""
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


def _pick(session, settings, run_id: str, stage: str):
    """(run_id, stage, claim) of the first candidate whose lease this task wins, or None."""
    candidates = [(run_id, stage)]
    if settings.queue_order == "oldest_run":
        candidates = [c for c in execution.waiting_runs(session, settings) if c != (run_id, stage)] + candidates
    for rid, st in candidates:
        claim = execution.claim(session, settings, rid, st)
        if claim is not None:
            return rid, st, claim
    return None


def _run_next(session, settings, run_id: str, stage: str) -> str:
    picked = _infra(lambda: _pick(session, settings, run_id, stage), session, settings, "claim")
    if picked is None:
        return "skipped"
    run_id, stage, claim = picked
    if claim == "advance":
        nxt = execution.next_stage(stage)
        execution.finish_stage(session, run_id, stage, None)
        if nxt:
            _wake(session, run_id, nxt)
        return "advanced"
    with _Heartbeat(run_id, claim.token, settings):
        try:
            gone = _missing_input(session, settings, run_id, stage)
            if gone is not None:
                _infra(
                    lambda: execution.rewind(session, run_id, stage, claim.token, gone[1], gone[0]),
                    session,
                    settings,
                    "rewind",
                )
                _wake(session, run_id, gone[1])
                return "rewound"
            if stage == execution.FINALIZE:
                _infra(
                    lambda: results.write_results(session, (run := session.get(Run, run_id)), _pull_run(settings, run)),
                    session,
                    settings,
                    "finalize",
                )
                return "succeeded"
            summary = _with_disk_retries(lambda: _run_ml_stage(session, run_id, stage, claim), run_id, stage)
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


def _infra(fn, session, settings, what: str):
    """Database work of the task, retried with backoff through a database restart."""
    return retry_infra(fn, what=what, budget_s=settings.infra_retry_s, on_error=session.rollback)


def _try(fn) -> None:
    try:
        fn()
    except Exception:
        log.exception("could not hand the run back; the stale-lease recovery will")


def _wake(session, run_id: str, stage: str) -> None:
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


def _missing_input(session, settings, run_id: str, stage: str) -> tuple[str, str] | None:
    from ml.pipeline import missing_input

    run = session.get(Run, run_id)
    return missing_input(_pull_run(settings, run), stage) if run.run_dir else None


# A read-only folder for a moment, a full or flaky disk: retried (the stage resumes from its last
# checkpoint); a missing file or a bad path is the stage's own error and is not.
_TRANSIENT_DISK = {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EIO,
    errno.EDQUOT,
    errno.EAGAIN,
    errno.ESTALE,
}
DISK_RETRIES = (2.0, 5.0, 15.0)


def _with_disk_retries(fn, run_id: str, stage: str):
    for wait in (*DISK_RETRIES, None):
        try:
            return fn()
        except OSError as exc:
            if wait is None or is_infrastructure_error(exc) or exc.errno not in _TRANSIENT_DISK:
                raise
            log.warning(
                "run %s: %s hit a disk error (%s); retrying in %.0fs from its checkpoint", run_id, stage, exc, wait
            )
            time.sleep(wait)
    raise AssertionError("unreachable")


def _stage_failed(session, settings, run_id: str, stage: str, exc: Exception) -> str:
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


def _run_ml_stage(session, run_id: str, stage: str, claim: execution.Claim) -> dict[str, Any]:
    from ml.data import ImageSet
    from ml.pipeline import run_stage as ml_run_stage
    from ml.rundir import RunDir

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
    # The stored config was validated at submission: it is parsed, not checked again, and never
    # copied into the run directory (the database holds the one copy).
    config = weights.resolve(session, run, run.recipe(), lambda source: _pull_run(settings, source, sync))
    rd = RunDir(run_dir).ensure()

    last_write, last_epoch = 0.0, None

    # Progress writes and the cancel poll ride out a database restart: training pauses inside them
    # while they retry with backoff, and continues when the database answers again.
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
            _infra(
                lambda: execution.record_progress(session, run_id, stage, claim.attempt, p, claim.token),
                session,
                settings,
                f"run {run_id}: progress",
            )
            last_write, last_epoch = now, epoch

    last_check, canceled = 0.0, False

    def should_cancel() -> bool:
        nonlocal last_check, canceled
        now = time.monotonic()
        if not canceled and now - last_check >= settings.cancel_check_interval_s:
            canceled = _infra(
                lambda: execution.cancel_requested(session, run_id), session, settings, f"run {run_id}: cancel poll"
            )
            last_check = now
        return canceled

    summary = ml_run_stage(stage, rd.path, data, progress=progress, should_cancel=should_cancel, cfg=config) or {}
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

    def __init__(self, run_id: str, token: str, settings):
        self.run_id, self.token, self.every_s = run_id, token, settings.heartbeat_s
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
            except Exception as exc:  # noqa: BLE001 - a database restart: beat again next time
                log.warning("heartbeat of run %s failed (%s); retrying", self.run_id, type(exc).__name__)
