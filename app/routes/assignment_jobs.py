"""/v1/assignment-jobs: assign a dataset to a finished model on the workers, follow it, cancel and
resume it, page its assignments and read its drift report."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from app.deps import SessionDep, SettingsDep, TenantDep
from app.schemas.assignment_jobs import (
    AssignmentJobCreate,
    AssignmentJobOut,
    DriftReport,
    JobAssignmentOut,
    JobAssignmentPage,
    JobStateName,
)
from app.schemas.common import ERRORS, MAX_INT, ErrorBody, Limit, Offset, Page
from app.services import assignment_jobs as service

router = APIRouter(prefix="/v1/assignment-jobs", tags=["assignment jobs"], responses=ERRORS)


@router.post(
    "",
    summary="Assign one of your datasets to one of your finished models (answers 202 with the queued job)",
    status_code=202,
    response_model=AssignmentJobOut,
    responses={409: {"model": ErrorBody, "description": "dataset not READY or run not SUCCEEDED"}},
)
def create_assignment_job(
    body: AssignmentJobCreate, session: SessionDep, tenant: TenantDep, settings: SettingsDep
) -> AssignmentJobOut:
    return AssignmentJobOut.of(service.create(session, settings, tenant, body.model_dump()))


@router.get("", summary="List your assignment jobs", response_model=Page[AssignmentJobOut])
def list_assignment_jobs(
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    state: Annotated[JobStateName | None, Query()] = None,
    limit: Limit = None,
    offset: Offset = 0,
) -> Page[AssignmentJobOut]:
    limit = min(limit or settings.default_page_size, settings.max_page_size)
    rows, total = service.list_(session, tenant, state=state, limit=limit, offset=offset)
    return Page[AssignmentJobOut](items=[AssignmentJobOut.of(j) for j in rows], total=total, limit=limit, offset=offset)


@router.get("/{job_id}", summary="One assignment job: state and progress", response_model=AssignmentJobOut)
def read_assignment_job(job_id: str, session: SessionDep, tenant: TenantDep) -> AssignmentJobOut:
    return AssignmentJobOut.of(service.get(session, tenant, job_id))


@router.post(
    "/{job_id}/cancel",
    summary="Stop an assignment job (after its current batch)",
    status_code=202,
    response_model=AssignmentJobOut,
)
def cancel_assignment_job(
    job_id: str, session: SessionDep, tenant: TenantDep, settings: SettingsDep
) -> AssignmentJobOut:
    return AssignmentJobOut.of(service.cancel(session, settings, tenant, job_id))


@router.post(
    "/{job_id}/resume",
    summary="Continue a FAILED or CANCELED assignment job from its checkpoint",
    status_code=202,
    response_model=AssignmentJobOut,
)
def resume_assignment_job(
    job_id: str, session: SessionDep, tenant: TenantDep, settings: SettingsDep
) -> AssignmentJobOut:
    return AssignmentJobOut.of(service.resume(session, settings, tenant, job_id))


@router.get(
    "/{job_id}/assignments",
    summary="The job's assignments so far (cluster, its name in the model version, confidence, novelty), paginated",
    response_model=JobAssignmentPage,
)
def list_job_assignments(
    job_id: str,
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    cluster: Annotated[int | None, Query(ge=0, le=MAX_INT)] = None,
    order: Annotated[Literal["item", "novelty_desc", "confidence_asc"], Query()] = "item",
    limit: Limit = None,
    offset: Offset = 0,
) -> JobAssignmentPage:
    job = service.get(session, tenant, job_id)
    limit = min(limit or settings.default_page_size, settings.max_page_size)
    rows, total, version = service.assignments(session, job, cluster=cluster, order=order, limit=limit, offset=offset)
    return JobAssignmentPage(
        model=job.model,
        version=version,
        items=[JobAssignmentOut.model_validate(r) for r in rows],
        total=total,
        limit=limit,
        offset=offset,
    )


@router.get(
    "/{job_id}/drift",
    summary="The drift report of a SUCCEEDED job against the model's training data",
    response_model=DriftReport,
)
def read_drift(job_id: str, session: SessionDep, tenant: TenantDep) -> DriftReport:
    return DriftReport.model_validate(service.drift(session, service.get(session, tenant, job_id)))
