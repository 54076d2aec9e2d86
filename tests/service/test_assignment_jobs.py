"""Assignment jobs over the real stack: a digits model (trained on 1200 digits) assigns held-out
digits (low drift) and the same digits inverted (high drift) on the gpu worker, in checkpointed
batches; cancel and resume continue at the checkpoint; the drift report and the UI page show it;
a job made through a registered model lists its rows with the version's cluster names and merges.
Ordinary calls go through scan_client; refusals are asserted on raw status codes (httpx)."""

from __future__ import annotations

import io
import uuid

import numpy as np
import pytest

from app.schemas.assignment_jobs import AssignmentJobOut, JobAssignmentOut
from scan_client import ApiError, Client
from tests.stack import TINY, scan_client, start_run, wait_for_run

TRAIN = 1200


def _npz(images: np.ndarray, labels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, images=images, labels=labels)
    return buf.getvalue()


def _digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images * (255 / 16)).round().astype(np.uint8), digits.target.astype(np.int64)


@pytest.fixture(scope="module")
def scan(client) -> Client:
    return scan_client(client)


@pytest.fixture(scope="module")
def drift_model(client, scan, gpu_worker) -> dict:
    images, labels = _digits()

    def upload(name: str, images: np.ndarray, labels: np.ndarray) -> str:
        return scan.upload_dataset(_npz(images, labels), filename=f"{name}.npz", name=name).id

    train = upload("digits-train1200", images[:TRAIN], labels[:TRAIN])
    run = wait_for_run(client, start_run(client, train, TINY)["id"], timeout=600)
    assert run["state"] == "SUCCEEDED", run
    held_out = upload("digits-heldout", images[TRAIN:], labels[TRAIN:])
    inverted = upload("digits-inverted", 255 - images[TRAIN:], labels[TRAIN:])
    return {"run": run, "held_out": held_out, "inverted": inverted, "n": len(images) - TRAIN}


def wait_for_job(scan: Client, job_id: str, until=None) -> AssignmentJobOut:
    """The job once it has ended (or `until(job)`); fails only if it makes no progress for 5 minutes."""
    return scan.wait_for_assignment_job(job_id, until=until, stall_timeout=300, poll_s=0.2)


def _all_assignments(scan: Client, job_id: str) -> list[JobAssignmentOut]:
    items: list[JobAssignmentOut] = []
    while True:
        page = scan.job_assignments(job_id, limit=1000, offset=len(items))
        items += page.items
        if not page.items or len(items) >= page.total:
            return items


def test_held_out_digits_drift_little_and_inverted_digits_drift_a_lot(client, scan, drift_model):
    run_id, n = drift_model["run"]["id"], drift_model["n"]
    low = wait_for_job(scan, scan.create_assignment_job(drift_model["held_out"], run_id, batch_size=128).id)
    high = wait_for_job(scan, scan.create_assignment_job(drift_model["inverted"], run_id, batch_size=128).id)
    assert low.state == high.state == "SUCCEEDED", (low, high)
    assert low.processed == low.total == n and low.fraction == 1.0

    rows = _all_assignments(scan, low.id)
    assert [r.item_index for r in rows] == list(range(n))
    # The same images through /predict give the clusters the job stored.
    held_out = drift_model["held_out"]
    pngs = [client.get(f"/v1/datasets/{held_out}/items/{i}.png").content for i in range(16)]
    clusters = [p.cluster for p in scan.predict(run_id, pngs).predictions]
    assert clusters == [r.cluster for r in rows[:16]]
    # A job made with a run id: the run's clusters, unnamed.
    assert all(r.served_as == r.cluster and r.name is None for r in rows)

    d_low, d_high = scan.drift_report(low.id), scan.drift_report(high.id)
    print("drift held-out:", _brief(d_low), "\ndrift inverted:", _brief(d_high))
    assert d_low.items == n and d_low.training_items == TRAIN
    # Held-out digits look like the training digits: near the 5% / 1% a training image itself has.
    assert d_low.novelty["share_beyond_p99"] < 0.1
    assert d_low.proportions["psi"] < 0.25
    # Inverted digits are new: most lie beyond the training set's 99th percentile.
    assert d_high.novelty["share_beyond_p99"] > 0.5
    assert d_high.novelty["share_beyond_p99"] > 5 * max(d_low.novelty["share_beyond_p99"], 0.01)
    assert d_high.proportions["psi"] > d_low.proportions["psi"]
    assert d_high.verdict == "major"
    assert d_high.confidence["ks_statistic"] > d_low.confidence["ks_statistic"]
    novel = d_high.novelty["most_novel"]
    assert len(novel) == 24 and novel[0]["distance"] >= novel[-1]["distance"]
    top = scan.job_assignments(high.id, order="novelty_desc", limit=1)
    assert top.items[0].item_index == novel[0]["item_index"]


