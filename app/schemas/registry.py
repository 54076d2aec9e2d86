"""Bodies and answers of the model registry (/v1/models): models, versions, aliases, named clusters."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from app.core.names import MAX_CLUSTER_NAME, MAX_DESCRIPTION, MAX_NAME, NAME_PATTERN
from app.schemas.common import MAX_INT
from ml.limits import MAX_K

Description = Field(None, max_length=MAX_DESCRIPTION, description="printable text (new lines allowed)")


class ModelCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(
        min_length=1, max_length=MAX_NAME, pattern=NAME_PATTERN, description="unique among your models; URL-safe"
    )
    description: str | None = Description


class ModelUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str | None = Description


class ModelOut(BaseModel):
    name: str
    description: str | None = None
    created_at: datetime
    latest_version: int | None = Field(None, description="None until a run is published")
    aliases: dict[str, int] = Field(description="alias -> version number")


class VersionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    run_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="a SUCCEEDED run of yours")


class VersionOut(BaseModel):
    model: str
    version: int
    run_id: str
    dataset_id: str
    num_clusters: int
    created_at: datetime
    aliases: list[str]


class VersionPage(BaseModel):
    items: list[VersionOut]
    total: int
    limit: int
    offset: int


class AliasMove(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1, le=MAX_INT, description="the version the alias points at from now on")


class AliasOut(BaseModel):
    model: str
    alias: str
    version: int
    previous_version: int | None = Field(None, description="where it pointed before this move")


class ClusterPatch(BaseModel):
    """Only the fields sent change; null clears one."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, max_length=MAX_CLUSTER_NAME, description="printable, unique within the version")
    description: str | None = Description


class ClusterMerge(BaseModel):
    model_config = ConfigDict(extra="forbid")
    clusters: list[Annotated[int, Field(ge=0, le=MAX_INT)]] = Field(
        min_length=2,
        max_length=MAX_K,
        description="run cluster numbers served as one from now on (the lowest number names the group)",
    )
    name: str | None = Field(None, max_length=MAX_CLUSTER_NAME, description="the group's name (default: kept)")


class NamedClusterOut(BaseModel):
    cluster: int = Field(description="the number answers use (a merged group: its lowest run cluster)")
    name: str | None = None
    description: str | None = None
    members: list[int] = Field(description="the run's clusters served as this one")
    size: int = Field(description="training images in it")
    mean_confidence: float | None = None
    prototype: int | None = None
    matched_label: str | None = Field(None, description="label matched at evaluation, when the data had labels")


class VersionClustersOut(BaseModel):
    model: str
    version: int
    alias: str | None = None
    run_id: str
    clusters: list[NamedClusterOut]


class NamedAssignmentOut(BaseModel):
    item_index: int
    cluster: int = Field(description="the served cluster (a merged group: its number)")
    name: str | None = None
    confidence: float


class NamedAssignmentPage(BaseModel):
    model: str
    version: int
    alias: str | None = None
    run_id: str
    items: list[NamedAssignmentOut]
    total: int
    page: int
    page_size: int
