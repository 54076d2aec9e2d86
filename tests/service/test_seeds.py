"""`seeds` through the service: a run with seeds=2 (a body field of POST /v1/runs) trains both seeds in
the worker, and /metrics and the run page report every seed, their mean +- std and the kept one."""

from __future__ import annotations

import numpy as np
import pytest

from tests.service.conftest import TINY, wait_for_run
from tests.service.test_ui import ui_client


@pytest.fixture(scope="module")
def seeds_run(client, small_dataset, gpu_worker):
    body = {"dataset_id": small_dataset, "num_clusters": 10, "preset": "small", "overrides": TINY, "seeds": 2}
    r = client.post("/v1/runs", json=body)
    assert r.status_code == 202, r.text
    created = r.json()
    assert created["config"]["seeds"] == 2 and created["overrides"]["seeds"] == 2
    run = wait_for_run(client, created["id"], timeout=600)
    assert run["state"] == "SUCCEEDED", run
    return run


def test_a_two_seed_run_reports_each_seed_and_their_mean_and_std(client, seeds_run):
    body = client.get(f"/v1/runs/{seeds_run['id']}/metrics").json()
    seeds, metrics = body["seeds"], body["metrics"]
    assert seeds == metrics["seeds"]
    assert seeds["n"] == 2 and [r["index"] for r in seeds["runs"]] == [0, 1]
    assert seeds["runs"][0]["seed"] == seeds_run["config"]["seed"] != seeds["runs"][1]["seed"]
    for step in ("scan", "selflabel"):
        for key in ("acc", "nmi", "ari", "scan_loss", "confident"):
            values = [r[step][key] for r in seeds["runs"]]
            assert seeds["mean"][step][key] == pytest.approx(np.mean(values))
            assert seeds["std"][step][key] == pytest.approx(np.std(values, ddof=1))
    # The kept seed is the lowest-loss one, and the run's own metrics are its.
    losses = [r["selflabel"]["scan_loss"] for r in seeds["runs"]]
    assert seeds["kept"] == int(np.argmin(losses))
    assert metrics["selflabel"]["acc"] == seeds["runs"][seeds["kept"]]["selflabel"]["acc"]
    # Progress ran across both seeds: the clustering stage counted 2 x its epochs.
    clustering = next(s for s in seeds_run["stages"] if s["stage"] == "clustering")
    assert clustering["epochs"] == 2 * TINY["clustering.epochs"]


def test_the_run_page_shows_the_seeds_table(api_server, keys, seeds_run):
    with ui_client(api_server, keys["a"]) as c:
        page = c.get(f"/ui/runs/{seeds_run['id']}")
    assert page.status_code == 200
    table = page.text.split('id="seeds-table"', 1)[1].split("</table>", 1)[0]
    assert table.count("<tr") == 1 + 2 + 1  # header, two seeds, mean +- std
    assert "kept" in table and "±" in table


@pytest.mark.parametrize(
    ("extra", "field"),
    [({"seeds": 11}, "seeds"), ({"seeds": 0}, "seeds"), ({"seeds": 2, "overrides": {"seeds": 3}}, "seeds")],
)
def test_bad_seeds_are_a_422_naming_the_field(client, small_dataset, extra, field):
    body = {"dataset_id": small_dataset, "num_clusters": 10, "preset": "small", **extra}
    r = client.post("/v1/runs", json=body)
    assert r.status_code == 422, r.text
    assert field in r.text
