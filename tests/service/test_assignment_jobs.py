"""Assignment jobs over the real stack: a digits model (trained on 1200 digits) assigns held-out
digits (low drift) and the same digits inverted (high drift) on the gpu worker, in checkpointed
batches; cancel and resume continue at the checkpoint; the drift report and the UI page show it."""

from __future__ import annotations

import io
import time

import httpx
import numpy as np
import pytest

from tests.stack import TINY, start_run, wait_for_run

TRAIN = 1200


def _npz(images: np.ndarray, labels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, images=images, labels=labels)
    return buf.getvalue()


def _digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images * (255 / 16)).round().astype(np.uint8), digits.target.astype(np.int64)


def _upload(client: httpx.Client, name: str, images: np.ndarray, labels: np.ndarray) -> str:
    r = client.post("/v1/datasets", files={"file": (f"{name}.npz", _npz(images, labels))}, data={"name": name})
    assert r.status_code == 201, r.text
    return r.json()["id"]


@pytest.fixture(scope="module")
def drift_model(client, gpu_worker) -> dict:
    images, labels = _digits()
    train = _upload(client, "digits-train1200", images[:TRAIN], labels[:TRAIN])
    run = wait_for_run(client, start_run(client, train, TINY)["id"], timeout=600)
    assert run["state"] == "SUCCEEDED", run
    held_out = _upload(client, "digits-heldout", images[TRAIN:], labels[TRAIN:])
    inverted = _upload(client, "digits-inverted", 255 - images[TRAIN:], labels[TRAIN:])
    return {"run": run, "held_out": held_out, "inverted": inverted, "n": len(images) - TRAIN}


def wait_for_job(
    client: httpx.Client, job_id: str, states=("SUCCEEDED", "FAILED", "CANCELED"), until=None, timeout=300
):
    """The job once its state is in ``states`` (or ``until(job)``); ``timeout`` bounds a stall."""
    deadline, mark = time.monotonic() + timeout, None
    while True:
        job = client.get(f"/v1/assignment-jobs/{job_id}").json()
        if (until(job) if until else job["state"] in states) or job["state"] in ("FAILED",):
            return job
        if (job["state"], job["processed"]) != mark or job["state"] == "QUEUED":
            mark, deadline = (job["state"], job["processed"]), time.monotonic() + timeout
        assert time.monotonic() < deadline, f"job {job_id} made no progress: {job}"
        time.sleep(0.2)


def _job(client, dataset_id, run_id, **extra) -> dict:
    r = client.post("/v1/assignment-jobs", json={"dataset_id": dataset_id, "model": run_id, **extra})
    assert r.status_code == 202, r.text
    return r.json()


def _all_assignments(client, job_id) -> list[dict]:
    items, offset = [], 0
    while True:
        page = client.get(f"/v1/assignment-jobs/{job_id}/assignments", params={"limit": 1000, "offset": offset}).json()
        items += page["items"]
        offset += len(page["items"])
        if not page["items"] or offset >= page["total"]:
            return items


