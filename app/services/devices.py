"""The workers' devices, and what a run will cost on them before it is queued.

A training worker measures its device once at start (`python -m ml.calibrate`, cached) and
advertises it in ``worker_devices``; its dispatcher loop refreshes ``seen_at`` every
``recover_interval_s``. A run is planned against the training workers seen recently: the smallest
memory and the lowest throughput among them (any of them may take the run). With none seen, the
estimate uses ml.estimate.REFERENCE_DEVICE and says so, and no memory limit is applied.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from app.core.errors import Invalid
from app.core.settings import Settings
from app.tables import Dataset, WorkerDevice, utcnow
from ml import estimate as est
from ml.config import RunConfig

TRAINING_QUEUE = "gpu"


def advertise(session: Session, name: str, queues: list[str], calibration: dict[str, Any]) -> None:
    row = session.get(WorkerDevice, name) or WorkerDevice(name=name)
    row.queues = ",".join(queues)[:200]
    row.kind = str(calibration.get("kind", "cpu"))[:16]
    row.device_name = str(calibration.get("name", "unknown"))[:200]
    row.memory_bytes = int(calibration.get("memory_bytes") or 0)
    row.calibration = calibration
    row.started_at = row.seen_at = utcnow()
    session.add(row)
    session.commit()


def touch(session: Session, name: str) -> None:
    session.execute(
        update(WorkerDevice)
        .where(WorkerDevice.name == name)
        .values(seen_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    session.commit()


def forget(session: Session, name: str) -> None:
    session.execute(delete(WorkerDevice).where(WorkerDevice.name == name))
    session.commit()


def live(session: Session, settings: Settings) -> list[WorkerDevice]:
    """Training workers whose dispatcher loop was seen within three of its intervals (at least
    stale_after_s)."""
    window = max(settings.stale_after_s, 3 * settings.recover_interval_s)
    cutoff = utcnow() - timedelta(seconds=window)
    rows = session.scalars(select(WorkerDevice).where(WorkerDevice.seen_at >= cutoff).order_by(WorkerDevice.name))
    return [r for r in rows if TRAINING_QUEUE in r.queues.split(",")]


def planning_device(session: Session, settings: Settings) -> tuple[est.Device, bool]:
    """(the device a run is planned for, whether a worker reported it)."""
    rows = live(session, settings)
    if not rows:
        return est.REFERENCE_DEVICE, False
    speeds: dict[str, float] = {}
    for row in rows:
        for arch, v in (row.calibration.get("train_images_per_s") or {}).items():
            if isinstance(v, (int, float)) and v > 0:
                speeds[arch] = min(speeds.get(arch, float(v)), float(v))
    names = sorted({r.device_name for r in rows})
    kinds = {r.kind for r in rows}
    name = names[0] if len(names) == 1 else "the slowest of " + ", ".join(names)
    if len(rows) > 1:
        name = f"{name} ({len(rows)} workers)"
    memory = min(est.usable_memory(r.kind, r.memory_bytes) for r in rows)
    return est.Device("cuda" if kinds == {"cuda"} else "cpu", name, memory, speeds), True


def plan(
    session: Session, settings: Settings, config: dict[str, Any], dataset: Dataset, budget_minutes: float | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the config to run, its estimate). With budget_minutes the recipe is cut to fit; a recipe
    that cannot fit the workers' memory, or a budget no recipe fits, is a 422 naming the field."""
    cfg = RunConfig.model_validate(config)
    device, reported = planning_device(session, settings)
    n = dataset.count or 0
    native = max(dataset.height or 32, dataset.width or 32)
    channels = dataset.channels or 3
    changes: list[str] = []
    if budget_minutes is not None:
        try:
            cfg, changes = est.fit_budget(cfg, n, native, device, budget_minutes * 60)
        except ValueError as exc:
            raise Invalid(str(exc)) from exc
        cfg = RunConfig.model_validate(cfg.model_dump(mode="json"))
    if reported:
        problem = est.check_memory(cfg, n, native, channels, device)
        if problem:
            raise Invalid(problem)
    estimate = est.estimate(cfg, n, native, device, reported=reported)
    if budget_minutes is not None:
        estimate["budget_minutes"] = budget_minutes
        estimate["budget_changes"] = changes
    return cfg.model_dump(mode="json"), estimate
