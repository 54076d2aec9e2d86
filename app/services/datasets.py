"""Datasets: create and queue, ingest (in a worker), wait for ingest, list, delete, read one item.

Bad input never leaves anything behind: an upload lives under ``uploads/<id>/`` until ingest has
written the decoded cache atomically to ``datasets/<id>/``; a failed ingest removes both folders and
the API, which waits for the ingest task, deletes the row and answers 4xx with the reason.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import shutil
import time
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from app.core.artifacts import synced
from app.core.db import new_session
from app.core.errors import Conflict, Invalid, NotFound, Unavailable
from app.core.queue import enqueue_ingest
from app.core.settings import Settings
from app.core.text import MESSAGE as TEXT_MESSAGE
from app.core.text import is_printable
from app.services.failures import public_message, strip_paths
from app.tables import Dataset, DatasetState, ModelVersion, Run, RunState, Tenant, owned, utcnow

log = logging.getLogger("scan.ingest")


def safe_filename(name: str | None) -> str:
    """The client's file name reduced to a harmless basename that keeps its extension (the format)."""
    base = Path((name or "upload").replace("\\", "/")).name
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")
    return base[:120] or "upload"


def create(
    settings: Settings, tenant: Tenant, dataset_id: str, *, name: str, source: str, split: str, upload_path: str | None
) -> None:
    """Commit the PENDING row and queue its ingest; if the broker is down, nothing stays behind."""
    for what, text in (("name", name), ("file name", source)):
        if not is_printable(text):  # the multipart fields do not come through pydantic's PrintableText
            shutil.rmtree(upload_dir(settings, dataset_id), ignore_errors=True)
            raise Invalid(f"the dataset's {what} {TEXT_MESSAGE}")
    with new_session() as session:
        session.add(
            Dataset(
                id=dataset_id,
                tenant_id=tenant.id,
                name=name[:200],
                source=source[:500],
                split=split,
                upload_path=upload_path,
            )
        )
        session.commit()
    try:
        # With an artifact store, the cpu worker may be on another machine: the upload goes through it.
        synced(settings).push(f"uploads/{dataset_id}")
        enqueue_ingest(dataset_id)
    except Exception as exc:
        discard(settings, dataset_id)
        raise Unavailable(f"could not queue the ingest task, is the broker up? ({exc})") from exc


async def wait_for_ingest(settings: Settings, dataset_id: str, wait_s: float) -> Dataset:
    """The dataset once READY, or as it is after ``wait_s`` (still ingesting). A FAILED ingest is
    discarded (row and files) and raised as Invalid with the reader's message."""
    deadline = time.monotonic() + wait_s
    while True:
        dataset = await asyncio.to_thread(_read, dataset_id)
        if dataset.state == DatasetState.FAILED:
            await asyncio.to_thread(discard, settings, dataset_id)
            raise Invalid(dataset.error or "ingest failed")
        if dataset.state == DatasetState.READY or time.monotonic() >= deadline:
            return dataset
        await asyncio.sleep(0.1)


def _read(dataset_id: str) -> Dataset:
    with new_session() as session:
        return session.get(Dataset, dataset_id)


def discard(settings: Settings, dataset_id: str) -> None:
    """Remove a dataset that never became READY: its row and every file."""
    with new_session() as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is not None:
            remove_files(settings, dataset)
            session.delete(dataset)
            session.commit()


def get(session: Session, tenant: Tenant, dataset_id: str) -> Dataset:
    dataset = owned(session, Dataset, dataset_id, tenant.id)
    if dataset is None:
        raise NotFound(f"dataset {dataset_id} not found (list yours with GET /v1/datasets)")
    return dataset


def by_ids(session: Session, tenant: Tenant, ids: set[str]) -> dict[str, Dataset]:
    """The tenant's datasets among ``ids`` (others' and unknown ids are left out)."""
    if not ids:
        return {}
    rows = session.scalars(select(Dataset).where(Dataset.tenant_id == tenant.id, Dataset.id.in_(ids)))
    return {d.id: d for d in rows}


