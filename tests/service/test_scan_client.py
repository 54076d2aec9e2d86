"""scan_client against the real API process: typed answers, upload progress, SSE following, the
raw-pixel fast path, the async client, retries on 503 that honour Retry-After, and the journey after
training: a named model with aliases and named, merged clusters; an assignment job with its drift
report, heard by a webhook; bring-your-own weights."""

from __future__ import annotations

import asyncio
import http.server
import io
import json
import threading
import time
import uuid
import zipfile

import numpy as np
import pytest
from PIL import Image

from app.schemas.runs import RunEventOut, RunOut
from scan_client import ApiError, AsyncClient, Client
from tests.service.test_predict import ITEMS, item_png
from tests.stack import TINY, digits_npz, start_run, wait_for_run


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


# -- the journey after training: a named model, named clusters, new data assigned, webhooks ---------


@pytest.fixture(scope="module")
def retrained_run(client, small_dataset, gpu_worker) -> dict:
    """A second SUCCEEDED run (360 digits): a model's version 2 (its own, so that test_registry's
    second run stays never served before its alias move)."""
    run = wait_for_run(client, start_run(client, small_dataset, TINY)["id"], timeout=600)
    assert run["state"] == "SUCCEEDED", run
    return run


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_the_journey_from_a_run_to_a_named_production_model(
    scan, client, digits_dataset, finished_run, retrained_run, tmp_path
):
    from app.schemas.predict import ModelPredictAnswer, NeighborsAnswer
    from app.schemas.registry import AliasOut, ModelOut, VersionOut

    pngs = [item_png(client, digits_dataset, i) for i in ITEMS[:6]]
    name = _unique("journey")
    model = scan.create_model(name, "digits, by the client")
    assert isinstance(model, ModelOut) and (model.name, model.latest_version) == (name, None)
    v1 = scan.publish_version(name, finished_run["id"])
    assert isinstance(v1, VersionOut) and (v1.version, v1.run_id) == (1, finished_run["id"])
    assert scan.publish_version(name, finished_run["id"]).version == 1  # the same run: the same version
    assert scan.publish_version(name, retrained_run["id"]).version == 2
    assert [v.version for v in scan.list_versions(name).items] == [2, 1]
    assert scan.get_version(name, 2).run_id == retrained_run["id"]
    assert name in [m.name for m in scan.list_models(limit=1000).items]

    moved = scan.move_alias(name, "production", 2)
    assert isinstance(moved, AliasOut) and (moved.version, moved.previous_version) == (2, None)
    scan.move_alias(name, "production", 1)
    back = scan.rollback_alias(name)  # production: back to 2
    assert (back.version, back.previous_version) == (2, 1)
    answer = scan.predict_model(f"{name}@production", pngs, k=3)
    assert isinstance(answer, ModelPredictAnswer)
    assert (answer.model, answer.version, answer.alias, answer.run_id) == (name, 2, "production", retrained_run["id"])
    back = scan.rollback_alias(name, "production")
    assert back.version == 1 and scan.get_model(name).aliases == {"production": 1}

    # Name a cluster, merge two: answers through the name carry the names from the next request on.
    raw = scan.predict(finished_run["id"], pngs, k=10).predictions
    a = raw[0].cluster
    b = next(p.cluster for p in raw if p.cluster != a)
    low, high = min(a, b), max(a, b)
    named = scan.name_cluster(name, 1, a, "first seen", description="the first image's cluster")
    assert (named.cluster, named.name, named.members) == (a, "first seen", [a])
    merged = scan.merge_clusters(name, 1, [a, b])
    group = next(c for c in merged.clusters if c.cluster == low)
    assert group.members == [low, high] and group.name == "first seen" and len(merged.clusters) == 9
    assert scan.model_clusters(f"{name}@production").clusters == merged.clusters
    served = scan.predict_model(name, pngs).predictions
    for p, q in zip(served, raw):
        if q.cluster in (low, high):
            assert (p.cluster, p.name) == (low, "first seen")
    hits = scan.model_neighbors(f"{name}@production", items=[ITEMS[0]], k=5)
    assert isinstance(hits, NeighborsAnswer) and (hits.model, hits.version) == (name, 1)
    assert hits.results[0].neighbors[0].item == ITEMS[0]
    assert all(h.cluster != high for h in hits.results[0].neighbors)
    plain = scan.neighbors(finished_run["id"], items=[ITEMS[0]], k=5)
    assert plain.model is None and [h.item for h in plain.results[0].neighbors] == [
        h.item for h in hits.results[0].neighbors
    ]
    in_group = scan.model_assignments(f"{name}/versions/1", cluster=low, page_size=5)
    assert in_group.total > 0 and all((r.cluster, r.name) == (low, "first seen") for r in in_group.items)
    archive = scan.export_model(f"{name}@production", tmp_path / "journey.zip", format="torchscript")
    with zipfile.ZipFile(archive) as zf:
        spec = json.loads(zf.read("clusters.json"))
    assert spec["clusters"][high] == {
        "cluster": high,
        "served_as": low,
        "name": "first seen",
        "description": "the first image's cluster",
    }
    assert len(scan.unmerge_cluster(name, 1, high).clusters) == 10
    scan.delete_alias(name, "production")
    scan.delete_model(name)
    with pytest.raises(ApiError) as err:
        scan.get_model(name)
    assert err.value.status_code == 404


