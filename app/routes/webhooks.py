"""/v1/webhooks: register URLs that hear of your runs' and assignment jobs' state changes, and read
each delivery with its attempts (see app/services/webhooks.py for signature, retries and SSRF)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.deps import SessionDep, SettingsDep, TenantDep
from app.schemas.common import ERRORS, Limit, Offset
from app.schemas.webhooks import (
    WebhookAttemptOut,
    WebhookCreate,
    WebhookCreated,
    WebhookDeliveryOut,
    WebhookDeliveryPage,
    WebhookOut,
)
from app.services import webhooks as service
from app.tables import DeliveryState

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"], responses=ERRORS)


@router.post(
    "",
    summary="Register a webhook URL (the answer carries its signing secret, shown only once)",
    status_code=201,
    response_model=WebhookCreated,
)
def create_webhook(
    body: WebhookCreate, session: SessionDep, tenant: TenantDep, settings: SettingsDep
) -> WebhookCreated:
    return WebhookCreated.model_validate(service.create(session, settings, tenant, body.url))


@router.get("", summary="Your webhooks", response_model=list[WebhookOut])
def list_webhooks(session: SessionDep, tenant: TenantDep) -> list[WebhookOut]:
    return [WebhookOut.model_validate(h) for h in service.list_(session, tenant)]


@router.delete("/{webhook_id}", summary="Remove a webhook (and its delivery log)", status_code=204)
def delete_webhook(webhook_id: str, session: SessionDep, tenant: TenantDep) -> Response:
    service.delete(session, tenant, webhook_id)
    return Response(status_code=204)


@router.get(
    "/{webhook_id}/deliveries",
    summary="The webhook's deliveries, newest first, each with its attempts",
    response_model=WebhookDeliveryPage,
)
def list_deliveries(
    webhook_id: str,
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    limit: Limit = None,
    offset: Offset = 0,
) -> WebhookDeliveryPage:
    hook = service.get(session, tenant, webhook_id)
    limit = min(limit or settings.default_page_size, settings.max_page_size)
    rows, total = service.deliveries(session, hook, limit=limit, offset=offset)
    items = []
    for delivery, attempts in rows:
        out = WebhookDeliveryOut.model_validate(delivery)
        out.attempt_log = [WebhookAttemptOut.model_validate(a) for a in attempts]
        if delivery.state != DeliveryState.PENDING:
            out.next_attempt_at = None
        items.append(out)
    return WebhookDeliveryPage(items=items, total=total, limit=limit, offset=offset)
