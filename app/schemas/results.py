from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from app.schemas.common import ORMModel


class ClusterOut(ORMModel):
    index: int
    size: int
    mean_confidence: float | None = None
    prototype: int | None = None
    top_items: list[int] | None = None
    matched_label: str | None = None


class AssignmentOut(ORMModel):
    item_index: int
    cluster: int
    confidence: float


class AssignmentPage(BaseModel):
    items: list[AssignmentOut]
    total: int
    page: int
    page_size: int


class MetricsOut(BaseModel):
    run_id: str
    metrics: dict[str, Any]
