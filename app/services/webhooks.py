"""Webhooks: a tenant's URLs hear of every state change of its runs and assignment jobs.

- The outbox: a state change and the deliveries that report it commit in one transaction (the
  ``before_flush`` hook below sees every ORM change of ``Run.state`` / ``AssignmentJob.state``,
  whoever makes it; the few bulk UPDATEs that change a state call ``state_changed`` themselves).
  The workers' sender (``send_due``) posts them, so a crash between the change and the post loses
  nothing: delivery is at least once, and ``X-Scan-Delivery`` lets a receiver drop a duplicate.
- Signature: ``X-Scan-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">`` with the
  webhook's secret, and ``X-Scan-Timestamp`` (Unix seconds) so a receiver can refuse old replays.
- Retries: a failed attempt (connection error, timeout, any non-2xx answer, redirects included)
  waits ``webhook_backoff_s * 2**(attempt-1)`` (at most an hour); after ``webhook_max_attempts`` the
  delivery is FAILED. Every attempt is kept and listed by the API.
- SSRF: only http/https URLs without credentials; unless ``webhook_allow_private``, a host that is
  or resolves to a loopback, private, link-local (cloud metadata), multicast, reserved or otherwise
  non-global address is refused, at registration and again at each attempt, and the request goes to
  the address that was checked (no second DNS lookup to rebind). Redirects are never followed.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import time
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import event, func, select, update
from sqlalchemy.orm import Session

from app.core.errors import Conflict, Invalid, NotFound
from app.core.settings import Settings
from app.tables import (
    AssignmentJob,
    DeliveryState,
    Run,
    Tenant,
    Webhook,
    WebhookAttempt,
    WebhookDelivery,
    new_id,
    owned,
    utcnow,
)

log = logging.getLogger("scan.webhooks")

MAX_URL_LENGTH = 2048
MAX_BACKOFF_S = 3600.0
EVENTS = {Run: "run.state_changed", AssignmentJob: "assignment_job.state_changed"}


# --- registration ------------------------------------------------------------------------------


def create(session: Session, settings: Settings, tenant: Tenant, url: str) -> Webhook:
    url = check_url(url, settings.webhook_allow_private)
    count = session.scalar(select(func.count()).select_from(Webhook).where(Webhook.tenant_id == tenant.id)) or 0
    if count >= settings.webhooks_per_tenant:
        raise Conflict(f"you have {count} webhooks, the most allowed (SCAN_WEBHOOKS_PER_TENANT); delete one first")
    hook = Webhook(tenant_id=tenant.id, url=url, secret=secrets.token_hex(32))
    session.add(hook)
    session.commit()
    return hook


def get(session: Session, tenant: Tenant, webhook_id: str) -> Webhook:
    hook = owned(session, Webhook, webhook_id, tenant.id)
    if hook is None:
        raise NotFound(f"webhook {webhook_id} not found (list yours with GET /v1/webhooks)")
    return hook


def list_(session: Session, tenant: Tenant) -> list[Webhook]:
    return list(
        session.scalars(select(Webhook).where(Webhook.tenant_id == tenant.id).order_by(Webhook.created_at, Webhook.id))
    )


def delete(session: Session, tenant: Tenant, webhook_id: str) -> None:
    session.delete(get(session, tenant, webhook_id))
    session.commit()


def deliveries(
    session: Session, hook: Webhook, *, limit: int, offset: int
) -> tuple[list[tuple[WebhookDelivery, list[WebhookAttempt]]], int]:
    query = select(WebhookDelivery).where(WebhookDelivery.webhook_id == hook.id)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = list(
        session.scalars(
            query.order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id).limit(limit).offset(offset)
        )
    )
    attempts: dict[str, list[WebhookAttempt]] = {r.id: [] for r in rows}
    if rows:
        for a in session.scalars(
            select(WebhookAttempt)
            .where(WebhookAttempt.delivery_id.in_(list(attempts)))
            .order_by(WebhookAttempt.attempt, WebhookAttempt.id)
        ):
            attempts[a.delivery_id].append(a)
    return [(r, attempts[r.id]) for r in rows], total


def check_url(url: str, allow_private: bool) -> str:
    """The URL if a webhook may call it, else Invalid naming why."""
    if len(url) > MAX_URL_LENGTH:
        raise Invalid(f"url: at most {MAX_URL_LENGTH} characters")
    if any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise Invalid("url: must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise Invalid(f"url: not a valid URL ({exc})") from exc
    if parts.scheme not in ("http", "https"):
        raise Invalid("url: only http:// and https:// URLs are allowed")
    if not parts.hostname:
        raise Invalid("url: names no host")
    if parts.username is not None or parts.password is not None:
        raise Invalid("url: must not carry credentials (user:password@); authenticate with the signature")
    if port == 0:
        raise Invalid("url: port 0 is not a port")
    if not allow_private:
        host = parts.hostname
        literal = _ip(host)
        if literal is not None and not literal.is_global:
            raise Invalid(f"url: {host} is not a public address (loopback, private and link-local are refused)")
        if literal is None and (host == "localhost" or host.endswith((".localhost", ".local", ".internal"))):
            raise Invalid(f"url: {host} is not a public host name")
    return url


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


# --- the outbox --------------------------------------------------------------------------------


def state_changed(
    session: Session, kind: str, obj_id: str, tenant_id: str, state: str, previous: str | None, **extra: Any
) -> None:
    """Queue one delivery per webhook of the tenant (in the caller's transaction)."""
    with session.no_autoflush:
        hooks = session.scalars(select(Webhook.id).where(Webhook.tenant_id == tenant_id)).all()
    if not hooks:
        return
    name = f"{kind}.state_changed"
    now = utcnow()
    for hook_id in hooks:
        delivery_id = new_id()
        payload = {
            "id": delivery_id,
            "event": name,
            "created_at": now.isoformat(),
            "data": {f"{kind}_id": obj_id, "state": state, "previous_state": previous, **extra},
        }
        session.add(
            WebhookDelivery(
                id=delivery_id,
                webhook_id=hook_id,
                tenant_id=tenant_id,
                event=name,
                payload=payload,
                state=DeliveryState.PENDING,
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            )
        )


@event.listens_for(Session, "before_flush")
def _record_state_changes(session: Session, _flush_context: Any, _instances: Any) -> None:
    from sqlalchemy import inspect

    changed = []
    for obj in session.new:
        if type(obj) in _KINDS:
            changed.append((obj, _KINDS[type(obj)], None))
    for obj in session.dirty:
        if type(obj) not in _KINDS:
            continue
        history = inspect(obj).attrs.state.history
        previous = history.deleted[0] if history.deleted else None
        if history.added and previous != obj.state:
            changed.append((obj, _KINDS[type(obj)], previous))
    for obj, kind, previous in changed:
        # A new row's column defaults would only be filled in during the flush: set them now.
        if obj.id is None:
            obj.id = new_id()
        if obj.state is None:
            obj.state = "QUEUED"
        extra = {"error": obj.error} if getattr(obj, "error", None) else {}
        if kind == "run":
            extra["stage"] = obj.stage
        state_changed(session, kind, obj.id, obj.tenant_id, obj.state, previous, **extra)


_KINDS = {Run: "run", AssignmentJob: "assignment_job"}


# --- the sender (workers' main process) --------------------------------------------------------


def sign(secret: str, timestamp: int, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def claim_due(session: Session, settings: Settings, limit: int = 20) -> list[str]:
    """Ids of deliveries due now, each pushed out by a lease (one conditional UPDATE) so that two
    senders never post the same attempt; a sender that dies mid-post leaves it due again later."""
    now = utcnow()
    rows = session.execute(
        select(WebhookDelivery.id, WebhookDelivery.next_attempt_at)
        .where(WebhookDelivery.state == DeliveryState.PENDING, WebhookDelivery.next_attempt_at <= now)
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(limit)
    ).all()
    lease_until = now + timedelta(seconds=settings.webhook_timeout_s * 3 + 30)
    won = []
    for delivery_id, seen in rows:
        if session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.next_attempt_at == seen)
            .values(next_attempt_at=lease_until)
            .execution_options(synchronize_session=False)
        ).rowcount:
            won.append(delivery_id)
    session.commit()
    return won


