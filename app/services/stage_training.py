"""One SCAN stage trained inside a worker: the run's files and recipe brought to this machine, the
training loop wired to the database (throttled progress, the cancel flag, a heartbeat that keeps
the lease) and the checkpoints pushed to the artifact store after every epoch.

A transient disk error (a read-only folder for a moment, a full or flaky disk) is retried from the
stage's last checkpoint; a missing file or a bad path is the stage's own error and is not.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from typing import Any

from sqlalchemy.orm import Session

from app.core.artifacts import synced
from app.core.db import new_session
from app.core.faults import is_infrastructure_error, retry_infra
from app.core.settings import Settings
from app.services import execution, weights
from app.services.run_files import local_dataset_dir, local_run_dir
from app.tables import Dataset, Run

log = logging.getLogger("scan.worker")

TRANSIENT_DISK = {
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


def train(session: Session, settings: Settings, run_id: str, stage: str, claim: execution.Claim) -> dict[str, Any]:
    """Train the claimed stage to its end (retrying transient disk errors); its summary."""
    for wait in (*DISK_RETRIES, None):
        try:
            return _train_once(session, settings, run_id, stage, claim)
        except OSError as exc:
            if wait is None or is_infrastructure_error(exc) or exc.errno not in TRANSIENT_DISK:
                raise
            log.warning(
                "run %s: %s hit a disk error (%s); retrying in %.0fs from its checkpoint", run_id, stage, exc, wait
            )
            time.sleep(wait)
    raise AssertionError("unreachable")


def _train_once(session: Session, settings: Settings, run_id: str, stage: str, claim: execution.Claim):
    from ml.data import ImageSet
    from ml.pipeline import run_stage

    run = session.get(Run, run_id)
    sync = synced(settings)
    run_dir = local_run_dir(settings, run, sync)
    data = ImageSet.load(local_dataset_dir(settings, session.get(Dataset, run.dataset_id), sync))
    # The stored config was validated at submission: it is parsed, not checked again, and never
    # copied into the run directory (the database holds the one copy). A "run:<id>" weights
    # reference becomes that run's file, a "weights:<id>" one the upload's, on this machine (pulled
    # if need be).
    cfg = weights.resolve(
        session, run, run.recipe(), lambda source: local_run_dir(settings, source, sync), settings=settings
    )
    reporter = _Reporter(session, settings, run_id, stage, claim, on_epoch_end=lambda: sync.push(f"runs/{run_id}"))
    summary = run_stage(stage, run_dir, data, progress=reporter.progress, should_cancel=reporter.should_cancel, cfg=cfg)
    sync.push(f"runs/{run_id}")
    return summary or {}


class _Reporter:
    """The training loop's two callbacks. Progress is written at most every progress_interval_s
    (and at every epoch's end), the cancel flag polled every cancel_check_interval_s; both ride
    out a database restart: training pauses inside them while they retry with backoff."""

    def __init__(self, session, settings, run_id, stage, claim, on_epoch_end):
        self.session, self.settings, self.run_id, self.stage, self.claim = session, settings, run_id, stage, claim
        self.on_epoch_end = on_epoch_end
        self.last_write, self.last_epoch, self.last_check, self.canceled = 0.0, None, 0.0, False

    def _db(self, fn, what: str):
        return retry_infra(
            fn, what=f"run {self.run_id}: {what}", budget_s=self.settings.infra_retry_s, on_error=self.session.rollback
        )

    def progress(self, p: Any) -> None:
        epoch, step, steps = getattr(p, "epoch", None), getattr(p, "step", None), getattr(p, "steps", None)
        epoch_end = getattr(p, "epoch_end", False) or (bool(steps) and step == steps)
        now = time.monotonic()
        if getattr(p, "epoch_end", False):
            # The epoch's checkpoint reaches the store before the progress says the epoch is done:
            # a worker that takes the stage over from here resumes from it.
            self.on_epoch_end()
        if epoch_end or epoch != self.last_epoch or now - self.last_write >= self.settings.progress_interval_s:
            self._db(
                lambda: execution.record_progress(
                    self.session, self.run_id, self.stage, self.claim.attempt, p, self.claim.token
                ),
                "progress",
            )
            self.last_write, self.last_epoch = now, epoch

    def should_cancel(self) -> bool:
        now = time.monotonic()
        if not self.canceled and now - self.last_check >= self.settings.cancel_check_interval_s:
            self.canceled = self._db(lambda: execution.cancel_requested(self.session, self.run_id), "cancel poll")
            self.last_check = now
        return self.canceled


class Heartbeat:
    """Marks the stage alive every few seconds from a side thread, even through long steps (mining
    on a large set reports no progress for a while) so no other worker takes it over."""

    def __init__(self, run_id: str, token: str, settings: Settings, beat=None):
        self.run_id, self.token, self.every_s = run_id, token, settings.heartbeat_s
        self.beat = beat or execution.heartbeat  # an assignment job passes its own
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="scan-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                with new_session() as session:
                    self.beat(session, self.run_id, self.token)
            except Exception as exc:  # noqa: BLE001 - a database restart: beat again next time
                log.warning("heartbeat of run %s failed (%s); retrying", self.run_id, type(exc).__name__)
