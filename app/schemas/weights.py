from __future__ import annotations

from datetime import datetime

from pydantic import Field

from app.schemas.common import ORMModel


class WeightsOut(ORMModel):
    id: str
    name: str
    arch: str = Field(description="the backbone they fit; a run using them must have this arch")
    width: int = Field(description="the convnet width they fit (ignored by the ResNets)")
    tensors: int = Field(description="backbone tensors stored")
    size_bytes: int = Field(description="size of the stored backbone state dict")
    reference: str = Field(description='the value for a run\'s "pretext.backbone_weights"')
    created_at: datetime

    @classmethod
    def of(cls, row) -> WeightsOut:
        return cls.model_validate(
            {**{k: getattr(row, k) for k in cls.model_fields if k != "reference"}, "reference": f"weights:{row.id}"}
        )
