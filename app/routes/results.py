"""/v1/runs/{id}/clusters, /assignments, /metrics: results of a SUCCEEDED run, from the database."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.deps import SessionDep, SettingsDep, TenantDep
from app.schemas.common import ERRORS, MAX_INT
from app.schemas.results import AssignmentOut, AssignmentPage, ClusterOut, MetricsOut
from app.services import results as service
from app.services import runs as run_service

router = APIRouter(prefix="/v1/runs", tags=["results"], responses=ERRORS)


@router.get(
    "/{run_id}/clusters",
    summary="Clusters: size, mean confidence, prototype and top items, matched label",
    response_model=list[ClusterOut],
)
def list_clusters(run_id: str, session: SessionDep, tenant: TenantDep) -> list[ClusterOut]:
    run = run_service.get(session, tenant, run_id)
    return [ClusterOut.model_validate(c) for c in service.clusters(session, run)]


@router.get(
    "/{run_id}/assignments",
    summary="Per-item cluster and confidence, filtered and paginated",
    response_model=AssignmentPage,
)
def list_assignments(
    run_id: str,
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    cluster: Annotated[int | None, Query(ge=0, le=MAX_INT)] = None,
    min_confidence: Annotated[float | None, Query(ge=0, le=1)] = None,
    page: Annotated[int, Query(ge=1, le=MAX_INT)] = 1,
    page_size: Annotated[int | None, Query(ge=1, le=MAX_INT)] = None,
) -> AssignmentPage:
    run = run_service.get(session, tenant, run_id)
    page_size = min(page_size or settings.default_page_size, settings.max_page_size)
    rows, total = service.assignments(
        session, run, cluster=cluster, min_confidence=min_confidence, page=page, page_size=page_size
    )
    return AssignmentPage(
        items=[AssignmentOut.model_validate(r) for r in rows], total=total, page=page, page_size=page_size
    )


@router.get(
    "/{run_id}/metrics",
    summary="ACC/NMI/ARI/top-5/confusion, K-means baseline, neighbour purity, mean +- std over seeds",
    response_model=MetricsOut,
)
def read_metrics(run_id: str, session: SessionDep, tenant: TenantDep) -> MetricsOut:
    run = run_service.get(session, tenant, run_id)
    metrics = service.metrics(session, run)
    return MetricsOut(run_id=run.id, metrics=metrics, seeds=metrics.get("seeds"))