def list_(session: Session, tenant: Tenant, *, state: str | None, limit: int, offset: int) -> tuple[list[Dataset], int]:
    query = select(Dataset).where(Dataset.tenant_id == tenant.id)
    if state:
        query = query.where(Dataset.state == state)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(Dataset.created_at.desc(), Dataset.id).limit(limit).offset(offset)).all()
    return list(rows), total


def upload_dir(settings: Settings, dataset_id: str) -> Path:
    return settings.uploads_dir / dataset_id


def remove_files(settings: Settings, dataset: Dataset) -> None:
    shutil.rmtree(upload_dir(settings, dataset.id), ignore_errors=True)
    shutil.rmtree(settings.datasets_dir / dataset.id, ignore_errors=True)


def ingest(session: Session, settings: Settings, dataset_id: str) -> None:
    """Decode the upload (or built-in source) into the uint8 cache; called by the ``cpu`` worker.

    DataError marks the row FAILED with the reader's message and removes every file; the API (which
    is waiting) then deletes the row, or a user who did not wait sees the message on GET.
    """
    from ml.data import DataError, Limits, load_source  # lazy: keeps torch out of the API's import path
    from ml.data.cancel import Cancelled, cancel_check

    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.state not in (DatasetState.PENDING, DatasetState.INGESTING):
        return  # deleted meanwhile, or a redelivered task for a finished ingest
    dataset.state = DatasetState.INGESTING
    session.commit()
    try:
        source = dataset.upload_path or dataset.source
        if dataset.upload_path and settings.artifact_store:
            # The API's path names its own folder: fetch the upload and find it under ours.
            synced(settings).pull(f"uploads/{dataset.id}")
            parts = Path(dataset.upload_path).parts
            source = str(upload_dir(settings, dataset.id).joinpath(*parts[parts.index(dataset.id) + 1 :]))
        # One decoded copy per dataset: an upload is decoded straight into datasets/<id> (a cache
        # keyed on a deleted upload would only be a second copy that nothing owns); the built-ins,
        # shared by every tenant, keep their cache.
        cache = None if dataset.upload_path else settings.artifacts / "cache"
        limits = Limits(max_decoded_bytes=settings.max_dataset_bytes)
        # A DELETE during the ingest stops the decode at the next batch (ml.data.cancel).
        with cancel_check(_deleted_check(dataset_id)):
            data = load_source(source, split=dataset.split, cache_dir=cache, limits=limits)
        if data.n == 0:
            raise DataError(dataset.name, "contains no images")
        data.save(settings.datasets_dir / dataset.id)
    except Cancelled as exc:
        session.rollback()
        _deleted_meanwhile(session, settings, dataset_id)
        log.info("ingest of dataset %s stopped: deleted during its ingest (%s)", dataset_id, exc)
        return
    except Exception as exc:
        session.rollback()
        dataset = session.get(Dataset, dataset_id)
        remove_files(settings, dataset)
        dataset.state = DatasetState.FAILED
        if isinstance(exc, DataError):
            # Name the user's file (and the member in it), not the server's temporary path.
            dataset.error = strip_paths(str(exc).replace(str(upload_dir(settings, dataset.id)) + "/", ""))
        else:
            log.exception("ingest of dataset %s failed", dataset_id)
            dataset.error = "could not ingest: " + public_message(exc)
        session.commit()
        return
    if _deleted_meanwhile(session, settings, dataset_id):
        return
    # With an artifact store, training workers on other machines fetch the dataset from there.
    synced(settings).push(f"datasets/{dataset.id}")
    shutil.rmtree(upload_dir(settings, dataset.id), ignore_errors=True)
    synced(settings).delete(f"uploads/{dataset.id}")
    dataset.state = DatasetState.READY
    dataset.count, dataset.channels = int(data.n), int(data.channels)
    dataset.height, dataset.width = int(data.height), int(data.width)
    dataset.labelled = data.labels is not None
    dataset.class_names = list(data.class_names) if data.class_names else None
    dataset.storage_path = str(settings.datasets_dir / dataset.id)
    dataset.upload_path = None
    dataset.ready_at = utcnow()
    try:
        session.commit()
    except StaleDataError:  # DELETE won the race between the check above and this commit
        session.rollback()
        _deleted_meanwhile(session, settings, dataset_id)


