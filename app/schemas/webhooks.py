from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.schemas.common import ORMModel


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        max_length=2048,
        description="http:// or https:// URL without credentials; public addresses only unless the "
        "server allows private ones (SCAN_WEBHOOK_ALLOW_PRIVATE)",
    )


class WebhookOut(ORMModel):
    id: str
    url: str
    created_at: datetime


class WebhookCreated(WebhookOut):
    secret: str = Field(description="signs every delivery (X-Scan-Signature, HMAC-SHA256); shown only now")


class WebhookAttemptOut(ORMModel):
    attempt: int
    at: datetime
    status_code: int | None = None
    error: str | None = None
    duration_ms: float


class WebhookDeliveryOut(ORMModel):
    id: str
    event: str
    payload: dict
    state: Literal["PENDING", "DELIVERED", "FAILED"]
    attempts: int
    next_attempt_at: datetime | None = Field(None, description="when the next attempt is due (PENDING only)")
    created_at: datetime
    delivered_at: datetime | None = None
    attempt_log: list[WebhookAttemptOut] = []


class WebhookDeliveryPage(BaseModel):
    items: list[WebhookDeliveryOut]
    total: int
    limit: int
    offset: int
