"""num_clusters "auto" or a range through the service: validated at submission, the K sweep's curve
and choice in the run's metrics, config, results and run page (ml/num_clusters.py)."""

from __future__ import annotations

import re

import pytest

from tests.service.conftest import TINY, wait_for_run
from tests.service.test_ui import ui_client


def _body(dataset_id, num_clusters, **overrides):
    return {"dataset_id": dataset_id, "num_clusters": num_clusters, "preset": "small", "overrides": TINY | overrides}


@pytest.mark.parametrize(
    ("asked", "message"),
    [
        ("many", "num_clusters"),
        ({"min": 8, "max": 4}, "min 8 is above max 4"),
        ({"min": 1, "max": 4}, "num_clusters"),
        ({"min": 2}, "num_clusters"),
        ({"min": 2, "max": 360}, "num_clusters: max 360 must be below the dataset's 360 images"),
        (2.5, "num_clusters"),
    ],
)
def test_a_bad_num_clusters_is_a_422_naming_the_field(client, small_dataset, asked, message):
    r = client.post("/v1/runs", json=_body(small_dataset, asked))
    assert r.status_code == 422 and message in r.json()["detail"], r.text


def test_the_chosen_k_is_the_stage_s_to_set(client, small_dataset):
    r = client.post("/v1/runs", json=_body(small_dataset, "auto", num_clusters_chosen=5))
    assert r.status_code == 422 and "num_clusters_chosen" in r.json()["detail"], r.text


def test_an_auto_run_reports_its_curve_and_trains_the_k_it_chose(client, small_dataset, gpu_worker, api_server, keys):
    r = client.post("/v1/runs", json=_body(small_dataset, "auto", **{"clustering.sweep_steps": 60}))
    assert r.status_code == 202, r.text
    run = r.json()
    assert run["config"]["num_clusters"] == "auto" and run["num_clusters"] is None
    run = wait_for_run(client, run["id"], timeout=600)
    assert run["state"] == "SUCCEEDED", run

    sweep = client.get(f"/v1/runs/{run['id']}/metrics").json()["metrics"]["num_clusters"]
    curve = sweep["curve"]
    assert [row["k"] for row in curve] == list(range(2, 21)) and sweep["range"] == [2, 20]
    assert all(-1 <= row["criterion"] <= 1 and row["clusters_used"] <= row["k"] for row in curve)
    k = sweep["chosen"]
    best = max(curve, key=lambda row: row["criterion"])
    assert k == min(row["k"] for row in curve if row["criterion"] >= best["criterion"] - best["criterion_sd"])
    assert sweep["criterion"] == "neighbor_modularity"
    # The stored config keeps what was asked and records the choice; every result has k clusters.
    assert run["config"]["num_clusters"] == "auto" and run["config"]["num_clusters_chosen"] == k == run["num_clusters"]
    assert len(client.get(f"/v1/runs/{run['id']}/clusters").json()) == k
    assert client.get(f"/v1/runs/{run['id']}/metrics").json()["metrics"]["selflabel"]["num_clusters"] == k
    clustering = next(s for s in run["stages"] if s["stage"] == "clustering")
    assert clustering["state"] == "SUCCEEDED"
    with ui_client(api_server, keys["a"]) as ui:
        page = ui.get(f"/ui/runs/{run['id']}").text
    assert re.search(rf'id="num-clusters-chosen">{k}<', page)
    assert 'class="chart chart-num-clusters"' in page and f"{k} (chosen in 2..20) clusters" in page
    assert page.count("<tr") >= len(curve)
