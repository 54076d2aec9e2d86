from __future__ import annotations

from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict

T = TypeVar("T")


class ErrorBody(BaseModel):
    detail: str


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int


class ORMModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)


ERRORS = {code: {"model": ErrorBody, "description": text} for code, text in {
    401: "missing or invalid API key", 404: "no such resource for this tenant",
    409: "conflicts with the resource's state", 422: "invalid request (detail names the field)"}.items()}