def send_due(settings: Settings) -> int:
    """One round of the sender: post every delivery due; returns how many were attempted."""
    from app.core.db import new_session

    with new_session() as session:
        due = claim_due(session, settings)
        for delivery_id in due:
            attempt(session, settings, delivery_id)
    return len(due)


def attempt(session: Session, settings: Settings, delivery_id: str) -> bool:
    """Post one delivery once and record the attempt; True when the receiver answered 2xx."""
    delivery = session.get(WebhookDelivery, delivery_id)
    hook = session.get(Webhook, delivery.webhook_id) if delivery is not None else None
    if delivery is None or hook is None or delivery.state != DeliveryState.PENDING:
        return False
    body = json.dumps(delivery.payload, separators=(",", ":"), sort_keys=True).encode()
    started = time.monotonic()
    status, error = None, None
    try:
        status = _post(settings, hook, delivery, body)
        if not 200 <= status < 300:
            error = f"the receiver answered HTTP {status}"
    except Exception as exc:  # noqa: BLE001 - any failure to deliver is recorded and retried
        error = f"{type(exc).__name__}: {exc}"[:1000]
    number = delivery.attempts + 1
    session.add(
        WebhookAttempt(
            delivery_id=delivery.id,
            attempt=number,
            status_code=status,
            error=error,
            duration_ms=(time.monotonic() - started) * 1000,
        )
    )
    delivery.attempts = number
    if error is None:
        delivery.state, delivery.delivered_at = DeliveryState.DELIVERED, utcnow()
    elif number >= settings.webhook_max_attempts:
        delivery.state = DeliveryState.FAILED
    else:
        wait = min(MAX_BACKOFF_S, settings.webhook_backoff_s * 2 ** (number - 1))
        delivery.next_attempt_at = utcnow() + timedelta(seconds=wait)
    session.commit()
    if error is not None:
        log.info("webhook %s: delivery %s attempt %d failed: %s", hook.id, delivery.id, number, error)
    return error is None


