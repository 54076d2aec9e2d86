"""POST /v1/runs/{id}/predict over HTTP against the real API process (the batcher alone:
tests/app/serving/test_batcher.py)."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

ITEMS = list(range(0, 1797, 75))  # 24 items spread over the dataset


def item_png(client, dataset_id: str, item: int) -> bytes:
    r = client.get(f"/v1/datasets/{dataset_id}/items/{item}.png")
    assert r.status_code == 200, r.text
    return r.content


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def stored_assignments(client, run_id: str) -> dict[int, int]:
    r = client.get(f"/v1/runs/{run_id}/assignments", params={"page_size": 1000, "page": 1})
    first = r.json()
    rows = first["items"]
    for page in range(2, -(-first["total"] // first["page_size"]) + 1):
        rows += client.get(f"/v1/runs/{run_id}/assignments", params={"page_size": 1000, "page": page}).json()["items"]
    return {row["item_index"]: row["cluster"] for row in rows}


@pytest.fixture(scope="module")
def item_pngs(client, digits_dataset) -> dict[int, bytes]:
    return {i: item_png(client, digits_dataset, i) for i in ITEMS}


@pytest.fixture(scope="module")
def unfinished_run(client, small_dataset) -> dict:
    """A run that never succeeds: created and canceled at once (no training time spent)."""
    r = client.post(
        "/v1/runs",
        json={"dataset_id": small_dataset, "num_clusters": 10, "preset": "small", "overrides": {"pretext.epochs": 1}},
    )
    assert r.status_code == 202, r.text
    client.post(f"/v1/runs/{r.json()['id']}/cancel")
    return client.get(f"/v1/runs/{r.json()['id']}").json()


def assert_names_unfinished_state(detail: str) -> None:
    states = ("QUEUED", "PRETEXT", "MINING", "CLUSTERING", "SELFLABEL", "FAILED", "CANCELED")
    assert "SUCCEEDED" in detail and any(f" is {s}" in detail for s in states), detail


def test_predict_on_dataset_items_agrees_with_stored_assignments(client, finished_run, item_pngs):
    run_id = finished_run["id"]
    files = [("files", (f"item{i}.png", item_pngs[i], "image/png")) for i in ITEMS]
    r = client.post(f"/v1/runs/{run_id}/predict", files=files, params={"k": 3})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["file"] for p in preds] == [f"item{i}.png" for i in ITEMS]
    stored = stored_assignments(client, run_id)
    assert [p["cluster"] for p in preds] == [stored[i] for i in ITEMS]
    for p in preds:
        assert len(p["top_k"]) == 3
        probs = [t["probability"] for t in p["top_k"]]
        assert probs == sorted(probs, reverse=True)
        assert p["top_k"][0]["cluster"] == p["cluster"] and p["top_k"][0]["probability"] == p["confidence"]
        # digits has labels, so every answer names the class its cluster was matched to
        assert isinstance(p["label"], str) and p["label"] in [str(d) for d in range(10)]
    clusters = {c["index"]: c["matched_label"] for c in client.get(f"/v1/runs/{run_id}/clusters").json()}
    assert all(p["label"] == clusters[p["cluster"]] for p in preds)


def test_predict_json_base64_matches_multipart(client, finished_run, item_pngs):
    run_id = finished_run["id"]
    some = ITEMS[:4]
    body = {"images": [base64.b64encode(item_pngs[i]).decode() for i in some]}
    as_json = client.post(f"/v1/runs/{run_id}/predict", json=body, params={"k": 10}).json()["predictions"]
    files = [("files", (f"{i}.png", item_pngs[i], "image/png")) for i in some]
    as_files = client.post(f"/v1/runs/{run_id}/predict", files=files, params={"k": 10}).json()["predictions"]
    for a, b in zip(as_json, as_files):
        assert a["cluster"] == b["cluster"]
        np.testing.assert_allclose(
            [t["probability"] for t in a["top_k"]], [t["probability"] for t in b["top_k"]], atol=1e-6
        )
        assert abs(sum(t["probability"] for t in a["top_k"]) - 1) < 1e-4  # k = K: all clusters


def test_predict_converts_other_sizes_and_channels(client, finished_run, item_pngs):
    """A 20x20 RGB image for an 8x8 gray run is converted like ingest converts, and still answered;
    an upscaled RGB copy of an item lands in the item's cluster."""
    run_id = finished_run["id"]
    rgb_noise = np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    # The item the (two-epoch) model is surest of: the round trip through 32 px must not move it,
    # while one near a cluster border may legitimately flip.
    rows = client.get(f"/v1/runs/{run_id}/assignments", params={"page_size": 1000, "page": 1}).json()["items"]
    sure = max((r for r in rows if r["item_index"] in ITEMS), key=lambda r: r["confidence"])
    item = np.asarray(Image.open(io.BytesIO(item_pngs[sure["item_index"]])))
    big_rgb = np.asarray(Image.fromarray(item).convert("RGB").resize((32, 32), Image.Resampling.NEAREST))
    files = [
        ("files", ("noise.png", png_bytes(rgb_noise), "image/png")),
        ("files", ("big.png", png_bytes(big_rgb), "image/png")),
    ]
    r = client.post(f"/v1/runs/{run_id}/predict", files=files)
    assert r.status_code == 200, r.text
    noise, big = r.json()["predictions"]
    assert 0 <= noise["cluster"] < 10 and 0 < noise["confidence"] <= 1
    assert len(noise["top_k"]) == 5
    assert big["cluster"] == sure["cluster"]


