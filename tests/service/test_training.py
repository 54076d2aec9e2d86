"""End to end through HTTP with a real worker: train, read results, cancel, survive a killed worker."""

from __future__ import annotations

import json
import time

import httpx

from tests.service.conftest import TINY, start_run, wait_for_run


def test_run_succeeds_with_progress_for_every_stage(finished_run):
    stages = {s["stage"]: s for s in finished_run["stages"]}
    assert list(stages) == ["pretext", "mining", "clustering", "selflabel"]
    for s in stages.values():
        assert s["state"] == "SUCCEEDED" and s["attempts"] == 1 and s["duration_s"] > 0
    assert stages["pretext"]["epoch"] == stages["pretext"]["epochs"] == 2
    assert stages["pretext"]["loss"] is not None and stages["pretext"]["images_per_s"] > 0
    assert finished_run["error"] is None and finished_run["finished_at"]


def test_results_are_consistent(client, finished_run, digits_dataset):
    run_id = finished_run["id"]
    clusters = client.get(f"/v1/runs/{run_id}/clusters").json()
    assert len(clusters) == 10
    assert sum(c["size"] for c in clusters) == 1797
    everything = client.get(f"/v1/runs/{run_id}/assignments", params={"page_size": 1000}).json()
    assert everything["total"] == 1797 and len(everything["items"]) == 1000
    rest = client.get(f"/v1/runs/{run_id}/assignments", params={"page_size": 1000, "page": 2}).json()
    assert [a["item_index"] for a in everything["items"] + rest["items"]] == list(range(1797))
    biggest = max(clusters, key=lambda c: c["size"])
    members = client.get(
        f"/v1/runs/{run_id}/assignments", params={"cluster": biggest["index"], "page_size": 1000}
    ).json()
    assert members["total"] == biggest["size"]
    assert all(a["cluster"] == biggest["index"] for a in members["items"])
    assert set(biggest["top_items"]) <= {a["item_index"] for a in members["items"]}
    confident = client.get(f"/v1/runs/{run_id}/assignments", params={"min_confidence": 0.3}).json()
    assert confident["total"] < 1797 or all(a["confidence"] >= 0.3 for a in confident["items"])
    assert all(a["confidence"] >= 0.3 for a in confident["items"])
    assert any(c["matched_label"] in [str(i) for i in range(10)] for c in clusters)

    metrics = client.get(f"/v1/runs/{run_id}/metrics").json()["metrics"]
    final = metrics[metrics["final"]]
    for key in ("acc", "nmi", "ari", "top5_acc", "confusion"):
        assert key in final
    assert 0 <= final["acc"] <= 1 and sum(map(sum, final["confusion"])) == 1797
    assert "kmeans" in metrics["mining"] and 0 <= metrics["mining"]["neighbor_purity"] <= 1


def test_events_paginate_and_stream(client, finished_run, api_server, keys):
    run_id = finished_run["id"]
    page = client.get(f"/v1/runs/{run_id}/events", params={"limit": 5}).json()
    assert len(page["items"]) == 5 and page["total"] > 5
    nxt = client.get(f"/v1/runs/{run_id}/events", params={"after": page["next_after"], "limit": 5}).json()
    assert nxt["items"][0]["id"] > page["items"][-1]["id"]
    kinds = {e["kind"] for e in client.get(f"/v1/runs/{run_id}/events", params={"limit": 1000}).json()["items"]}
    assert {"state", "stage_started", "progress", "stage_finished"} <= kinds

    headers = {"Authorization": f"Bearer {keys['a']}", "Accept": "text/event-stream"}
    with httpx.stream("GET", f"{api_server}/v1/runs/{run_id}/events", headers=headers, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("event: ")]
    assert events[-1] == "event: end" and "event: progress" in events
    assert len(events) == page["total"] + 1


