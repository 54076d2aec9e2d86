"""Prometheus metrics: `install(app)` adds request metrics and `GET /metrics`.

Exposed (text format, prometheus_client):
- `scan_http_requests_total{method,route,status}` and `scan_http_request_duration_seconds{method,route}`
  labelled by the route *template* (`/v1/runs/{run_id}/predict`), never the raw path, so the
  number of series stays bounded;
- `scan_predict_batch_size` histogram of the rows each model call received from the dynamic batcher,
  and `scan_predict_queue_rows` (rows waiting for a batch right now);
- `scan_queue_depth{queue}`: runs waiting for a worker (runs in state QUEUED, read from the database:
  the same number on every broker, and cheap);
- `scan_runs{state}`: runs by state; `scan_run_stage_duration_seconds{stage}`: a summary of how
  long finished stages took (sum and count over all runs), read from the database at scrape time.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

REQUESTS = Counter("scan_http_requests", "HTTP requests by route template and status", ["method", "route", "status"])
LATENCY = Histogram(
    "scan_http_request_duration_seconds",
    "HTTP request latency by route template",
    ["method", "route"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
PREDICT_BATCH = Histogram(
    "scan_predict_batch_size",
    "Images per model call after dynamic batching",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
PREDICT_QUEUE = Gauge("scan_predict_queue_rows", "Images waiting in the dynamic batchers")
# Loads happen on a first request or when an alias moves (warmed first); a load counted while
# requests arrive is a request that waited for a cold model.
MODEL_LOADS = Counter("scan_model_loads", "Finished runs loaded into this API process's model cache")


def observe_batch(size: int) -> None:
    PREDICT_BATCH.observe(size)


class _PrometheusMiddleware:
    """Pure ASGI middleware: cheaper than BaseHTTPMiddleware and does not buffer streaming bodies."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500, "recorded": False}
        start = time.perf_counter()

        def record() -> None:
            if status["recorded"]:
                return
            status["recorded"] = True
            route = scope.get("route")
            # Unmatched paths share one label: scanners probing random URLs must not create series.
            template = getattr(route, "path", None) or "<unmatched>"
            if template != "/metrics":
                method = scope.get("method", "GET")
                REQUESTS.labels(method, template, str(status["code"])).inc()
                LATENCY.labels(method, template).observe(time.perf_counter() - start)

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                # Counted before the last byte leaves: a client that scrapes /metrics right after its
                # response must see its own request (counting after send raced with that scrape).
                record()
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            record()  # no complete response (an exception, a client gone): still counted, as a 500


class _DatabaseCollector(Collector):
    """Run gauges read from the database when Prometheus scrapes, not kept in process memory
    (several API processes and the workers all change runs)."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def describe(self) -> Iterable:
        # Without this, registering would call collect() and query a database that may not exist yet.
        return []

    def collect(self) -> Iterable:
        try:
            snap = self.snapshot()
        except Exception:  # a scrape must not fail because the database blinked
            log.exception("metrics: database snapshot failed")
            return
        runs = GaugeMetricFamily("scan_runs", "Runs by state", labels=["state"])
        for state, n in sorted(snap.get("runs_by_state", {}).items()):
            runs.add_metric([state], n)
        yield runs
        queue = GaugeMetricFamily("scan_queue_depth", "Runs waiting for a worker", labels=["queue"])
        for name, n in sorted(snap.get("queue_depth", {}).items()):
            queue.add_metric([name], n)
        yield queue
        stages = SummaryMetricFamily(
            "scan_run_stage_duration_seconds", "Wall time of finished run stages", labels=["stage"]
        )
        for stage, (count, total) in sorted(snap.get("stage_durations", {}).items()):
            stages.add_metric([stage], count_value=count, sum_value=total)
        yield stages


def _database_snapshot() -> dict[str, Any]:
    from app.services.stats import run_statistics  # imported late: needs the data layer

    return run_statistics()


_db_collector: _DatabaseCollector | None = None


def install(app: FastAPI, registry: CollectorRegistry = REGISTRY) -> None:
    """Add the request middleware and `GET /metrics` to `app` (idempotent per registry)."""
    global _db_collector
    if _db_collector is None:
        _db_collector = _DatabaseCollector(_database_snapshot)
        registry.register(_db_collector)
    app.add_middleware(_PrometheusMiddleware)

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        denied = _metrics_denied(request)
        if denied is not None:
            return denied
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def _metrics_denied(request: Request) -> Response | None:
    """Metrics show every tenant's run counts: with SCAN_METRICS_TOKEN set they need that bearer
    token; without it only a scraper on the loopback interface (a sidecar) may read them."""
    from app.core.settings import get_settings

    token = get_settings().metrics_token
    if token:
        sent = request.headers.get("authorization", "")
        if hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
            return None
        return JSONResponse(
            {"detail": "GET /metrics needs `Authorization: Bearer <SCAN_METRICS_TOKEN>`"},
            401,
            headers={"WWW-Authenticate": "Bearer"},
        )
    if request.client is not None and request.client.host in _LOOPBACK:
        return None
    return JSONResponse(
        {"detail": "/metrics answers only local scrapers; set SCAN_METRICS_TOKEN to scrape it from elsewhere"}, 403
    )