def test_concurrent_predicts_each_get_their_own_answer(client, finished_run, item_pngs):
    """16 callers at once share model calls (dynamic batching) yet each gets its own image's answer."""
    run_id = finished_run["id"]
    single = {
        i: client.post(f"/v1/runs/{run_id}/predict", files=[("files", ("x.png", item_pngs[i]))]).json()["predictions"][
            0
        ]
        for i in ITEMS[:16]
    }
    before = _batch_histogram(client)

    def call(i):
        r = client.post(f"/v1/runs/{run_id}/predict", files=[("files", (f"{i}.png", item_pngs[i]))])
        assert r.status_code == 200, r.text
        return i, r.json()["predictions"][0]

    with ThreadPoolExecutor(16) as pool:
        answers = dict(pool.map(call, ITEMS[:16]))
    for i, ans in answers.items():
        assert ans["cluster"] == single[i]["cluster"]
        assert abs(ans["confidence"] - single[i]["confidence"]) < 1e-5
    after = _batch_histogram(client)
    calls, rows = after[0] - before[0], after[1] - before[1]
    assert rows == 16  # every image went through the batcher exactly once ...
    assert 1 <= calls <= 16  # ... in at most one model call per request


def _batch_histogram(client) -> tuple[float, float]:
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(client.get("/metrics").text):
        if fam.name == "scan_predict_batch_size":
            samples = {s.name: s.value for s in fam.samples}
            return samples["scan_predict_batch_size_count"], samples["scan_predict_batch_size_sum"]
    return 0.0, 0.0


def test_predict_rejects_non_images_naming_the_file(client, finished_run, item_pngs):
    files = [
        ("files", ("ok.png", item_pngs[0], "image/png")),
        ("files", ("notes.txt", b"this is not an image", "text/plain")),
    ]
    r = client.post(f"/v1/runs/{finished_run['id']}/predict", files=files)
    assert r.status_code == 422
    assert "notes.txt" in r.json()["detail"]
    r = client.post(f"/v1/runs/{finished_run['id']}/predict", json={"images": ["%%% not base64"]})
    assert r.status_code == 422 and "images[0]" in r.json()["detail"]
    r = client.post(f"/v1/runs/{finished_run['id']}/predict", json={"pictures": []})
    assert r.status_code == 422 and "images" in r.json()["detail"]


