"""GET /v1/runs/{run_id}/model?format=onnx|torchscript: the classifier as a zip to run anywhere.

The zip holds the model (`model.onnx` or `model.pt`) and `preprocessing.json` (input size,
channels, `uint8 / 255` scaling, output = cluster probabilities). It is exported once per run and
format (`run_dir/export/`), so later downloads are a file transfer.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from app.deps import SessionDep, TenantDep
from app.schemas.common import ERRORS
from app.services import runs as run_service

router = APIRouter(tags=["serving"], responses=ERRORS)


@router.get(
    "/v1/runs/{run_id}/model",
    response_class=FileResponse,
    summary="Download the run's model (ONNX or TorchScript) with its preprocessing.json",
    responses={200: {"content": {"application/zip": {}}}},
)
async def download_model(
    run_id: str,
    session: SessionDep,
    tenant: TenantDep,
    format: Annotated[
        Literal["onnx", "torchscript"],
        Query(description="onnx (onnxruntime, TensorRT, ...) or torchscript (torch.jit.load)"),
    ] = "onnx",
):
    from ml.export import export_archive

    run = run_service.get(session, tenant, run_id)
    run_dir = run_service.servable_run_dir(run)
    session.close()
    # Exporting traces the model: seconds of CPU, so off the event loop.
    archive = await run_in_threadpool(export_archive, run_dir, format)
    return FileResponse(archive, media_type="application/zip", filename=f"scan-run-{run_id}-{format}.zip")
