"""scan_client against the real API process: typed answers, upload progress, SSE following, the
raw-pixel fast path, the async client, and retries on 503 that honour Retry-After."""

from __future__ import annotations

import asyncio
import http.server
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from app.schemas.runs import RunEventOut, RunOut
from scan_client import ApiError, AsyncClient, Client
from tests.service.test_predict import ITEMS, item_png
from tests.stack import digits_npz


@pytest.fixture(scope="module")
def scan(api_server, keys) -> Client:
    with Client(api_server, keys["a"], timeout=240) as c:
        yield c


def test_whoami_and_typed_errors(scan, api_server):
    assert scan.whoami().tenant == "tenant-a"
    with pytest.raises(ApiError) as err:
        scan.get_run("no-such-run")
    assert err.value.status_code == 404 and "no-such-run" in err.value.detail
    with Client(api_server, "scan_000000000000_wrong") as bad, pytest.raises(ApiError) as err:
        bad.whoami()
    assert err.value.status_code == 401


def test_upload_reports_progress_and_answers_a_typed_dataset(scan, cpu_worker):
    data = digits_npz(120)
    seen: list[tuple[int, int]] = []
    ds = scan.upload_dataset(
        data, filename="digits120.npz", name="client-upload", progress=lambda s, t: seen.append((s, t))
    )
    assert ds.state == "READY" and ds.count == 120 and ds.name == "client-upload"
    assert seen and seen[-1] == (len(data), len(data))
    assert [s for s, _ in seen] == sorted(s for s, _ in seen)


def test_follow_events_replays_a_finished_run_until_its_end(scan, client, finished_run):
    events = list(scan.follow_events(finished_run["id"]))
    assert events and all(isinstance(e, RunEventOut) for e in events)
    page = client.get(f"/v1/runs/{finished_run['id']}/events", params={"limit": 1000}).json()
    assert [e.id for e in events] == [e["id"] for e in page["items"]]
    later = list(scan.follow_events(finished_run["id"], after=events[-2].id))
    assert [e.id for e in later] == [events[-1].id]
    run = scan.wait_for_run(finished_run["id"])
    assert isinstance(run, RunOut) and run.state == "SUCCEEDED"


def test_sync_pixels_and_async_files_predict_alike(scan, api_server, keys, client, digits_dataset, finished_run):
    pngs = [item_png(client, digits_dataset, i) for i in ITEMS[:5]]
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(p)))[None] for p in pngs])
    by_pixels = scan.predict(finished_run["id"], pixels, k=3)

    async def by_files():
        async with AsyncClient(api_server, keys["a"]) as a:
            one_each = await asyncio.gather(*(a.predict(finished_run["id"], [p], k=3) for p in pngs))
            return [answer.predictions[0] for answer in one_each]

    for x, y in zip(by_pixels.predictions, asyncio.run(by_files())):
        assert x.cluster == y.cluster and abs(x.confidence - y.confidence) < 1e-6


class _Flaky(http.server.BaseHTTPRequestHandler):
    """Answers 503 with Retry-After: 1 twice, then 200, like the API while its database restarts."""

    calls: list[float] = []

    def do_GET(self):
        type(self).calls.append(time.monotonic())
        if len(self.calls) <= 2:
            body, status, extra = b'{"detail": "the database is unreachable right now"}', 503, {"Retry-After": "1"}
        else:
            body, status, extra = b'{"tenant": "t", "prefix": "p"}', 200, {}
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(body)), **extra}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_retries_on_503_after_retry_after():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        with Client(base, "k") as c:
            assert c.whoami().tenant == "t"
        calls = _Flaky.calls
        assert len(calls) == 3 and calls[1] - calls[0] >= 0.95 and calls[2] - calls[1] >= 0.95
        _Flaky.calls = []
        with Client(base, "k", retries=1) as c, pytest.raises(ApiError) as err:
            c.whoami()  # two 503s, one retry allowed: the second 503 is the answer
        assert err.value.status_code == 503 and "unreachable" in err.value.detail
    finally:
        server.shutdown()


def test_a_get_is_resent_when_the_server_drops_the_connection_without_answering():
    """A kept-alive connection closed by the server just as a request goes out: a GET goes again
    (a POST would not: it may have been carried out)."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]

    def serve():
        first, _ = listener.accept()
        first.recv(65536)
        first.close()  # no answer at all
        second, _ = listener.accept()
        second.recv(65536)
        body = b'{"tenant": "t", "prefix": "p"}'
        second.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        second.close()

    threading.Thread(target=serve, daemon=True).start()
    with Client(f"http://127.0.0.1:{port}", "k", max_retry_wait=0.1) as c:
        assert c.whoami().tenant == "t"
    listener.close()