def _deleted_check(dataset_id: str, every_s: float = 0.5):
    """``() -> bool``: has the dataset's row gone (a DELETE answered 204)? Asks the database at most
    every ``every_s``; an unreachable database means "keep going" (the ingest's own commit will
    find out)."""
    last = time.monotonic()

    def deleted() -> bool:
        nonlocal last
        if time.monotonic() - last < every_s:
            return False
        last = time.monotonic()
        try:
            with new_session() as session:
                return session.get(Dataset, dataset_id) is None
        except Exception as exc:  # noqa: BLE001 - a cancel poll must never fail the ingest
            log.warning("could not check whether dataset %s was deleted: %s", dataset_id, type(exc).__name__)
            return False

    return deleted


def _deleted_meanwhile(session: Session, settings: Settings, dataset_id: str) -> bool:
    """A DELETE during ingest answered 204 and removed the row: the ingest's files must not outlive
    it (they once did, 2 x 2 GiB that no row pointed to)."""
    session.expire_all()
    if session.get(Dataset, dataset_id) is not None:
        return False
    shutil.rmtree(upload_dir(settings, dataset_id), ignore_errors=True)
    shutil.rmtree(settings.datasets_dir / dataset_id, ignore_errors=True)
    log.info("dataset %s was deleted during its ingest; its files are removed", dataset_id)
    return True


def delete(session: Session, settings: Settings, tenant: Tenant, dataset_id: str) -> None:
    dataset = get(session, tenant, dataset_id)
    active = session.scalar(
        select(func.count()).select_from(Run).where(Run.dataset_id == dataset.id, Run.state.in_(RunState.ACTIVE))
    )
    if active:
        raise Conflict(
            f"dataset {dataset_id} has {active} run(s) in progress; cancel them first (POST /v1/runs/{{id}}/cancel)"
        )
    published = session.scalar(
        select(func.count())
        .select_from(ModelVersion)
        .join(Run, Run.id == ModelVersion.run_id)
        .where(Run.dataset_id == dataset.id)
    )
    if published:
        # Deleting it would take model versions (and the aliases apps call) away without a word.
        raise Conflict(
            f"dataset {dataset_id} has runs published as {published} model version(s); "
            "delete those models first (DELETE /v1/models/{name})"
        )
    runs = session.execute(select(Run.id, Run.run_dir).where(Run.dataset_id == dataset.id)).all()
    session.delete(dataset)  # runs and their results follow by ON DELETE CASCADE
    session.commit()
    remove_files(settings, dataset)
    store = synced(settings)
    store.delete(f"datasets/{dataset.id}")
    for run_id, run_dir in runs:
        store.delete(f"runs/{run_id}")
        if run_dir:
            shutil.rmtree(run_dir, ignore_errors=True)


def item_png(settings: Settings, dataset: Dataset, index: int) -> bytes:
    import numpy as np
    from PIL import Image

    if dataset.state != DatasetState.READY:
        raise Conflict(f"dataset {dataset.id} is {dataset.state}, not READY")
    if not 0 <= index < (dataset.count or 0):
        raise NotFound(f"item {index} is out of range: dataset {dataset.id} has items 0..{(dataset.count or 0) - 1}")
    images = np.load(Path(dataset.storage_path) / "images.npy", mmap_mode="r")
    chw = np.asarray(images[index])
    hwc = chw[0] if chw.shape[0] == 1 else np.transpose(chw, (1, 2, 0))
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(hwc)).save(buf, format="PNG")
    return buf.getvalue()