def _brief(d) -> dict:
    return {
        "psi": round(d.proportions["psi"], 3),
        "chi2_p": d.proportions["chi_square"]["p_value"],
        "ks": round(d.confidence["ks_statistic"], 3),
        "below": round(d.confidence["share_below_threshold"], 3),
        "p95": round(d.novelty["share_beyond_p95"], 3),
        "p99": round(d.novelty["share_beyond_p99"], 3),
        "verdict": d.verdict,
    }


def test_cancel_then_resume_continues_at_the_checkpoint(client, scan, drift_model):
    run_id, n = drift_model["run"]["id"], drift_model["n"]
    job = scan.create_assignment_job(drift_model["held_out"], run_id, batch_size=4)
    running = wait_for_job(scan, job.id, until=lambda j: j.processed >= 40)
    assert running.state in ("RUNNING", "SUCCEEDED")
    r = client.post(f"/v1/assignment-jobs/{job.id}/cancel")
    if running.state == "SUCCEEDED":
        pytest.skip("the job finished before it could be canceled (machine idle and fast)")
    assert r.status_code == 202 and r.json()["cancel_requested"]
    stopped = wait_for_job(scan, job.id)
    assert stopped.state == "CANCELED" and 40 <= stopped.processed < n
    assert stopped.processed % 4 == 0  # whole batches only
    assert client.get(f"/v1/assignment-jobs/{job.id}/drift").status_code == 409
    assert client.post(f"/v1/assignment-jobs/{job.id}/cancel").status_code == 409
    assert scan.job_assignments(job.id, limit=1).total == stopped.processed

    resumed = scan.resume_assignment_job(job.id)
    assert resumed.processed == stopped.processed
    done = wait_for_job(scan, job.id)
    assert done.state == "SUCCEEDED" and done.processed == n
    rows = _all_assignments(scan, job.id)
    assert [r.item_index for r in rows] == list(range(n))  # no gap, no duplicate
    assert client.post(f"/v1/assignment-jobs/{job.id}/resume").status_code == 409


def test_jobs_check_the_tenant_and_the_inputs(client, client_b, scan, drift_model, digits_dataset):
    run_id = drift_model["run"]["id"]
    job = scan.create_assignment_job(drift_model["held_out"], run_id)
    # Tenant B can neither see A's job nor use A's dataset or model.
    for path in ("", "/assignments", "/drift"):
        r = client_b.get(f"/v1/assignment-jobs/{job.id}{path}")
        assert r.status_code == 404 and "not found" in r.json()["detail"]
    assert client_b.post(f"/v1/assignment-jobs/{job.id}/cancel").status_code == 404
    assert all(j["id"] != job.id for j in client_b.get("/v1/assignment-jobs").json()["items"])
    assert job.id in [j.id for j in scan.list_assignment_jobs(limit=1000).items]
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
    scan.create_model("digits-drift")
    scan.publish_version("digits-drift", run_id)
    by_name = scan.create_assignment_job(drift_model["held_out"], "digits-drift/versions/1")
    assert by_name.run_id == run_id and by_name.model == "digits-drift/versions/1"
    assert client_b.post("/v1/assignment-jobs", json={"dataset_id": b_data, "model": "digits-drift"}).status_code == 404
    wait_for_job(scan, by_name.id)
    # A model that has not finished is a 409.
    queued = start_run(client, digits_dataset, TINY)
    with pytest.raises(ApiError) as err:
        scan.create_assignment_job(drift_model["held_out"], queued["id"])
    assert err.value.status_code == 409 and "SUCCEEDED" in err.value.detail
    scan.cancel_run(queued["id"])
    wait_for_job(scan, job.id)