def test_results_of_an_unfinished_run_are_409(client, small_dataset):
    run = start_run(client, small_dataset, {"pretext.epochs": 50})
    r = client.get(f"/v1/runs/{run['id']}/clusters")
    assert r.status_code == 409 and "SUCCEEDED" in r.json()["detail"]
    client.post(f"/v1/runs/{run['id']}/cancel")
    wait_for_run(client, run["id"], timeout=180)


def test_cancel_mid_run_ends_canceled_within_seconds(client, small_dataset, gpu_worker):
    run = start_run(client, small_dataset, {"pretext.epochs": 200})
    wait_for_run(client, run["id"], until=lambda r: (r["stages"][0]["step"] or 0) >= 1, timeout=300)
    t0 = time.monotonic()
    assert client.post(f"/v1/runs/{run['id']}/cancel").status_code == 202
    done = wait_for_run(client, run["id"], timeout=60)
    assert done["state"] == "CANCELED", done
    assert time.monotonic() - t0 < 15
    assert done["stages"][0]["state"] == "CANCELED"


def test_killed_worker_resumes_from_checkpoint(client, small_dataset, gpu_worker):
    run = start_run(
        client,
        small_dataset,
        {
            # Enough epochs that the kill lands inside the pretext on an idle machine too: 5 epochs
            # of 360 8x8 images took 0.4 s idle, over before the test saw epoch 3 and killed.
            "pretext.epochs": 200,
            "pretext.batch_size": 64,
            "clustering.epochs": 1,
            "clustering.num_heads": 1,
            "selflabel.epochs": 1,
        },
    )
    # Epoch 3 in progress means epochs 1-2 are checkpointed.
    wait_for_run(client, run["id"], until=lambda r: (r["stages"][0]["epoch"] or 0) >= 3, timeout=400)
    gpu_worker.kill()
    try:
        before = client.get(f"/v1/runs/{run['id']}").json()
        assert before["state"] == "PRETEXT", before["stages"][0]
    finally:
        gpu_worker.start()  # whatever happened, the next tests get their worker back
    done = wait_for_run(client, run["id"], timeout=600)
    assert done["state"] == "SUCCEEDED", done
    pretext = done["stages"][0]
    assert pretext["attempts"] == 2 and done["redeliveries"] >= 1
    events = client.get(f"/v1/runs/{run['id']}/events", params={"limit": 1000}).json()["items"]
    second = [e for e in events if e["kind"] == "progress" and e["stage"] == "pretext" and e["attempt"] == 2]
    assert second, json.dumps(events[-20:])
    assert min(e["epoch"] for e in second) >= 3, "the restarted stage began again at epoch 1"
    assert any(e["kind"] == "recovered" for e in events)


def test_a_run_asking_for_two_devices_trains_data_parallel_in_the_worker(client, small_dataset, gpu_worker):
    """`devices: 2` on a machine without a GPU: the worker's stage starts two gloo ranks for pretext
    and self-labeling (ml/distributed.py), rank 0's progress reaches the run, and the run finishes
    with the results of every stage. The stage summaries say what trained them."""
    run = start_run(client, small_dataset, {**TINY, "devices": 2})
    done = wait_for_run(client, run["id"], timeout=600)
    assert done["state"] == "SUCCEEDED", done["error"]
    stages = {s["stage"]: s for s in done["stages"]}
    assert stages["pretext"]["epoch"] == stages["pretext"]["epochs"] == 2
    assert stages["pretext"]["loss"] is not None
    events = client.get(f"/v1/runs/{run['id']}/events", params={"limit": 1000}).json()["items"]
    finished = {e["stage"]: e["data"] for e in events if e["kind"] == "stage_finished"}
    for stage in ("pretext", "selflabel"):
        assert finished[stage]["devices"] == 2 and finished[stage]["device"] == "cpu x2", finished[stage]
    assert finished["clustering"]["devices"] == 1  # SCAN's stage trains on one device
    assert len(client.get(f"/v1/runs/{run['id']}/clusters").json()) == 10