def test_predict_rejects_too_many_images(client, finished_run, item_pngs):
    files = [("files", (f"{i}.png", item_pngs[0], "image/png")) for i in range(257)]
    r = client.post(f"/v1/runs/{finished_run['id']}/predict", files=files)
    assert r.status_code == 413
    assert "257 images" in r.json()["detail"] and "256" in r.json()["detail"]


def test_predict_needs_a_succeeded_run_of_your_own(
    client, client_b, anon_client, finished_run, unfinished_run, item_pngs
):
    files = [("files", ("a.png", item_pngs[0], "image/png"))]
    r = client.post(f"/v1/runs/{unfinished_run['id']}/predict", files=files)
    assert r.status_code == 409
    assert_names_unfinished_state(r.json()["detail"])
    r = client_b.post(f"/v1/runs/{finished_run['id']}/predict", files=files)
    assert r.status_code == 404 and finished_run["id"] in r.json()["detail"]
    r = anon_client.post(f"/v1/runs/{finished_run['id']}/predict", files=files)
    assert r.status_code == 401
    r = client.post("/v1/runs/does-not-exist/predict", files=files)
    assert r.status_code == 404
    r = client.post(f"/v1/runs/{finished_run['id']}/predict", files=files, params={"k": 0})
    assert r.status_code == 422 and "k" in r.json()["detail"]


def test_predict_reproduces_assignments_when_the_run_resizes(client, small_dataset, gpu_worker):
    """A run trained at another size than its dataset's (8 px digits at 12 px): /predict on the
    training images must give exactly the stored assignments, so training, evaluation and serving
    resize by one rule (ml.data.resize_to)."""
    from tests.service.conftest import TINY, start_run, wait_for_run

    run = wait_for_run(client, start_run(client, small_dataset, {**TINY, "image_size": 12})["id"])
    assert run["state"] == "SUCCEEDED", run
    stored = stored_assignments(client, run["id"])
    items = sorted(stored)
    files = [("files", (f"{i}.png", item_png(client, small_dataset, i), "image/png")) for i in items]
    preds = []
    for start in range(0, len(files), 64):
        r = client.post(f"/v1/runs/{run['id']}/predict", files=files[start : start + 64])
        assert r.status_code == 200, r.text
        preds += [p["cluster"] for p in r.json()["predictions"]]
    assert preds == [stored[i] for i in items]


def test_predict_raw_pixels_match_png_files(client, finished_run, item_pngs):
    """The fast path: `application/octet-stream` uint8 NCHW pixels at the run's shape answer as the
    same images sent as PNG files; a body that is not whole images is a 422 naming the shape."""
    run_id = finished_run["id"]
    some = ITEMS[:6]
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(item_pngs[i])))[None] for i in some])  # (6, 1, 8, 8)
    raw = client.post(
        f"/v1/runs/{run_id}/predict",
        content=pixels.tobytes(),
        headers={"Content-Type": "application/octet-stream"},
        params={"k": 10},
    )
    assert raw.status_code == 200, raw.text
    files = [("files", (f"{i}.png", item_pngs[i], "image/png")) for i in some]
    as_files = client.post(f"/v1/runs/{run_id}/predict", files=files, params={"k": 10}).json()["predictions"]
    preds = raw.json()["predictions"]
    assert [p["file"] for p in preds] == [f"tensor[{i}]" for i in range(len(some))]
    for a, b in zip(preds, as_files):
        assert a["cluster"] == b["cluster"]
        np.testing.assert_allclose(
            [t["probability"] for t in a["top_k"]], [t["probability"] for t in b["top_k"]], atol=1e-6
        )
    bad = client.post(
        f"/v1/runs/{run_id}/predict", content=b"\x00" * 65, headers={"Content-Type": "application/octet-stream"}
    )
    assert bad.status_code == 422 and "1x8x8" in bad.json()["detail"], bad.text