def test_assignments_and_drift_carry_the_cluster_names_of_the_models_version(api_server, keys, scan, drift_model):
    """A job made through `name@alias` lists each row with the cluster its version serves it as and
    that cluster's name, read at request time: named and merged after the job ran, the rows, the
    drift report and the job's page say so."""
    from tests.service.test_ui import ui_client

    run_id, n = drift_model["run"]["id"], drift_model["n"]
    name = f"digits-named-{uuid.uuid4().hex[:6]}"
    scan.create_model(name)
    scan.publish_version(name, run_id)
    scan.move_alias(name, "production", 1)
    job = wait_for_job(
        scan, scan.create_assignment_job(drift_model["held_out"], f"{name}@production", batch_size=256).id
    )
    assert job.state == "SUCCEEDED", job
    rows = _all_assignments(scan, job.id)
    assert len(rows) == n and all(r.served_as == r.cluster and r.name is None for r in rows)

    counts = np.bincount([r.cluster for r in rows], minlength=10)
    big, second = (int(c) for c in np.argsort(-counts, kind="stable")[:2])
    low, high = min(big, second), max(big, second)
    scan.name_cluster(name, 1, low, "most common")
    scan.merge_clusters(name, 1, [low, high])
    # Another model publishing the same run does not change which version the job was made with.
    other = f"{name}-other"
    scan.create_model(other)
    scan.publish_version(other, run_id)

    page = scan.job_assignments(job.id, limit=1000)
    assert (page.model, page.version) == (f"{name}@production", 1)
    for r in page.items:
        assert r.served_as == (low if r.cluster in (low, high) else r.cluster)
        assert r.name == ("most common" if r.cluster in (low, high) else None)
    in_high = scan.job_assignments(job.id, cluster=high, limit=1000)
    assert in_high.total == counts[high] > 0
    assert all((r.served_as, r.name) == (low, "most common") for r in in_high.items)

    report = scan.drift_report(job.id)
    by_cluster = {c["cluster"]: c for c in report.proportions["clusters"]}
    assert (by_cluster[high]["served_as"], by_cluster[high]["name"]) == (low, "most common")
    assert by_cluster[low]["name"] == "most common" and by_cluster[high]["count"] == counts[high]
    assert all(c["name"] is None for k, c in by_cluster.items() if k not in (low, high))
    assert all(
        m["name"] == ("most common" if m["cluster"] in (low, high) else None) for m in report.novelty["most_novel"]
    )

    # Renamed: the next listing carries the new name (nothing is rerun), and so does the job's page.
    scan.name_cluster(name, 1, low, "renamed")
    assert scan.job_assignments(job.id, cluster=low, limit=1).items[0].name == "renamed"
    with ui_client(api_server, keys["a"]) as ui:
        assert "renamed" in ui.get(f"/ui/assignment-jobs/{job.id}").text


def test_the_job_page_shows_the_drift_and_the_most_novel_images(api_server, keys, scan, drift_model):
    from tests.service.test_ui import ui_client

    job = wait_for_job(scan, scan.create_assignment_job(drift_model["inverted"], drift_model["run"]["id"]).id)
    report = scan.drift_report(job.id)
    with ui_client(api_server, keys["a"]) as ui:
        page = ui.get(f"/ui/assignment-jobs/{job.id}")
        assert page.status_code == 200
        assert 'id="verdict"' in page.text and report.verdict in page.text
        first = report.novelty["most_novel"][0]["item_index"]
        img = f"/ui/datasets/{drift_model['inverted']}/items/{first}.png"
        assert img in page.text
        assert ui.get(img).headers["content-type"] == "image/png"
    with ui_client(api_server, keys["b"]) as ui_b:
        assert ui_b.get(f"/ui/assignment-jobs/{job.id}").status_code == 404


def test_a_job_whose_worker_is_killed_resumes_at_its_checkpoint(scan, drift_model, gpu_worker):
    run_id, n = drift_model["run"]["id"], drift_model["n"]
    job = scan.create_assignment_job(drift_model["held_out"], run_id, batch_size=2)
    wait_for_job(scan, job.id, until=lambda j: j.processed >= 20)
    gpu_worker.kill()  # SIGKILL, mid-batch: nothing acknowledges, the lease goes stale
    at_kill = scan.get_assignment_job(job.id)
    assert at_kill.state == "RUNNING" and at_kill.processed < n
    gpu_worker.start()
    done = wait_for_job(scan, job.id)
    assert done.state == "SUCCEEDED" and done.processed == n, done
    assert done.attempts >= 2  # claimed again, from the checkpoint
    rows = _all_assignments(scan, job.id)
    assert [r.item_index for r in rows] == list(range(n))
