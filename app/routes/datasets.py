"""/v1/datasets: upload or import, list, read, delete, and single items as PNG.

Ingest runs in a worker (queue ``cpu``); the POST waits for it (up to SCAN_INGEST_WAIT_S, or not at
all with ``?wait=false``) so bad input answers 4xx with the reader's message and leaves no row and no
file behind. A POST that stops waiting answers 202; its dataset then shows READY or FAILED (with the
message, files already removed) on GET.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from app.deps import SessionDep, SettingsDep, TenantDep
from app.schemas.common import ERRORS, ErrorBody, ItemIndex, Limit, Offset, Page
from app.schemas.datasets import DatasetImport, DatasetOut
from app.services import datasets as service
from app.tables import Dataset, DatasetState, new_id
from app.uploads import receive

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=ERRORS)

WAIT = Query(True, description="wait for ingest (up to SCAN_INGEST_WAIT_S) so bad input answers 4xx")
_ingest_responses = {
    201: {"model": DatasetOut, "description": "ingested, READY"},
    202: {"model": DatasetOut, "description": "accepted; ingest still running"},
    413: {"model": ErrorBody, "description": "upload larger than SCAN_MAX_UPLOAD_BYTES"},
}


def _answer(dataset: Dataset) -> JSONResponse:
    body = DatasetOut.model_validate(dataset).model_dump(mode="json")
    return JSONResponse(body, 201 if dataset.state == DatasetState.READY else 202)


@router.post(
    "",
    summary="Upload a dataset (zip, tar.gz, npz, IDX) as multipart field 'file'",
    status_code=201,
    response_model=DatasetOut,
    responses=_ingest_responses,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "name": {"type": "string", "description": "display name; default the file name"},
                        },
                    }
                }
            },
        }
    },
)
async def upload_dataset(
    request: Request,
    tenant: TenantDep,
    settings: SettingsDep,
    wait: bool = WAIT,
    split: Literal["train", "test"] = "train",
) -> JSONResponse:
    dataset_id = new_id()
    upload = await receive(request, service.upload_dir(settings, dataset_id), settings.max_upload_bytes)
    name = upload.fields.get("name") or upload.filename or "upload"
    await run_in_threadpool(
        service.create,
        settings,
        tenant,
        dataset_id,
        name=name,
        source=upload.filename or "upload",
        split=split,
        upload_path=str(upload.path),
    )
    return _answer(await service.wait_for_ingest(settings, dataset_id, settings.ingest_wait_s if wait else 0))


@router.post(
    "/import",
    summary="Import a built-in dataset by name",
    status_code=201,
    response_model=DatasetOut,
    responses=_ingest_responses,
)
async def import_dataset(
    body: DatasetImport, tenant: TenantDep, settings: SettingsDep, wait: bool = WAIT
) -> JSONResponse:
    dataset_id = new_id()
    await run_in_threadpool(
        service.create,
        settings,
        tenant,
        dataset_id,
        name=body.name or f"{body.source} ({body.split})",
        source=body.source,
        split=body.split,
        upload_path=None,
    )
    return _answer(await service.wait_for_ingest(settings, dataset_id, settings.ingest_wait_s if wait else 0))


@router.get("", summary="List your datasets", response_model=Page[DatasetOut])
def list_datasets(
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    state: Annotated[Literal["PENDING", "INGESTING", "READY", "FAILED"] | None, Query()] = None,
    limit: Limit = None,
    offset: Offset = 0,
) -> Page[DatasetOut]:
    limit = min(limit or settings.default_page_size, settings.max_page_size)
    rows, total = service.list_(session, tenant, state=state, limit=limit, offset=offset)
    return Page[DatasetOut](items=[DatasetOut.model_validate(r) for r in rows], total=total, limit=limit, offset=offset)


@router.get(
    "/{dataset_id}", summary="One dataset: state, count, image size, channels, labels", response_model=DatasetOut
)
def read_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep) -> Dataset:
    return service.get(session, tenant, dataset_id)


@router.delete(
    "/{dataset_id}",
    summary="Delete a dataset, its files, and its finished runs",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
)
def delete_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep, settings: SettingsDep) -> Response:
    service.delete(session, settings, tenant, dataset_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{dataset_id}/items/{index}.png",
    summary="One image of the dataset as PNG",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
def read_item(
    dataset_id: str, index: ItemIndex, session: SessionDep, tenant: TenantDep, settings: SettingsDep
) -> Response:
    dataset = service.get(session, tenant, dataset_id)
    return Response(
        service.item_png(settings, dataset, index),
        media_type="image/png",
        headers={"Cache-Control": "private, max-age=86400"},
    )
