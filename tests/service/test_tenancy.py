"""Tenant B cannot see tenant A's datasets, runs or results on any route: always 404, never 403."""

from __future__ import annotations

import re


def _fill(path: str, dataset_id: str, run_id: str) -> str:
    return path.replace("{dataset_id}", dataset_id).replace("{run_id}", run_id).replace("{index}", "0")


def test_every_route_with_an_id_answers_404_to_another_tenant(client, client_b, digits_dataset, finished_run):
    from app.main import app  # after `stack` has pointed the settings at the test stack

    run_id = finished_run["id"]
    checked = 0
    for path, ops in app.openapi()["paths"].items():
        if not re.search(r"\{(dataset_id|run_id)\}", path):
            continue
        url = _fill(path, digits_dataset, run_id)
        assert client.get(url).status_code != 404 or "get" not in ops, url  # A sees its own
        for method in ops:
            if method == "delete":
                continue  # checked below, so A's dataset survives this loop
            r = client_b.request(method.upper(), url, json={}) if method != "get" else client_b.get(url)
            assert r.status_code == 404, (method, url, r.status_code, r.text)
            assert "not found" in r.json()["detail"]
            checked += 1
    assert checked >= 10
    assert client_b.delete(f"/v1/datasets/{digits_dataset}").status_code == 404
    assert client.get(f"/v1/datasets/{digits_dataset}").status_code == 200


def test_lists_and_run_creation_are_scoped(client_b, digits_dataset, finished_run):
    assert digits_dataset not in {d["id"] for d in client_b.get("/v1/datasets").json()["items"]}
    assert finished_run["id"] not in {r["id"] for r in client_b.get("/v1/runs").json()["items"]}
    r = client_b.post("/v1/runs", json={"dataset_id": digits_dataset, "num_clusters": 10, "preset": "small"})
    assert r.status_code == 404
    r = client_b.get("/v1/runs", params={"dataset_id": digits_dataset})
    assert r.json()["total"] == 0
