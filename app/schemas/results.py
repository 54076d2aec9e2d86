from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

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


class SeedRunOut(BaseModel):
    index: int = Field(description="0-based; seed 0 is the run's own seed")
    seed: int
    scan: dict[str, float] = Field(description="after clustering: ACC, NMI, ARI... (with labels), scan_loss, confident")
    selflabel: dict[str, float] | None = Field(None, description="after self-labeling (absent when it is off)")


class SeedsOut(BaseModel):
    n: int
    kept: int = Field(description="index of the seed that is served, exported and shown")
    kept_seed: int
    criterion: str = Field(description="how the kept seed was chosen, without labels")
    std_ddof: int = Field(description="std is numpy's with this ddof (1: the sample standard deviation)")
    runs: list[SeedRunOut]
    mean: dict[str, dict[str, float]] = Field(description='{"scan": {...}, "selflabel": {...}}')
    std: dict[str, dict[str, float]]


class MetricsOut(BaseModel):
    run_id: str
    metrics: dict[str, Any]
    seeds: SeedsOut | None = Field(
        None, description="runs with seeds > 1: every seed's metrics, their mean +- std, the kept seed"
    )
