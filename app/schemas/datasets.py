from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from app.core.text import Name
from app.schemas.common import ORMModel
from ml.data.builtin import BUILTINS


class DatasetOut(ORMModel):
    id: str
    name: str
    source: str
    split: str
    state: Literal["PENDING", "INGESTING", "READY", "FAILED"]
    count: int | None = Field(None, description="number of images")
    height: int | None = None
    width: int | None = None
    channels: int | None = None
    labelled: bool
    class_names: list[str] | None = None
    error: str | None = None
    created_at: datetime
    ready_at: datetime | None = None


class DatasetImport(BaseModel):
    source: Literal[BUILTINS] = Field(description="a built-in source")
    split: Literal["train", "test"] = "train"
    name: Name | None = Field(None, description="display name (printable text)")
