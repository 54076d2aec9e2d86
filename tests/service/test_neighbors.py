"""POST /v1/runs/{id}/neighbors over HTTP: items, vectors and uploaded images as queries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def features(stack, finished_run) -> np.ndarray:
    """The run's stored features (the index's space), read from its run directory."""
    return np.load(Path(stack.settings.runs_dir) / finished_run["id"] / "features.npy")


@pytest.fixture(scope="module")
def clusters_of(client, finished_run) -> dict[int, int]:
    rows = client.get(f"/v1/runs/{finished_run['id']}/assignments", params={"page_size": 1000}).json()
    total, out = rows["total"], {r["item_index"]: r["cluster"] for r in rows["items"]}
    page = 2
    while len(out) < total:
        more = client.get(
            f"/v1/runs/{finished_run['id']}/assignments", params={"page_size": 1000, "page": page}
        ).json()["items"]
        out.update({r["item_index"]: r["cluster"] for r in more})
        page += 1
    return out


def neighbors(client, run_id: str, **body):
    return client.post(f"/v1/runs/{run_id}/neighbors", json=body)


def test_neighbors_of_an_item_start_with_the_item(client, finished_run, clusters_of):
    run_id = finished_run["id"]
    items = [0, 42, 1000, 1796]
    r = neighbors(client, run_id, k=10, query={"items": items}, combine="separate")
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [res["query"] for res in results] == [{"item": i} for i in items]
    for item, res in zip(items, results):
        hits = res["neighbors"]
        assert len(hits) == 10 and hits[0]["item"] == item
        assert abs(hits[0]["score"] - 1) < 1e-4
        scores = [h["score"] for h in hits]
        assert scores == sorted(scores, reverse=True)
        assert all(h["cluster"] == clusters_of[h["item"]] for h in hits)
        assert len({h["item"] for h in hits}) == 10


def test_neighbors_match_exact_search_on_stored_features(client, finished_run, features):
    """Raw vectors (any norm) give the same hits as brute-force cosine search; `mean` combines."""
    run_id = finished_run["id"]
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    query = unit[[3, 7]] * np.array([[2.0], [0.5]])  # norms must not matter
    r = neighbors(client, run_id, k=5, query={"vectors": query.tolist()}, combine="separate")
    assert r.status_code == 200, r.text
    for q, res in zip(unit[[3, 7]], r.json()["results"]):
        exact = np.sort(unit @ q)[::-1][:5]
        np.testing.assert_allclose([h["score"] for h in res["neighbors"]], exact, atol=1e-4)
    r = neighbors(client, run_id, k=5, query={"items": [3, 7]}, combine="mean")
    assert r.status_code == 200
    (res,) = r.json()["results"]
    mean = unit[[3, 7]].mean(axis=0)
    exact_ids = np.argsort(-(unit @ (mean / np.linalg.norm(mean))), kind="stable")[:5]
    got = [h["item"] for h in res["neighbors"]]
    # ties at float precision may swap places; the sets of scores must agree
    np.testing.assert_allclose(
        sorted(unit[got] @ (mean / np.linalg.norm(mean))),
        sorted(unit[exact_ids] @ (mean / np.linalg.norm(mean))),
        atol=1e-4,
    )


def test_neighbors_of_an_uploaded_image(client, finished_run, digits_dataset):
    """An uploaded copy of item 5 is embedded with the run's backbone and finds item 5 (score ~1)."""
    run_id = finished_run["id"]
    png = client.get(f"/v1/datasets/{digits_dataset}/items/5.png").content
    r = client.post(f"/v1/runs/{run_id}/neighbors", files=[("files", ("five.png", png, "image/png"))], data={"k": "8"})
    assert r.status_code == 200, r.text
    (res,) = r.json()["results"]
    assert res["query"] == {"files": ["five.png"]}
    hits = res["neighbors"]
    assert hits[0]["score"] > 0.999
    assert 5 in [h["item"] for h in hits if h["score"] > hits[0]["score"] - 1e-4]


def test_neighbors_bad_queries_are_4xx_with_a_message(client, client_b, finished_run, features):
    run_id = finished_run["id"]
    dim = features.shape[1]
    cases = [
        ({"k": 5000, "query": {"items": [1]}}, 422, "maximum"),
        ({"k": 2049, "query": {"items": [1]}}, 422, "maximum"),
        ({"k": 0, "query": {"items": [1]}}, 422, "k"),
        ({"k": 5, "query": {"vectors": [[0.5] * (dim + 1)]}}, 422, f"{dim}-dimensional"),
        ({"k": 5, "query": {"vectors": [[0.0] * dim]}}, 422, "zero"),
        ({"k": 5, "query": {"items": [len(features)]}}, 422, "out of range"),
        ({"k": 5, "query": {"items": [-1]}}, 422, "out of range"),
        ({"k": 5, "query": {}}, 422, "exactly one"),
        ({"k": 5, "query": {"items": [1]}, "combine": "max"}, 422, "combine"),
    ]
    for body, status, words in cases:
        r = neighbors(client, run_id, **body)
        assert r.status_code == status, (body, r.text)
        assert words in r.json()["detail"], (body, r.json())
    r = client.post(f"/v1/runs/{run_id}/neighbors", files=[("files", ("x.bin", b"\x00\x01garbage"))])
    assert r.status_code == 422 and "x.bin" in r.json()["detail"]
    r = neighbors(client_b, run_id, k=5, query={"items": [1]})
    assert r.status_code == 404


def test_neighbors_need_a_succeeded_run(client, small_dataset):
    r = client.post(
        "/v1/runs",
        json={"dataset_id": small_dataset, "num_clusters": 10, "preset": "small", "overrides": {"pretext.epochs": 1}},
    )
    run_id = r.json()["id"]
    client.post(f"/v1/runs/{run_id}/cancel")
    r = neighbors(client, run_id, k=5, query={"items": [1]})
    assert r.status_code == 409 and "SUCCEEDED" in r.json()["detail"]