def test_an_assignment_job_with_a_webhook_through_the_client(scan, finished_run, small_dataset):
    from tests.service.test_webhooks import Receiver, _wait

    receiver = Receiver()
    hook = scan.create_webhook(receiver.url)
    name = _unique("assign")
    try:
        assert len(hook.secret) == 64 and hook.id in [h.id for h in scan.list_webhooks()]
        scan.create_model(name)
        scan.publish_version(name, finished_run["id"])
        scan.move_alias(name, "production", 1)
        scan.name_cluster(name, 1, 0, "zero")

        job = scan.create_assignment_job(small_dataset, f"{name}@production", batch_size=4)
        assert (job.state, job.run_id, job.total) == ("QUEUED", finished_run["id"], 360)
        assert job.id in [j.id for j in scan.list_assignment_jobs(limit=1000).items]
        scan.wait_for_assignment_job(job.id, until=lambda j: j.processed >= 8)
        try:
            scan.cancel_assignment_job(job.id)
        except ApiError as err:  # it finished first (an idle machine): nothing to cancel
            assert err.status_code == 409 and scan.get_assignment_job(job.id).state == "SUCCEEDED"
        stopped = scan.wait_for_assignment_job(job.id)
        if stopped.state == "CANCELED":
            with pytest.raises(ApiError) as err:
                scan.drift_report(job.id)
            assert err.value.status_code == 409
            assert scan.resume_assignment_job(job.id).processed == stopped.processed
        done = scan.wait_for_assignment_job(job.id)
        assert done.state == "SUCCEEDED" and done.processed == 360

        page = scan.job_assignments(job.id, limit=1000)
        assert (page.total, page.version) == (360, 1)
        assert [r.item_index for r in page.items] == list(range(360))
        assert all(r.name == ("zero" if r.cluster == 0 else None) for r in page.items)
        report = scan.drift_report(job.id)
        assert report.items == 360 and report.verdict in ("stable", "moderate", "major")
        assert [c["name"] for c in report.proportions["clusters"]][0] == "zero"

        def delivered():
            states = {b["data"].get("state") for b in receiver.bodies() if b["data"].get("assignment_job_id") == job.id}
            return "SUCCEEDED" in states and "RUNNING" in states

        _wait(delivered, what="the job's state changes to reach the receiver")
        listed = scan.webhook_deliveries(hook.id, limit=100)
        assert listed.total >= 2 and any(d.payload["data"].get("assignment_job_id") == job.id for d in listed.items)
    finally:
        scan.delete_webhook(hook.id)
        receiver.close()
    assert hook.id not in [h.id for h in scan.list_webhooks()]


def test_weights_through_the_client(scan, client_b):
    from tests.security.test_weights_upload import _saved, _state

    body = _saved(_state())
    seen: list[tuple[int, int]] = []
    up = scan.upload_weights(body, arch="convnet", width=32, name="mine", progress=lambda s, t: seen.append((s, t)))
    assert (up.name, up.arch, up.width, up.reference) == ("mine", "convnet", 32, f"weights:{up.id}")
    assert seen and seen[-1] == (len(body), len(body))
    assert scan.get_weights(up.id) == up
    assert up.id in [w.id for w in scan.list_weights(limit=1000).items]
    with Client(http=client_b) as other, pytest.raises(ApiError) as err:
        other.get_weights(up.id)
    assert err.value.status_code == 404
    scan.delete_weights(up.id)
    with pytest.raises(ApiError) as err:
        scan.get_weights(up.id)
    assert err.value.status_code == 404


def test_the_async_client_walks_the_same_journey(api_server, keys, client, digits_dataset, finished_run, small_dataset):
    pngs = [item_png(client, digits_dataset, i) for i in ITEMS[:4]]
    name = _unique("async")

    async def journey():
        async with AsyncClient(api_server, keys["a"]) as a:
            await a.create_model(name)
            await a.publish_version(name, finished_run["id"])
            await a.move_alias(name, "production", 1)
            first = (await a.predict(finished_run["id"], pngs[:1])).predictions[0].cluster
            await a.name_cluster(name, 1, first, "async name")
            answers = await asyncio.gather(*(a.predict_model(f"{name}@production", [p]) for p in pngs))
            clusters = await a.model_clusters(name)
            job = await a.create_assignment_job(small_dataset, f"{name}@production")
            done = await a.wait_for_assignment_job(job.id)
            page = await a.job_assignments(job.id, cluster=first, limit=5)
            report = await a.drift_report(job.id)
            hook = await a.create_webhook("https://example.com/scan-hook")
            hooks = await a.list_webhooks()
            await a.delete_webhook(hook.id)
            events = await a.events(finished_run["id"], limit=5)
            await a.delete_model(name)
            return answers, clusters, done, page, report, hook, hooks, events

    answers, clusters, done, page, report, hook, hooks, events = asyncio.run(journey())
    assert answers[0].predictions[0].name == "async name" and answers[0].version == 1
    assert next(c for c in clusters.clusters if c.name == "async name").members == [answers[0].predictions[0].cluster]
    assert done.state == "SUCCEEDED" and done.processed == 360
    assert page.version == 1 and page.total > 0 and all(r.name == "async name" for r in page.items)
    assert report.items == 360
    assert hook.id in [h.id for h in hooks]
    assert len(events.items) == 5 and events.next_after == events.items[-1].id
