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

import json
import logging
import socket
import subprocess
import sys
import threading

from celery import signals
from sqlalchemy import inspect

from app.core.db import get_engine, new_session
from app.core.queue import celery_app as _celery_app
from app.core.settings import get_settings
from app.services import devices, webhooks
from app.services.dispatcher import dispatch_once

log = logging.getLogger("scan.worker")

celery_app = _celery_app()


@signals.worker_process_init.connect
def _fresh_connections_in_child(**_: object) -> None:
    # A forked child must not reuse the parent's database sockets.
    get_engine().dispose(close=False)


def _queues(sender) -> list[str]:
    try:
        return sorted(sender.app.amqp.queues.consume_from)
    except Exception:  # noqa: BLE001 - an older Celery without consume_from: advertise nothing
        return []


_calibrations: list[subprocess.Popen] = []  # running ml.calibrate children, stopped with the worker


def _calibrate(settings) -> dict | None:
    """ml/calibrate.py in a subprocess (the main process must not touch CUDA before it forks),
    cached per host under the var dir."""
    cache = settings.calibration_cache or settings.var_dir / "calibration" / f"{socket.gethostname()}.json"
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ml.calibrate", "--cache", str(cache)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    except OSError as exc:
        log.warning("device calibration failed (%s); estimates use the reference figures", type(exc).__name__)
        return None
    _calibrations.append(proc)
    try:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, proc.args)
        return json.loads(out.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as exc:
        proc.kill()
        proc.wait()
        log.warning("device calibration failed (%s); estimates use the reference figures", type(exc).__name__)
        return None
    finally:
        _calibrations.remove(proc)


@signals.worker_shutdown.connect
def _stop_calibration(**_: object) -> None:
    """A worker told to stop while it still measures its device must not leave the measurement
    running behind it (found by the per-GPU launcher test: the launcher's group outlived it)."""
    for proc in list(_calibrations):
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@signals.worker_ready.connect
def _start_dispatcher(sender=None, **_: object) -> None:  # Celery passes the consumer as sender
    """In the worker's main process: the outbox's dispatcher, every recover_interval_s; a
    training worker first measures and advertises its device (app/services/devices.py), and the
    same loop keeps its advertisement fresh."""
    settings = get_settings()
    stop = threading.Event()
    name = getattr(sender, "hostname", None) or socket.gethostname()
    queues = _queues(sender)
    advertised = threading.Event()

    def advertise() -> None:
        calibration = _calibrate(settings)
        if calibration is None:
            return
        while not stop.is_set():
            try:
                with new_session() as session:
                    devices.advertise(session, name, queues, calibration)
                advertised.set()
                log.info("advertised device %s for queues %s", calibration.get("name"), queues)
                return
            except Exception as exc:  # noqa: BLE001 - schema not there yet, database down: retry
                log.info("advertising the device: %s; retrying", type(exc).__name__)
                stop.wait(settings.recover_interval_s)

    if devices.TRAINING_QUEUE in queues:
        threading.Thread(target=advertise, name="scan-calibrate", daemon=True).start()

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
                if advertised.is_set():
                    with new_session() as session:
                        devices.touch(session, name)
            except Exception as exc:  # noqa: BLE001 - a database or broker hiccup must not kill the dispatcher
                log.warning("dispatcher: %s: %s; retrying", type(exc).__name__, exc)
            stop.wait(settings.recover_interval_s)

    def shutdown(**_: object) -> None:
        stop.set()
        if advertised.is_set():
            try:
                with new_session() as session:
                    devices.forget(session, name)
            except Exception as exc:  # noqa: BLE001 - the row goes stale on its own
                log.info("withdrawing the device advertisement: %s", type(exc).__name__)

    threading.Thread(target=loop, name="scan-dispatcher", daemon=True).start()
    signals.worker_shutdown.connect(shutdown, weak=False)

    def send_webhooks() -> None:
        schema_seen = False
        while not stop.wait(settings.webhook_poll_s):
            try:
                schema_seen = schema_seen or inspect(get_engine()).has_table("webhook_deliveries")
                while schema_seen and webhooks.send_due(settings):
                    pass
            except Exception as exc:  # noqa: BLE001 - a database hiccup must not kill the sender
                log.warning("webhook sender: %s: %s; retrying", type(exc).__name__, exc)

    threading.Thread(target=loop, name="scan-dispatcher", daemon=True).start()
    # The webhook outbox's sender: its own thread, so a slow receiver never delays a dispatch.
    threading.Thread(target=send_webhooks, name="scan-webhooks", daemon=True).start()
    signals.worker_shutdown.connect(lambda **_: stop.set(), weak=False)
