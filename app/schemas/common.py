from __future__ import annotations

from typing import Annotated, Generic, TypeVar

from fastapi import Path, Query
from pydantic import BaseModel, ConfigDict

T = TypeVar("T")

# Every integer a client sends is bounded in the schema: without an upper bound a 100-digit offset
# reaches the database driver and answers 500 (OverflowError) instead of 422. 2**31 - 1 fits every
# integer column on SQLite and PostgreSQL and is far beyond any real offset, page or index.
MAX_INT = 2**31 - 1
Offset = Annotated[int, Query(ge=0, le=MAX_INT, description="rows to skip")]
Limit = Annotated[int | None, Query(ge=1, le=MAX_INT, description="page size (capped at SCAN_MAX_PAGE_SIZE)")]
ItemIndex = Annotated[int, Path(ge=0, le=MAX_INT, description="0-based index of an image in the dataset")]
ClusterIndex = Annotated[int, Path(ge=0, le=MAX_INT, description="0-based cluster number")]


class ErrorBody(BaseModel):
    detail: str


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int


class ORMModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)


ERRORS = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "malformed request body (not parseable as the declared content type)",
        401: "missing or invalid API key",
        404: "no such resource for this tenant",
        409: "conflicts with the resource's state",
        422: "invalid request (detail names the field)",
    }.items()
}
