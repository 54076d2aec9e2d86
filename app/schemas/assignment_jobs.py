from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.schemas.common import ORMModel

JobStateName = Literal["QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELED"]


class AssignmentJobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset_id: str = Field(max_length=64, description="one of your READY datasets")
    model: str = Field(
        max_length=200,
        description="the model to assign with: the id of one of your SUCCEEDED runs, "
        "or a registered model (name, name@alias, name/versions/N)",
    )
    confidence_threshold: float | None = Field(
        None, gt=0, lt=1, description="the drift report's confidence threshold; default the run's selflabel.threshold"
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        le=8192,
        description="images per batch (progress, checkpoint, cancel); default SCAN_ASSIGNMENT_BATCH_SIZE",
    )


class AssignmentJobOut(ORMModel):
    id: str
    dataset_id: str
    run_id: str = Field(description="the run the model reference resolved to when the job was created")
    model: str
    state: JobStateName
    total: int
    processed: int = Field(description="items assigned so far (the checkpoint a resumed job continues from)")
    fraction: float
    batch_size: int
    confidence_threshold: float
    cancel_requested: bool
    attempts: int
    error: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @classmethod
    def of(cls, job: Any) -> AssignmentJobOut:
        data = {k: getattr(job, k) for k in cls.model_fields if k != "fraction"}
        return cls(**data, fraction=(job.processed / job.total) if job.total else 1.0)


class JobAssignmentOut(ORMModel):
    item_index: int
    cluster: int = Field(description="the run's cluster (the `cluster` filter and the drift report count these)")
    served_as: int = Field(
        description="the cluster the job's model version serves it as (a merged group: its number; else `cluster`)"
    )
    name: str | None = Field(None, description="that served cluster's name in the job's model version, as of now")
    confidence: float
    distance: float = Field(description="cosine distance to the nearest training image (novelty)")


class JobAssignmentPage(BaseModel):
    model: str = Field(description="the model reference the job was created with")
    version: int | None = Field(
        None,
        description="the version of that model that publishes the job's run: its cluster names and merges are "
        "shown (None: the job named a run id, whose clusters have no names)",
    )
    items: list[JobAssignmentOut]
    total: int
    limit: int
    offset: int


class DriftReport(BaseModel):
    """See ml/drift.py for the definitions."""

    items: int
    training_items: int
    proportions: dict[str, Any] = Field(
        description="clusters (per run cluster: training_share, share, count, and served_as and name in the "
        "job's model version), chi_square, psi, psi_level"
    )
    confidence: dict[str, Any] = Field(
        description="threshold, means, shares below the threshold, Kolmogorov-Smirnov statistic and p-value"
    )
    novelty: dict[str, Any] = Field(
        description="training 95th/99th percentile distances, shares beyond them, the most novel items "
        "(with their cluster's served_as and name)"
    )
    verdict: Literal["stable", "moderate", "major"]
