"""Serving is bounded and off the event loop: /neighbors caps queries and queries x k, bodies of
/predict and /neighbors are cut off at SCAN_MAX_SERVING_BODY_BYTES (413, streamed), huge images are
refused or decoded small, and /livez keeps answering while the heaviest allowed requests run."""

from __future__ import annotations

import io
import statistics
import threading
import time

import httpx
import numpy as np
from PIL import Image

from tests.stack import MAX_UPLOAD


def _png(side: int, value: int = 128) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (side, side), value).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(side: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (side // 16, side // 16, 3), dtype=np.uint8)).resize((side, side)).save(
        buf, format="JPEG", quality=30
    )
    return buf.getvalue()


def test_neighbors_amplification_is_refused_before_any_search(client: httpx.Client, finished_run: dict) -> None:
    run_id = finished_run["id"]
    t0 = time.monotonic()
    r = client.post(
        f"/v1/runs/{run_id}/neighbors", json={"k": 1024, "query": {"items": [0] * 10_000}, "combine": "separate"}
    )
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == "query: 10000 queries in one request; at most 256 (SCAN_NEIGHBORS_MAX_QUERIES)"
    r = client.post(
        f"/v1/runs/{run_id}/neighbors", json={"k": 1024, "query": {"items": list(range(100))}, "combine": "separate"}
    )
    assert r.status_code == 422
    assert r.json()["detail"].startswith("k: 100 queries x k=1024 = 102400 neighbours; at most 65536")
    assert time.monotonic() - t0 < 30  # answered, not computed
    # combine=mean asks for one list of k whatever the number of queries: allowed.
    r = client.post(f"/v1/runs/{run_id}/neighbors", json={"k": 1024, "query": {"items": list(range(200))}})
    assert r.status_code == 200 and len(r.json()["results"]) == 1


def test_bodies_over_the_limit_get_413_without_being_buffered(client: httpx.Client, finished_run: dict) -> None:
    run_id = finished_run["id"]
    big = b"\x00" * (MAX_UPLOAD + 1)
    for route in ("predict", "neighbors"):
        r = client.post(f"/v1/runs/{run_id}/{route}", files=[("files", ("big.png", big, "image/png"))])
        assert r.status_code == 413, r.text
        assert "SCAN_MAX_SERVING_BODY_BYTES" in r.json()["detail"]

    # No Content-Length (chunked): refused at the first chunk past the limit.
    def chunks():
        yield b'{"images": ["'
        for _ in range(MAX_UPLOAD // 65536 + 2):
            yield b"A" * 65536
        yield b'"]}'

    r = client.post(f"/v1/runs/{run_id}/predict", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text


def test_pixel_bombs_are_refused_and_large_jpegs_decoded_small(client: httpx.Client, finished_run: dict) -> None:
    run_id = finished_run["id"]
    r = client.post(f"/v1/runs/{run_id}/predict", files=[("files", ("huge.png", _png(6000), "image/png"))])
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("huge.png: decompression bomb: 6000x6000 = 36000000 pixels")
    r = client.post(f"/v1/runs/{run_id}/predict", files=[("files", ("photo.jpg", _jpeg(4000), "image/jpeg"))])
    assert r.status_code == 200, r.text


def test_draft_decoding_never_materialises_the_full_jpeg() -> None:
    from ml.data.imaging import decode_conformed, decode_pil

    data = _jpeg(4000)
    small = decode_pil(data, "photo.jpg", at_least=(8, 8))
    assert max(small.size) <= 4000 // 8 * 2  # libjpeg scaled it down at decode time (1/8 is its floor)
    assert decode_conformed(data, "photo.jpg", (8, 8), 1).shape == (1, 8, 8)


def test_livez_answers_while_the_heaviest_requests_run(
    client: httpx.Client, api_server: str, finished_run: dict
) -> None:
    run_id = finished_run["id"]
    images = [("files", (f"{i}.png", _png(4000, i % 256), "image/png")) for i in range(60)]
    assert sum(len(f[1][1]) for f in images) < MAX_UPLOAD
    heavy = [
        lambda c: c.post(f"/v1/runs/{run_id}/predict?k=10", files=images),
        lambda c: c.post(
            f"/v1/runs/{run_id}/neighbors", json={"k": 256, "query": {"items": list(range(256))}, "combine": "separate"}
        ),
    ]
    statuses: list[int] = []

    def run(fn) -> None:
        with httpx.Client(base_url=api_server, headers=client.headers, timeout=600) as c:
            statuses.append(fn(c).status_code)

    threads = [threading.Thread(target=run, args=(fn,)) for fn in heavy]
    for t in threads:
        t.start()
    latencies = []
    with httpx.Client(base_url=api_server, timeout=60) as probe:
        while any(t.is_alive() for t in threads):
            t0 = time.perf_counter()
            assert probe.get("/livez").status_code == 200
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.05)
    for t in threads:
        t.join()
    assert statuses and all(s == 200 for s in statuses), statuses
    assert len(latencies) >= 5, latencies
    # The loop never blocks on the work: /livez answers in under 100 ms. A busy shared CI machine
    # (load 14 on 2 cores when this was written) may deschedule the process for a moment, so the
    # 100 ms bound is on the median and the worst answer only has to beat a real stall (before this
    # change /livez stalled for 21 s behind one /neighbors request).
    assert statistics.median(latencies) < 0.1, latencies
    assert max(latencies) < 5.0, latencies