def _post(settings: Settings, hook: Webhook, delivery: WebhookDelivery, body: bytes) -> int:
    import httpx

    parts = urlsplit(hook.url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    address = _checked_address(host, port, settings.webhook_allow_private)
    # Connect to the address just checked; the Host header and TLS name stay the URL's own.
    netloc = f"[{address}]" if ":" in address else address
    target = urlunsplit((parts.scheme, f"{netloc}:{port}", parts.path or "/", parts.query, ""))
    timestamp = int(time.time())
    headers = {
        "Host": parts.netloc.rsplit("@", 1)[-1],
        "Content-Type": "application/json",
        "User-Agent": "scan-webhooks/1",
        "X-Scan-Event": delivery.event,
        "X-Scan-Delivery": delivery.id,
        "X-Scan-Timestamp": str(timestamp),
        "X-Scan-Signature": sign(hook.secret, timestamp, body),
    }
    with httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False, trust_env=False) as client:
        response = client.post(target, content=body, headers=headers, extensions={"sni_hostname": host})
        return response.status_code


def _checked_address(host: str, port: int, allow_private: bool) -> str:
    literal = _ip(host)
    if literal is not None:
        addresses = [str(literal)]
    else:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = [str(info[4][0]) for info in infos]
    if not addresses:
        raise OSError(f"{host} does not resolve")
    if not allow_private:
        bad = [a for a in addresses if not ipaddress.ip_address(a.split("%")[0]).is_global]
        if bad:
            raise PermissionError(f"{host} resolves to a non-public address ({bad[0]}); refused")
    return addresses[0]