def test_held_out_digits_drift_little_and_inverted_digits_drift_a_lot(client, drift_model):
    run_id, n = drift_model["run"]["id"], drift_model["n"]
    low = wait_for_job(client, _job(client, drift_model["held_out"], run_id, batch_size=128)["id"])
    high = wait_for_job(client, _job(client, drift_model["inverted"], run_id, batch_size=128)["id"])
    assert low["state"] == high["state"] == "SUCCEEDED", (low, high)
    assert low["processed"] == low["total"] == n and low["fraction"] == 1.0

    rows = _all_assignments(client, low["id"])
    assert [r["item_index"] for r in rows] == list(range(n))
    # The same images through /predict give the clusters the job stored.
    held_out = drift_model["held_out"]
    files = [
        ("files", (f"{i}.png", client.get(f"/v1/datasets/{held_out}/items/{i}.png").content, "image/png"))
        for i in range(16)
    ]
    predicted = client.post(f"/v1/runs/{run_id}/predict", files=files)
    assert predicted.status_code == 200, predicted.text
    clusters = [p["cluster"] for p in predicted.json()["predictions"]]
    assert clusters == [r["cluster"] for r in rows[:16]]

    d_low = client.get(f"/v1/assignment-jobs/{low['id']}/drift").json()
    d_high = client.get(f"/v1/assignment-jobs/{high['id']}/drift").json()
    print("drift held-out:", _brief(d_low), "\ndrift inverted:", _brief(d_high))
    assert d_low["items"] == n and d_low["training_items"] == TRAIN
    # Held-out digits look like the training digits: near the 5% / 1% a training image itself has.
    assert d_low["novelty"]["share_beyond_p99"] < 0.1
    assert d_low["proportions"]["psi"] < 0.25
    # Inverted digits are new: most lie beyond the training set's 99th percentile.
    assert d_high["novelty"]["share_beyond_p99"] > 0.5
    assert d_high["novelty"]["share_beyond_p99"] > 5 * max(d_low["novelty"]["share_beyond_p99"], 0.01)
    assert d_high["proportions"]["psi"] > d_low["proportions"]["psi"]
    assert d_high["verdict"] == "major"
    assert d_high["confidence"]["ks_statistic"] > d_low["confidence"]["ks_statistic"]
    novel = d_high["novelty"]["most_novel"]
    assert len(novel) == 24 and novel[0]["distance"] >= novel[-1]["distance"]
    top = client.get(f"/v1/assignment-jobs/{high['id']}/assignments", params={"order": "novelty_desc", "limit": 1})
    assert top.json()["items"][0]["item_index"] == novel[0]["item_index"]


def _brief(d: dict) -> dict:
    return {
        "psi": round(d["proportions"]["psi"], 3),
        "chi2_p": d["proportions"]["chi_square"]["p_value"],
        "ks": round(d["confidence"]["ks_statistic"], 3),
        "below": round(d["confidence"]["share_below_threshold"], 3),
        "p95": round(d["novelty"]["share_beyond_p95"], 3),
        "p99": round(d["novelty"]["share_beyond_p99"], 3),
        "verdict": d["verdict"],
    }


def test_cancel_then_resume_continues_at_the_checkpoint(client, drift_model):
    run_id, n = drift_model["run"]["id"], drift_model["n"]
    job = _job(client, drift_model["held_out"], run_id, batch_size=4)
    running = wait_for_job(client, job["id"], until=lambda j: j["processed"] >= 40)
    assert running["state"] in ("RUNNING", "SUCCEEDED")
    r = client.post(f"/v1/assignment-jobs/{job['id']}/cancel")
    if running["state"] == "SUCCEEDED":
        pytest.skip("the job finished before it could be canceled (machine idle and fast)")
    assert r.status_code == 202 and r.json()["cancel_requested"]
    stopped = wait_for_job(client, job["id"])
    assert stopped["state"] == "CANCELED" and 40 <= stopped["processed"] < n
    assert stopped["processed"] % 4 == 0  # whole batches only
    assert client.get(f"/v1/assignment-jobs/{job['id']}/drift").status_code == 409
    assert client.post(f"/v1/assignment-jobs/{job['id']}/cancel").status_code == 409
    written = client.get(f"/v1/assignment-jobs/{job['id']}/assignments", params={"limit": 1}).json()["total"]
    assert written == stopped["processed"]

    resumed = client.post(f"/v1/assignment-jobs/{job['id']}/resume")
    assert resumed.status_code == 202 and resumed.json()["processed"] == stopped["processed"]
    done = wait_for_job(client, job["id"])
    assert done["state"] == "SUCCEEDED" and done["processed"] == n
    rows = _all_assignments(client, job["id"])
    assert [r["item_index"] for r in rows] == list(range(n))  # no gap, no duplicate
    assert client.post(f"/v1/assignment-jobs/{job['id']}/resume").status_code == 409


