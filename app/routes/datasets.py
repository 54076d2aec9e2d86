"""/v1/datasets: upload or import, list, read, delete, and single items as PNG.

Ingest runs in a worker (queue ``cpu``); the POST waits for it (up to SCAN_INGEST_WAIT_S, or not at
all with ``?wait=false``) so bad input answers 4xx with the reader's message and leaves no row and no
file behind. A POST that stops waiting answers 202; its dataset then shows READY or FAILED (with the
message, files already removed) on GET.
"""
from __future__ import annotations

import asyncio
import time
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from app.core.db import new_session
from app.deps import SessionDep, SettingsDep, TenantDep
from app.models import Dataset, DatasetState, Tenant, new_id
from app.schemas.common import ERRORS, ErrorBody, Page
from app.schemas.datasets import DatasetImport, DatasetOut
from app.services import datasets as service
from app.services.queue import enqueue_ingest
from app.uploads import receive

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=ERRORS)

WAIT = Query(True, description="wait for ingest (up to SCAN_INGEST_WAIT_S) so bad input answers 4xx")
_ingest_responses = {201: {"model": DatasetOut, "description": "ingested, READY"},
                     202: {"model": DatasetOut, "description": "accepted; ingest still running"},
                     413: {"model": ErrorBody, "description": "upload larger than SCAN_MAX_UPLOAD_BYTES"}}


def _create_row(tenant: Tenant, dataset_id: str, *, name: str, source: str, split: str,
                upload_path: str | None) -> None:
    with new_session() as session:
        session.add(Dataset(id=dataset_id, tenant_id=tenant.id, name=name[:200], source=source[:500],
                            split=split, upload_path=upload_path))
        session.commit()


def _read(dataset_id: str) -> Dataset | None:
    with new_session() as session:
        return session.get(Dataset, dataset_id)


def _discard(settings, dataset_id: str) -> None:  # noqa: ANN001
    with new_session() as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is not None:
            service.remove_files(settings, dataset)
            session.delete(dataset)
            session.commit()


async def _ingest_and_answer(settings, dataset_id: str, wait: bool) -> JSONResponse:  # noqa: ANN001
    try:
        await run_in_threadpool(enqueue_ingest, dataset_id)
    except Exception as exc:  # noqa: BLE001 - the broker is down: nothing must stay behind
        await run_in_threadpool(_discard, settings, dataset_id)
        return JSONResponse({"detail": f"could not queue the ingest task, is the broker up? ({exc})"}, 503)
    deadline = time.monotonic() + (settings.ingest_wait_s if wait else 0)
    while True:
        dataset = await run_in_threadpool(_read, dataset_id)
        if dataset.state == DatasetState.FAILED:
            await run_in_threadpool(_discard, settings, dataset_id)
            return JSONResponse({"detail": dataset.error or "ingest failed"}, 422)
        if dataset.state == DatasetState.READY:
            return JSONResponse(DatasetOut.model_validate(dataset).model_dump(mode="json"), 201)
        if time.monotonic() >= deadline:
            return JSONResponse(DatasetOut.model_validate(dataset).model_dump(mode="json"), 202)
        await asyncio.sleep(0.1)


@router.post("", summary="Upload a dataset (zip, tar.gz, npz, IDX) as multipart field 'file'",
             status_code=201, response_model=DatasetOut, responses=_ingest_responses,
             openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                 "type": "object", "required": ["file"], "properties": {
                     "file": {"type": "string", "format": "binary"},
                     "name": {"type": "string", "description": "display name; default the file name"}}}}}}})
async def upload_dataset(request: Request, tenant: TenantDep, settings: SettingsDep, wait: bool = WAIT,
                         split: Literal["train", "test"] = "train") -> JSONResponse:
    dataset_id = new_id()
    upload = await receive(request, service.upload_dir(settings, dataset_id), settings.max_upload_bytes)
    name = upload.fields.get("name") or upload.filename or "upload"
    await run_in_threadpool(_create_row, tenant, dataset_id, name=name, source=upload.filename or "upload",
                            split=split, upload_path=str(upload.path))
    return await _ingest_and_answer(settings, dataset_id, wait)


@router.post("/import", summary="Import a built-in dataset by name", status_code=201, response_model=DatasetOut,
             responses=_ingest_responses)
async def import_dataset(body: DatasetImport, tenant: TenantDep, settings: SettingsDep,
                         wait: bool = WAIT) -> JSONResponse:
    dataset_id = new_id()
    await run_in_threadpool(_create_row, tenant, dataset_id, name=body.name or f"{body.source} ({body.split})",
                            source=body.source, split=body.split, upload_path=None)
    return await _ingest_and_answer(settings, dataset_id, wait)


@router.get("", summary="List your datasets", response_model=Page[DatasetOut])
def list_datasets(session: SessionDep, tenant: TenantDep, settings: SettingsDep,
                  state: Annotated[Literal["PENDING", "INGESTING", "READY", "FAILED"] | None, Query()] = None,
                  limit: Annotated[int | None, Query(ge=1)] = None,
                  offset: Annotated[int, Query(ge=0)] = 0) -> Page[DatasetOut]:
    limit = min(limit or settings.default_page_size, settings.max_page_size)
    rows, total = service.list_(session, tenant, state=state, limit=limit, offset=offset)
    return Page[DatasetOut](items=[DatasetOut.model_validate(r) for r in rows], total=total, limit=limit,
                            offset=offset)


@router.get("/{dataset_id}", summary="One dataset: state, count, image size, channels, labels",
            response_model=DatasetOut)
def read_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep) -> Dataset:
    return service.get(session, tenant, dataset_id)


@router.delete("/{dataset_id}", summary="Delete a dataset, its files, and its finished runs",
               status_code=status.HTTP_204_NO_CONTENT, response_class=Response)
def delete_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep, settings: SettingsDep) -> Response:
    service.delete(session, settings, tenant, dataset_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{dataset_id}/items/{index}.png", summary="One image of the dataset as PNG",
            response_class=Response, responses={200: {"content": {"image/png": {}}}})
def read_item(dataset_id: str, index: int, session: SessionDep, tenant: TenantDep,
              settings: SettingsDep) -> Response:
    dataset = service.get(session, tenant, dataset_id)
    return Response(service.item_png(settings, dataset, index), media_type="image/png",
                    headers={"Cache-Control": "private, max-age=86400"})
