from __future__ import annotations

from pydantic import BaseModel, Field


class KeyOwner(BaseModel):
    tenant: str = Field(description="the tenant the calling key belongs to")
    prefix: str = Field(description="the key's public prefix (`scan_<prefix>_...`), what revocation names")
