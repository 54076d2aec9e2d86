"""The synchronous client. Every call answers a pydantic model of the API's own schemas
(app/schemas/), raises `ApiError` on an unexpected status, and retries a 503 (database or broker
unreachable: nothing was written) after its Retry-After, up to `retries` times."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
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


class Client:
    """
    >>> with Client("http://127.0.0.1:8000", api_key) as scan:
    ...     ds = scan.import_dataset("digits")
    ...     run = scan.create_run(ds.id, num_clusters=10)
    ...     for event in scan.follow_events(run.id): print(event)
    ...     scan.predict(run.id, ["a.png"]).predictions[0].cluster
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        *,
        timeout: float = 120.0,
        retries: int = 5,
        max_retry_wait: float = 30.0,
        http: httpx.Client | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = http or httpx.Client(base_url=base_url, headers=headers, timeout=timeout)
        self._owns_http = http is None
        self.retries, self.max_retry_wait = retries, max_retry_wait

    # -- plumbing ---------------------------------------------------------------------------------

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owns_http:
            self.http.close()

    def request(
        self, method: str, path: str, *, expect=(200,), rewind: BinaryIO | None = None, **kwargs: Any
    ) -> httpx.Response:
        """One call, retried on 503 after Retry-After; raises ApiError unless the status is expected."""
        for attempt in range(self.retries + 1):
            if rewind is not None:
                rewind.seek(0)
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if attempt == self.retries or not may_resend(method, exc):
                    raise
                time.sleep(min(0.5 * 2**attempt, self.max_retry_wait))
                continue
            if response.status_code != 503 or attempt == self.retries:
                return check(response, expect)
            time.sleep(retry_delay(response, attempt, self.max_retry_wait))
        raise AssertionError("unreachable")

    # -- keys and datasets ------------------------------------------------------------------------

    def whoami(self) -> KeyOwner:
        return KeyOwner.model_validate(self.request("GET", "/v1/keys/current").json())

    def upload_dataset(
        self,
        source: bytes | str | BinaryIO,
        *,
        name: str | None = None,
        filename: str | None = None,
        split: str = "train",
        wait: bool = True,
        progress: Progress | None = None,
    ) -> DatasetOut:
        """Upload a zip / tar.gz / npz / IDX file (bytes, a path or an open binary file);
        `progress(sent, total)` is called as the body goes out."""
        raw, size, fname = open_upload(source, filename)
        body = ProgressFile(raw, size, progress)
        try:
            r = self.request(
                "POST",
                "/v1/datasets",
                expect=(201, 202),
                rewind=body,
                files={"file": (fname, body, "application/octet-stream")},
                data={"name": name} if name else None,
                params={"split": split, "wait": wait},
            )
        finally:
            if raw is not source:  # opened here (a path) or wrapped here (bytes)
                raw.close()
        return DatasetOut.model_validate(r.json())

    def import_dataset(self, source: str, *, name: str | None = None, split: str = "train") -> DatasetOut:
        body = {"source": source, "split": split, **({"name": name} if name else {})}
        return DatasetOut.model_validate(
            self.request("POST", "/v1/datasets/import", expect=(201, 202), json=body).json()
        )

    def get_dataset(self, dataset_id: str) -> DatasetOut:
        return DatasetOut.model_validate(self.request("GET", f"/v1/datasets/{dataset_id}").json())

    # -- runs -------------------------------------------------------------------------------------

    def create_run(
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
        r = self.request("POST", "/v1/runs", expect=(200, 202), json=body, headers=headers)
        return RunOut.model_validate(r.json())

    def get_run(self, run_id: str) -> RunOut:
        return RunOut.model_validate(self.request("GET", f"/v1/runs/{run_id}").json())

    def cancel_run(self, run_id: str) -> RunOut:
        return RunOut.model_validate(self.request("POST", f"/v1/runs/{run_id}/cancel", expect=(200, 202)).json())

    def wait_for_run(
        self,
        run_id: str,
        states: tuple[str, ...] = TERMINAL,
        *,
        stall_timeout: float = 600.0,
        until: Callable[[RunOut], bool] | None = None,
        poll_s: float = 0.3,
    ) -> RunOut:
        """Poll until the run's state is in `states` (or `until(run)`), or it ends. `stall_timeout`
        bounds a stall (no progress), never a slow run: StalledRun only when nothing moves."""
        watch = StallWatch(stall_timeout)
        while True:
            run = self.get_run(run_id)
            if (until(run) if until else run.state in states) or run.state in TERMINAL:
                return run
            watch.see(run)
            time.sleep(poll_s)

    def follow_events(self, run_id: str, *, after: int = 0) -> Iterator[RunEventOut]:
        """The run's events as they happen (Server-Sent Events), until the run ends. A dropped
        connection is resumed from the last event seen (Last-Event-ID)."""
        last = after
        for attempt in range(self.retries + 1):
            try:
                with self.http.stream(
                    "GET",
                    f"/v1/runs/{run_id}/events/stream",
                    params={"after": last},
                    headers={"Accept": "text/event-stream", "Last-Event-ID": str(last)},
                    timeout=httpx.Timeout(30.0, read=None),
                ) as r:
                    if r.status_code == 503 and attempt < self.retries:
                        time.sleep(retry_delay(r, attempt, self.max_retry_wait))
                        continue
                    if r.status_code != 200:
                        r.read()
                        raise ApiError(r)
                    parser = SSEParser()
                    for line in r.iter_lines():
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
                time.sleep(retry_delay(httpx.Response(503, request=exc.request), attempt, self.max_retry_wait))

    def clusters(self, run_id: str) -> list[ClusterOut]:
        return [ClusterOut.model_validate(c) for c in self.request("GET", f"/v1/runs/{run_id}/clusters").json()]

    def metrics(self, run_id: str) -> MetricsOut:
        return MetricsOut.model_validate(self.request("GET", f"/v1/runs/{run_id}/metrics").json())

    # -- serving ----------------------------------------------------------------------------------

    def predict(self, run_id: str, images: Any, *, k: int = 5) -> PredictAnswer:
        """`images`: image files (bytes or paths), sent as multipart; or a uint8 array (N, C, H, W) at
        the run's shape, sent raw as application/octet-stream (no decoding on the server)."""
        r = self.request("POST", f"/v1/runs/{run_id}/predict", params={"k": k}, **predict_request(images))
        return PredictAnswer.model_validate_json(r.content)
