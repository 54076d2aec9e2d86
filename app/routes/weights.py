"""/v1/weights: bring-your-own backbone weights, uploaded, listed, read and deleted by their tenant.

The upload is streamed to disk (bounded by SCAN_MAX_WEIGHTS_BYTES, 413 beyond), then validated as a
plain state dict that fits the named arch and stored under the tenant (app/services/weights.py). A
run starts from them with ``"pretext.backbone_weights": "weights:<id>"``.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from app.core.errors import Invalid
from app.deps import SessionDep, SettingsDep, TenantDep
from app.schemas.common import ERRORS, ErrorBody, Limit, Offset, Page
from app.schemas.weights import WeightsOut
from app.services import weights as service
from app.tables import new_id
from app.uploads import receive

router = APIRouter(prefix="/v1/weights", tags=["weights"], responses=ERRORS)

MIN_WIDTH, MAX_WIDTH = 4, 512  # ml/config.py's bounds on `width`


@router.post(
    "",
    summary="Upload backbone weights (a state dict saved with torch.save) as multipart field 'file'",
    status_code=201,
    response_model=WeightsOut,
    responses={413: {"model": ErrorBody, "description": "upload larger than SCAN_MAX_WEIGHTS_BYTES"}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file", "arch"],
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "arch": {"type": "string", "enum": list(service.ARCHS)},
                            "width": {"type": "integer", "minimum": MIN_WIDTH, "maximum": MAX_WIDTH, "default": 32},
                            "name": {"type": "string", "description": "display name; default the file name"},
                        },
                    }
                }
            },
        }
    },
)
async def upload_weights(request: Request, tenant: TenantDep, settings: SettingsDep) -> JSONResponse:
    weights_id = new_id()
    upload = await receive(
        request, settings.uploads_dir / weights_id, settings.max_weights_bytes, "SCAN_MAX_WEIGHTS_BYTES"
    )
    try:
        arch = upload.fields.get("arch")
        if not arch:
            raise Invalid(f"arch: give the backbone these weights fit, one of {', '.join(service.ARCHS)}")
        width_text = upload.fields.get("width", "32").strip()
        if not (width_text.isascii() and width_text.isdigit()) or not MIN_WIDTH <= int(width_text) <= MAX_WIDTH:
            raise Invalid(f"width: an integer from {MIN_WIDTH} to {MAX_WIDTH}")
    except Invalid:
        service.discard_upload(upload.path)
        raise
    row = await run_in_threadpool(
        service.create,
        settings,
        tenant,
        weights_id,
        name=upload.fields.get("name") or upload.filename or "weights",
        arch=arch,
        width=int(width_text),
        upload_path=upload.path,
    )
    return JSONResponse(WeightsOut.of(row).model_dump(mode="json"), 201)


@router.get("", summary="List your uploaded weights", response_model=Page[WeightsOut])
def list_weights(
    session: SessionDep, tenant: TenantDep, settings: SettingsDep, limit: Limit = None, offset: Offset = 0
) -> Page[WeightsOut]:
    limit = min(limit or settings.default_page_size, settings.max_page_size)
    rows, total = service.list_(session, tenant, limit=limit, offset=offset)
    return Page[WeightsOut](items=[WeightsOut.of(r) for r in rows], total=total, limit=limit, offset=offset)


@router.get("/{weights_id}", summary="One upload of weights", response_model=WeightsOut)
def read_weights(weights_id: str, session: SessionDep, tenant: TenantDep) -> WeightsOut:
    return WeightsOut.of(service.get(session, tenant, weights_id))


@router.delete(
    "/{weights_id}",
    summary="Delete weights (409 while a run in progress starts from them)",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
)
def delete_weights(weights_id: str, session: SessionDep, tenant: TenantDep, settings: SettingsDep) -> Response:
    service.delete(session, settings, tenant, weights_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
