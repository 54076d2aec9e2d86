from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from app.schemas.common import ORMModel
from ml.config import DEFAULT_PRESET, MAX_SEEDS, NumClusters

RunStateName = Literal["QUEUED", "PRETEXT", "MINING", "CLUSTERING", "SELFLABEL", "SUCCEEDED", "FAILED", "CANCELED"]


class RunCreate(BaseModel):
    dataset_id: str
    num_clusters: NumClusters = Field(
        description='K, or "auto" (K chosen in 2..20), or a range {"min": 2, "max": 30}: the clustering stage '
        "trains heads for every K on the frozen pretext features and keeps the smallest K within noise of "
        "the highest neighbour modularity (docs/num_clusters.md); the curve is in the run's metrics under "
        "num_clusters"
    )
    preset: str = Field(DEFAULT_PRESET, description="small (CPU) | cifar | stl | imagenet (see ml/config.py)")
    overrides: dict[str, Any] = Field(default_factory=dict, description='e.g. {"pretext.epochs": 5}')
    budget_minutes: int | None = Field(
        None,
        ge=1,
        le=7 * 24 * 60,
        description="fit the recipe to this many minutes on the workers' reported device: the epochs "
        "of every stage are scaled down, then the image size and the convnet's width halve "
        "(docs/service.md, 'Duration and memory estimates'); what changed is in estimate.budget_changes",
    )
    seeds: int | None = Field(
        None,
        ge=1,
        le=MAX_SEEDS,
        description="train clustering and self-labeling this many times on the one pretext model (the "
        "paper's protocol): GET /v1/runs/{id}/metrics reports every seed, their mean +- std, and the seed "
        'kept by the lowest SCAN loss. The same as overrides {"seeds": N}; default 1',
    )


class StageOut(ORMModel):
    stage: str
    state: Literal["PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELED"]
    epoch: int | None = None
    epochs: int | None = None
    step: int | None = None
    steps: int | None = None
    loss: float | None = None
    images_per_s: float | None = None
    eta_s: float | None = None
    attempts: int
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_s: float | None = None


class RunEstimate(BaseModel):
    stages_s: dict[str, float] = Field(description="expected seconds per stage (self-labeling: at most)")
    total_s: float
    device: str = Field(description="the device the estimate is for (the slowest reporting worker)")
    device_reported: bool = Field(description="false: no worker has reported yet; reference figures used")
    images_per_s: float = Field(description="training images per second assumed at this image size")
    image_size: int
    warning: str | None = Field(None, description="set when the run is expected to take over an hour")
    budget_minutes: int | None = None
    budget_changes: list[str] | None = Field(None, description="what budget_minutes changed in the recipe")


class RunOut(ORMModel):
    id: str
    dataset_id: str
    state: RunStateName
    stage: str | None = Field(None, description="the stage running now (or next to run)")
    num_clusters: int | None = Field(
        description='from config: K as asked, or for "auto" / a range the K chosen (null until clustering has chosen)'
    )
    preset: str = Field(description="from config")
    overrides: dict[str, Any] = Field(
        description="what config changes from its preset, as dotted keys (derived from config)"
    )
    config: dict[str, Any] = Field(description="the validated recipe the run trains with: its one stored copy")
    estimate: RunEstimate | None = Field(None, description="made before the run was queued")
    cancel_requested: bool
    error: str | None = None
    redeliveries: int
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    stages: list[StageOut] = []


class RunEventOut(ORMModel):
    id: int
    created_at: datetime
    kind: str
    stage: str | None = None
    attempt: int | None = None
    epoch: int | None = None
    epochs: int | None = None
    step: int | None = None
    steps: int | None = None
    loss: float | None = None
    message: str | None = None
    data: dict[str, Any] | None = None


class EventPage(BaseModel):
    items: list[RunEventOut]
    total: int
    next_after: int = Field(description="pass as ?after= to get the following events")
