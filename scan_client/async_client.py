"""The asynchronous client: the same calls as `Client` (scan_client/_calls.py describes them for
both), awaited, over httpx.AsyncClient."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, BinaryIO, TypeVar

import httpx

import scan_client._calls as calls
from app.schemas.runs import RunEventOut
from scan_client._common import ApiError, Call, Poll, SSEParser, StallWatch, check, event_of, may_resend, retry_delay
from scan_client._common import async_method as M

T = TypeVar("T")


class AsyncClient:
    """
    >>> async with AsyncClient("http://127.0.0.1:8000", api_key) as scan:
    ...     answers = await asyncio.gather(*(scan.predict_model("digits@production", [png]) for png in pngs))
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        *,
        timeout: float = 120.0,
        retries: int = 5,
        max_retry_wait: float = 30.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = http or httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout)
        self._owns_http = http is None
        self.retries, self.max_retry_wait = retries, max_retry_wait

    # -- plumbing ---------------------------------------------------------------------------------

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_http:
            await self.http.aclose()

    async def request(
        self, method: str, path: str, *, expect=(200,), rewind: BinaryIO | None = None, **kwargs: Any
    ) -> httpx.Response:
        for attempt in range(self.retries + 1):
            if rewind is not None:
                rewind.seek(0)
            try:
                response = await self.http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if attempt == self.retries or not may_resend(method, exc):
                    raise
                await asyncio.sleep(min(0.5 * 2**attempt, self.max_retry_wait))
                continue
            if response.status_code != 503 or attempt == self.retries:
                return check(response, expect)
            await asyncio.sleep(retry_delay(response, attempt, self.max_retry_wait))
        raise AssertionError("unreachable")

    async def call(self, call: Call[T] | Poll[T]) -> T:
        if isinstance(call, Poll):
            watch = StallWatch(call.stall_timeout)
            while True:
                answer = await self.call(call.get)
                if call.done(answer):
                    return answer
                watch.see(call.what, answer.state, call.progress(answer))
                await asyncio.sleep(call.poll_s)
        try:
            response = await self.request(call.method, call.path, expect=call.expect, rewind=call.rewind, **call.kwargs)
        finally:
            if call.cleanup is not None:
                call.cleanup()
        return call.parse(response)

    async def follow_events(self, run_id: str, *, after: int = 0) -> AsyncIterator[RunEventOut]:
        last = after
        for attempt in range(self.retries + 1):
            try:
                async with self.http.stream(
                    "GET",
                    f"/v1/runs/{run_id}/events/stream",
                    params={"after": last},
                    headers={"Accept": "text/event-stream", "Last-Event-ID": str(last)},
                    timeout=httpx.Timeout(30.0, read=None),
                ) as r:
                    if r.status_code == 503 and attempt < self.retries:
                        await asyncio.sleep(retry_delay(r, attempt, self.max_retry_wait))
                        continue
                    if r.status_code != 200:
                        await r.aread()
                        raise ApiError(r)
                    parser = SSEParser()
                    async for line in r.aiter_lines():
                        got = parser.feed(line)
                        if got is None:
                            continue
                        kind, event_id, data = got
                        if kind == "end":
                            return
                        last = int(event_id) if event_id and event_id.isdigit() else last
                        yield event_of(kind, data)
            except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
                if attempt == self.retries:
                    raise
                await asyncio.sleep(retry_delay(httpx.Response(503, request=exc.request), attempt, self.max_retry_wait))

    # -- keys and datasets ------------------------------------------------------------------------
    whoami = M(calls.whoami)
    upload_dataset = M(calls.upload_dataset)
    import_dataset = M(calls.import_dataset)
    get_dataset = M(calls.get_dataset)
    list_datasets = M(calls.list_datasets)
    delete_dataset = M(calls.delete_dataset)

    # -- runs -------------------------------------------------------------------------------------
    create_run = M(calls.create_run)
    get_run = M(calls.get_run)
    list_runs = M(calls.list_runs)
    cancel_run = M(calls.cancel_run)
    retry_run = M(calls.retry_run)
    events = M(calls.events)
    wait_for_run = M(calls.wait_for_run)
    clusters = M(calls.clusters)
    metrics = M(calls.metrics)
    predict = M(calls.predict)
    neighbors = M(calls.neighbors)

    # -- registered models, aliases, named and merged clusters ------------------------------------
    create_model = M(calls.create_model)
    list_models = M(calls.list_models)
    get_model = M(calls.get_model)
    update_model = M(calls.update_model)
    delete_model = M(calls.delete_model)
    publish_version = M(calls.publish_version)
    list_versions = M(calls.list_versions)
    get_version = M(calls.get_version)
    move_alias = M(calls.move_alias)
    rollback_alias = M(calls.rollback_alias)
    delete_alias = M(calls.delete_alias)
    model_clusters = M(calls.model_clusters)
    name_cluster = M(calls.name_cluster)
    merge_clusters = M(calls.merge_clusters)
    unmerge_cluster = M(calls.unmerge_cluster)
    predict_model = M(calls.predict_model)
    model_neighbors = M(calls.model_neighbors)
    model_assignments = M(calls.model_assignments)
    export_model = M(calls.export_model)

    # -- assignment jobs and drift ----------------------------------------------------------------
    create_assignment_job = M(calls.create_assignment_job)
    list_assignment_jobs = M(calls.list_assignment_jobs)
    get_assignment_job = M(calls.get_assignment_job)
    cancel_assignment_job = M(calls.cancel_assignment_job)
    resume_assignment_job = M(calls.resume_assignment_job)
    wait_for_assignment_job = M(calls.wait_for_assignment_job)
    job_assignments = M(calls.job_assignments)
    drift_report = M(calls.drift_report)

    # -- webhooks and weights ---------------------------------------------------------------------
    create_webhook = M(calls.create_webhook)
    list_webhooks = M(calls.list_webhooks)
    delete_webhook = M(calls.delete_webhook)
    webhook_deliveries = M(calls.webhook_deliveries)
    upload_weights = M(calls.upload_weights)
    list_weights = M(calls.list_weights)
    get_weights = M(calls.get_weights)
    delete_weights = M(calls.delete_weights)
