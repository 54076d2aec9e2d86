"""Webhooks over the real stack: a receiver on loopback (a real HTTP server thread) hears the state
changes of tenant A's runs, signed, retried from the outbox with backoff, listed with attempts.
Ordinary calls go through scan_client; refusals are asserted on raw status codes (httpx)."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import select

from scan_client import Client
from tests.stack import scan_client


class Receiver:
    """Records every POST; answers 500 to the first ``fail_first`` posts of each delivery id."""

    def __init__(self, fail_first: int = 0):
        self.fail_first = fail_first
        self.received: list[dict] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    delivery = self.headers.get("X-Scan-Delivery")
                    seen = sum(1 for r in receiver.received if r["headers"].get("X-Scan-Delivery") == delivery)
                    status = 500 if seen < receiver.fail_first else 200
                    receiver.received.append(
                        {"headers": dict(self.headers), "body": body, "status": status, "at": time.monotonic()}
                    )
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def bodies(self, status: int = 200) -> list[dict]:
        with self.lock:
            return [json.loads(r["body"]) for r in self.received if r["status"] == status]


@pytest.fixture(scope="module")
def scan(client) -> Client:
    return scan_client(client)


@pytest.fixture
def flaky():
    receiver = Receiver(fail_first=2)
    yield receiver
    receiver.close()


def _wait(predicate, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_state_changes_are_signed_retried_and_listed(client, client_b, scan, small_dataset, flaky):
    hook = scan.create_webhook(flaky.url)
    secret = hook.secret
    assert len(secret) == 64 and "secret" not in client.get("/v1/webhooks").json()[0]
    assert hook.id in [h.id for h in scan.list_webhooks()]
    try:
        # The run is canceled while QUEUED, or, in services mode where an earlier test's gpu worker
        # may still be up, after it was picked up: either way every state change is delivered, and
        # the CANCELED delivery names the state before it, itself delivered.
        run = scan.create_run(small_dataset, 5)
        scan.cancel_run(run.id)

        def run_bodies():
            return [b for b in flaky.bodies() if b["data"].get("run_id") == run.id]

        def all_delivered():
            states = {b["data"]["state"] for b in run_bodies()}
            canceled = next((b for b in run_bodies() if b["data"]["state"] == "CANCELED"), None)
            done = canceled is not None and "QUEUED" in states and canceled["data"]["previous_state"] in states
            return canceled if done else None

        canceled = _wait(all_delivered, what="every delivery of the run to succeed")
        for record in flaky.received:
            headers = {k.lower(): v for k, v in record["headers"].items()}
            expected = hmac.new(
                secret.encode(), headers["x-scan-timestamp"].encode() + b"." + record["body"], hashlib.sha256
            ).hexdigest()
            assert headers["x-scan-signature"] == f"sha256={expected}"
            assert abs(int(headers["x-scan-timestamp"]) - time.time()) < 120
            assert headers["x-scan-event"] == "run.state_changed"
        assert canceled["event"] == "run.state_changed"
        assert canceled["data"]["previous_state"] not in ("SUCCEEDED", "FAILED", "CANCELED")

        # The API lists each delivery with its three attempts: 500, 500, then 200, with backoff.
        page = _wait(
            lambda: (
                p
                if (p := scan.webhook_deliveries(hook.id)).total >= 2 and all(d.state == "DELIVERED" for d in p.items)
                else None
            ),
            what="deliveries marked DELIVERED",
        )
        for delivery in page.items:
            log = delivery.attempt_log
            assert [a.status_code for a in log] == [500, 500, 200], log
            assert "HTTP 500" in log[0].error and log[2].error is None
            assert delivery.attempts == 3 and delivery.delivered_at is not None
        # Backoff: the second retry waited about twice as long as the first (0.5 s, then 1 s).
        posts = sorted(r["at"] for r in flaky.received if r["headers"].get("X-Scan-Delivery") == canceled["id"])
        assert posts[1] - posts[0] >= 0.45 and posts[2] - posts[1] >= 0.95, posts

        # Another tenant sees none of it.
        assert client_b.get(f"/v1/webhooks/{hook.id}/deliveries").status_code == 404
        assert client_b.delete(f"/v1/webhooks/{hook.id}").status_code == 404
        assert all(h["id"] != hook.id for h in client_b.get("/v1/webhooks").json())
    finally:
        scan.delete_webhook(hook.id)
    assert client.get(f"/v1/webhooks/{hook.id}/deliveries").status_code == 404


@pytest.mark.parametrize(
    "url",
    ["ftp://example.com/x", "http://user:pw@example.com/", "not a url", "http:///nohost", "javascript:alert(1)"],
)
def test_bad_urls_are_422(client, url):
    r = client.post("/v1/webhooks", json={"url": url})
    assert r.status_code == 422, r.text
    assert "url" in r.json()["detail"]


def test_webhooks_per_tenant_are_bounded(client_b, stack):
    limit = stack.settings.webhooks_per_tenant
    made = []
    try:
        for i in range(limit):
            r = client_b.post("/v1/webhooks", json={"url": f"https://example.com/hook/{i}"})
            assert r.status_code == 201, r.text
            made.append(r.json()["id"])
        r = client_b.post("/v1/webhooks", json={"url": "https://example.com/one-too-many"})
        assert r.status_code == 409 and "delete one" in r.json()["detail"]
    finally:
        for hook_id in made:
            client_b.delete(f"/v1/webhooks/{hook_id}")


def test_a_receiver_that_never_answers_2xx_ends_failed(scan, stack):
    """One delivery tried to the attempt limit (here 3, in-process against a receiver that always
    answers 500): each attempt recorded, the wait doubled each time, then FAILED."""
    from app.core.db import new_session
    from app.services import webhooks
    from app.tables import Tenant, WebhookDelivery, utcnow

    receiver = Receiver(fail_first=1000)
    hook = scan.create_webhook(receiver.url)
    settings = stack.settings.model_copy(update={"webhook_max_attempts": 3, "webhook_backoff_s": 30.0})
    try:
        with new_session() as session:
            tenant_id = session.scalar(select(Tenant.id).where(Tenant.name == "tenant-a"))
            # Far in the future, so the workers' own sender leaves it to this test.
            row = WebhookDelivery(
                webhook_id=hook.id,
                tenant_id=tenant_id,
                event="run.state_changed",
                payload={"data": {"run_id": "x", "state": "FAILED"}},
                next_attempt_at=utcnow() + timedelta(days=1),
            )
            session.add(row)
            session.commit()
            waits = []
            for _ in range(3):
                before = utcnow()
                assert webhooks.attempt(session, settings, row.id) is False
                session.refresh(row)
                waits.append((row.next_attempt_at - before).total_seconds())
            assert row.state == "FAILED" and row.attempts == 3
            assert 29 < waits[0] < 32 and 59 < waits[1] < 62  # 30 s, then 60 s
        failed = next(d for d in scan.webhook_deliveries(hook.id).items if d.id == row.id)
        assert failed.state == "FAILED" and failed.next_attempt_at is None
        assert [a.status_code for a in failed.attempt_log] == [500, 500, 500]
        assert len(receiver.received) == 3
    finally:
        scan.delete_webhook(hook.id)
        receiver.close()