def test_jobs_check_the_tenant_and_the_inputs(client, client_b, drift_model, digits_dataset):
    run_id = drift_model["run"]["id"]
    job = _job(client, drift_model["held_out"], run_id)
    # Tenant B can neither see A's job nor use A's dataset or model.
    for path in ("", "/assignments", "/drift"):
        r = client_b.get(f"/v1/assignment-jobs/{job['id']}{path}")
        assert r.status_code == 404 and "not found" in r.json()["detail"]
    assert client_b.post(f"/v1/assignment-jobs/{job['id']}/cancel").status_code == 404
    assert all(j["id"] != job["id"] for j in client_b.get("/v1/assignment-jobs").json()["items"])
    r = client_b.post("/v1/assignment-jobs", json={"dataset_id": drift_model["held_out"], "model": run_id})
    assert r.status_code == 404 and "dataset" in r.json()["detail"]
    b_data = client_b.post("/v1/datasets/import", json={"source": "digits"}).json()["id"]
    r = client_b.post("/v1/assignment-jobs", json={"dataset_id": b_data, "model": run_id})
    assert r.status_code == 404 and "model" in r.json()["detail"]
    # Bad input: 422 naming the field, never a 500.
    for body in (
        {"dataset_id": drift_model["held_out"]},
        {"dataset_id": drift_model["held_out"], "model": run_id, "batch_size": 0},
        {"dataset_id": drift_model["held_out"], "model": run_id, "confidence_threshold": 1.5},
        {"dataset_id": "x" * 65, "model": run_id},
        {"dataset_id": drift_model["held_out"], "model": run_id, "extra": 1},
    ):
        r = client.post("/v1/assignment-jobs", json=body)
        assert r.status_code == 422, (body, r.text)
    # A registered model's reference resolves to the run its version serves.
    assert client.post("/v1/models", json={"name": "digits-drift"}).status_code in (200, 201)
    assert client.post("/v1/models/digits-drift/versions", json={"run_id": run_id}).status_code in (200, 201)
    by_name = _job(client, drift_model["held_out"], "digits-drift/versions/1")
    assert by_name["run_id"] == run_id and by_name["model"] == "digits-drift/versions/1"
    assert client_b.post("/v1/assignment-jobs", json={"dataset_id": b_data, "model": "digits-drift"}).status_code == 404
    wait_for_job(client, by_name["id"])
    # A model that has not finished is a 409.
    queued = start_run(client, digits_dataset, TINY)
    r = client.post("/v1/assignment-jobs", json={"dataset_id": drift_model["held_out"], "model": queued["id"]})
    assert r.status_code == 409 and "SUCCEEDED" in r.json()["detail"]
    client.post(f"/v1/runs/{queued['id']}/cancel")
    wait_for_job(client, job["id"])


def test_the_job_page_shows_the_drift_and_the_most_novel_images(api_server, keys, client, drift_model):
    from tests.service.test_ui import ui_client

    job = wait_for_job(client, _job(client, drift_model["inverted"], drift_model["run"]["id"])["id"])
    report = client.get(f"/v1/assignment-jobs/{job['id']}/drift").json()
    with ui_client(api_server, keys["a"]) as ui:
        page = ui.get(f"/ui/assignment-jobs/{job['id']}")
        assert page.status_code == 200
        assert 'id="verdict"' in page.text and report["verdict"] in page.text
        first = report["novelty"]["most_novel"][0]["item_index"]
        img = f"/ui/datasets/{drift_model['inverted']}/items/{first}.png"
        assert img in page.text
        assert ui.get(img).headers["content-type"] == "image/png"
    with ui_client(api_server, keys["b"]) as ui_b:
        assert ui_b.get(f"/ui/assignment-jobs/{job['id']}").status_code == 404


def test_a_job_whose_worker_is_killed_resumes_at_its_checkpoint(client, drift_model, gpu_worker):
    run_id, n = drift_model["run"]["id"], drift_model["n"]
    job = _job(client, drift_model["held_out"], run_id, batch_size=2)
    wait_for_job(client, job["id"], until=lambda j: j["processed"] >= 20)
    gpu_worker.kill()  # SIGKILL, mid-batch: nothing acknowledges, the lease goes stale
    at_kill = client.get(f"/v1/assignment-jobs/{job['id']}").json()
    assert at_kill["state"] == "RUNNING" and at_kill["processed"] < n
    gpu_worker.start()
    done = wait_for_job(client, job["id"])
    assert done["state"] == "SUCCEEDED" and done["processed"] == n, done
    assert done["attempts"] >= 2  # claimed again, from the checkpoint
    rows = _all_assignments(client, job["id"])
    assert [r["item_index"] for r in rows] == list(range(n))
