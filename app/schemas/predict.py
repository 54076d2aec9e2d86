from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ClusterProbability(BaseModel):
    cluster: int
    probability: float
    label: str | None = Field(None, description="the class this cluster was matched to, when the run has labels")


class Prediction(BaseModel):
    file: str = Field(description="the file name sent, or images[i] / tensor[i]")
    cluster: int
    confidence: float
    label: str | None = Field(None, description="the class the cluster was matched to, when the run has labels")
    top_k: list[ClusterProbability]


class PredictAnswer(BaseModel):
    run_id: str
    predictions: list[Prediction]


# -- served through a model name (/v1/models/{ref}/predict and /neighbors) --------------------------


class NamedClusterProbability(BaseModel):
    cluster: int = Field(description="the served cluster (a merged group: its number)")
    name: str | None = None
    probability: float = Field(description="a merged group's: the sum of its members'")


class NamedPrediction(BaseModel):
    file: str = Field(description="the file name sent, or images[i] / tensor[i]")
    cluster: int = Field(description="the served cluster (a merged group: its number)")
    name: str | None = Field(None, description="the cluster's name in this version")
    confidence: float
    top_k: list[NamedClusterProbability]


class ModelPredictAnswer(BaseModel):
    model: str
    version: int
    alias: str | None = Field(None, description="the alias the reference went through, if any")
    run_id: str
    predictions: list[NamedPrediction]


class Neighbor(BaseModel):
    item: int = Field(description="index of the training item")
    score: float = Field(description="inner product of L2-normalised features (cosine similarity)")
    cluster: int
    name: str | None = Field(None, description="served through a model: the cluster's name")


class NeighborResult(BaseModel):
    query: dict[str, Any] = Field(description="what this list answers: items, vectors, files, or one of them")
    neighbors: list[Neighbor]


class NeighborsAnswer(BaseModel):
    run_id: str
    model: str | None = Field(None, description="served through a model: its name, version and alias")
    version: int | None = None
    alias: str | None = None
    k: int
    combine: Literal["mean", "separate"]
    results: list[NeighborResult]
