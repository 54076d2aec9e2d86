"""The asynchronous client: the same calls as `Client`, awaited (httpx.AsyncClient underneath)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, BinaryIO

import httpx

from app.schemas.datasets import DatasetOut
from app.schemas.keys import KeyOwner
from app.schemas.predict import PredictAnswer
from app.schemas.results import ClusterOut, MetricsOut
from app.schemas.runs import RunEventOut, RunOut
from scan_client._common import (
    TERMINAL,
    ApiError,
    Progress,
    ProgressFile,
    SSEParser,
    StallWatch,
    check,
    event_of,
    may_resend,
    open_upload,
    predict_request,
    retry_delay,
)


class AsyncClient:
    """
    >>> async with AsyncClient("http://127.0.0.1:8000", api_key) as scan:
    ...     answers = await asyncio.gather(*(scan.predict(run_id, [png]) for png in pngs))
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

    async def whoami(self) -> KeyOwner:
        return KeyOwner.model_validate((await self.request("GET", "/v1/keys/current")).json())

    async def upload_dataset(
        self,
        source: bytes | str | BinaryIO,
        *,
        name: str | None = None,
        filename: str | None = None,
        split: str = "train",
        wait: bool = True,
        progress: Progress | None = None,
    ) -> DatasetOut:
        raw, size, fname = open_upload(source, filename)
        body = ProgressFile(raw, size, progress)
        try:
            r = await self.request(
                "POST",
                "/v1/datasets",
                expect=(201, 202),
                rewind=body,
                files={"file": (fname, body, "application/octet-stream")},
                data={"name": name} if name else None,
                params={"split": split, "wait": wait},
            )
        finally:
            if raw is not source:
                raw.close()
        return DatasetOut.model_validate(r.json())

    async def import_dataset(self, source: str, *, name: str | None = None, split: str = "train") -> DatasetOut:
        body = {"source": source, "split": split, **({"name": name} if name else {})}
        r = await self.request("POST", "/v1/datasets/import", expect=(201, 202), json=body)
        return DatasetOut.model_validate(r.json())

    async def get_dataset(self, dataset_id: str) -> DatasetOut:
        return DatasetOut.model_validate((await self.request("GET", f"/v1/datasets/{dataset_id}")).json())

    async def create_run(
        self,
        dataset_id: str,
        num_clusters: int,
        *,
        preset: str = "small",
        overrides: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        **extra: Any,
    ) -> RunOut:
        body = {
            "dataset_id": dataset_id,
            "num_clusters": num_clusters,
            "preset": preset,
            "overrides": overrides or {},
            **extra,
        }
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        r = await self.request("POST", "/v1/runs", expect=(200, 202), json=body, headers=headers)
        return RunOut.model_validate(r.json())

    async def get_run(self, run_id: str) -> RunOut:
        return RunOut.model_validate((await self.request("GET", f"/v1/runs/{run_id}")).json())

    async def cancel_run(self, run_id: str) -> RunOut:
        r = await self.request("POST", f"/v1/runs/{run_id}/cancel", expect=(200, 202))
        return RunOut.model_validate(r.json())

    async def wait_for_run(
        self,
        run_id: str,
        states: tuple[str, ...] = TERMINAL,
        *,
        stall_timeout: float = 600.0,
        until: Callable[[RunOut], bool] | None = None,
        poll_s: float = 0.3,
    ) -> RunOut:
        watch = StallWatch(stall_timeout)
        while True:
            run = await self.get_run(run_id)
            if (until(run) if until else run.state in states) or run.state in TERMINAL:
                return run
            watch.see(run)
            await asyncio.sleep(poll_s)

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

    async def clusters(self, run_id: str) -> list[ClusterOut]:
        r = await self.request("GET", f"/v1/runs/{run_id}/clusters")
        return [ClusterOut.model_validate(c) for c in r.json()]

    async def metrics(self, run_id: str) -> MetricsOut:
        return MetricsOut.model_validate((await self.request("GET", f"/v1/runs/{run_id}/metrics")).json())

    async def predict(self, run_id: str, images: Any, *, k: int = 5) -> PredictAnswer:
        r = await self.request("POST", f"/v1/runs/{run_id}/predict", params={"k": k}, **predict_request(images))
        return PredictAnswer.model_validate_json(r.content)
