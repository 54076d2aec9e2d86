from __future__ import annotations

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
