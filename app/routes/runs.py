"""/v1/runs: submit, list, read (per-stage progress), cancel, and the progress log (JSON or SSE)."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from app.core.faults import is_infrastructure_error
from app.core.text import PrintableText
from app.deps import SessionDep, SettingsDep, TenantDep
from app.schemas.common import ERRORS, MAX_INT, ErrorBody, Limit, Offset, Page
from app.schemas.runs import EventPage, RunCreate, RunEventOut, RunOut, RunStateName, StageOut
from app.services import runs as service
from app.tables import Run, RunState

router = APIRouter(prefix="/v1/runs", tags=["runs"], responses=ERRORS)


def run_out(session, run: Run) -> RunOut:
    out = RunOut.model_validate(run)
    out.stages = [StageOut.model_validate(s) for s in service.stages(session, run)]
    return out


@router.post(
    "",
    summary="Start a training run (answers 202 with the queued run)",
    status_code=202,
    response_model=RunOut,
    responses={
        200: {"model": RunOut, "description": "replay of an earlier request with the same Idempotency-Key"},
        409: {"model": ErrorBody, "description": "Idempotency-Key reused with another body, or dataset not READY"},
        503: {"model": ErrorBody, "description": "broker unreachable"},
    },
)
def create_run(
    body: RunCreate,
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    idempotency_key: Annotated[
        PrintableText | None, Header(max_length=200, description="same key and body give back the same run")
    ] = None,
) -> JSONResponse:
    run, created = service.submit(session, settings, tenant, body.model_dump(mode="json"), idempotency_key)
    return JSONResponse(run_out(session, run).model_dump(mode="json"), 202 if created else 200)


@router.get("", summary="List your runs (filter by state and dataset)", response_model=Page[RunOut])
def list_runs(
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    state: Annotated[RunStateName | None, Query()] = None,
    dataset_id: Annotated[str | None, Query()] = None,
    limit: Limit = None,
    offset: Offset = 0,
) -> Page[RunOut]:
    limit = min(limit or settings.default_page_size, settings.max_page_size)
    rows, total = service.list_(session, tenant, state=state, dataset_id=dataset_id, limit=limit, offset=offset)
    return Page[RunOut](items=[run_out(session, r) for r in rows], total=total, limit=limit, offset=offset)


@router.get("/{run_id}", summary="One run: state, current stage, per-stage progress, error", response_model=RunOut)
def read_run(run_id: str, session: SessionDep, tenant: TenantDep) -> RunOut:
    return run_out(session, service.get(session, tenant, run_id))


@router.post(
    "/{run_id}/cancel",
    summary="Ask a run to stop (it ends CANCELED within seconds)",
    status_code=202,
    response_model=RunOut,
)
def cancel_run(run_id: str, session: SessionDep, tenant: TenantDep, settings: SettingsDep) -> RunOut:
    return run_out(session, service.cancel(session, settings, tenant, run_id))


@router.post(
    "/{run_id}/retry",
    summary="Resume a FAILED or CANCELED run from its last checkpoints",
    status_code=202,
    response_model=RunOut,
    responses={409: {"model": ErrorBody, "description": "the run is not FAILED or CANCELED"}},
)
def retry_run(run_id: str, session: SessionDep, tenant: TenantDep, settings: SettingsDep) -> RunOut:
    return run_out(session, service.retry(session, settings, tenant, run_id))


@router.get(
    "/{run_id}/events",
    summary="The progress log, paginated by ?after=<event id>; "
    "`Accept: text/event-stream` streams it as Server-Sent Events",
    response_model=EventPage,
    responses={200: {"content": {"text/event-stream": {}}}},
)
def list_events(
    run_id: str,
    request: Request,
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    after: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
    limit: Limit = None,
):
    run = service.get(session, tenant, run_id)
    if "text/event-stream" in request.headers.get("accept", ""):
        return _sse(run.id, _last_event_id(request, after))
    limit = min(limit or settings.default_page_size, settings.max_page_size)
    rows = service.events(session, run, after=after, limit=limit)
    return EventPage(
        items=[RunEventOut.model_validate(r) for r in rows],
        total=service.count_events(session, run),
        next_after=rows[-1].id if rows else after,
    )


@router.get(
    "/{run_id}/events/stream",
    summary="The progress log as Server-Sent Events until the run ends",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
def stream_events(
    run_id: str,
    request: Request,
    session: SessionDep,
    tenant: TenantDep,
    after: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
) -> StreamingResponse:
    run = service.get(session, tenant, run_id)
    return _sse(run.id, _last_event_id(request, after))


def _last_event_id(request: Request, after: int) -> int:
    value = request.headers.get("last-event-id", "")
    # A header is not schema-checked: an over-long id must not reach the database as a huge integer.
    return int(value) if value.isdigit() and len(value) <= 10 and int(value) <= MAX_INT else after


def _sse(run_id: str, after: int) -> StreamingResponse:
    async def stream():
        last, idle = after, 0.0
        while True:
            try:
                rows, state = await run_in_threadpool(service.events_since, run_id, last)
            except Exception as exc:
                if not is_infrastructure_error(exc):
                    raise
                # The status line is long sent: keep the stream and poll again when the database is back.
                yield ": database unreachable; retrying\n\n"
                await asyncio.sleep(2)
                continue
            for row in rows:
                last = row.id
                payload = RunEventOut.model_validate(row).model_dump_json()
                yield f"id: {row.id}\nevent: {row.kind}\ndata: {payload}\n\n"
            if not rows and state in RunState.TERMINAL:
                yield f"event: end\ndata: {json.dumps({'state': state})}\n\n"
                return
            idle = 0.0 if rows else idle + 0.5
            if idle >= 15:  # keep proxies from closing a quiet stream
                idle = 0.0
                yield ": keep-alive\n\n"
            await asyncio.sleep(0.5)

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
