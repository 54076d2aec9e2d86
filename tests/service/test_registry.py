"""/v1/models over HTTP against the real API: names, versions, aliases moved (warm first) and rolled
back, serving by `name`, `name@alias`, `name/versions/N`, named and merged clusters, exports, and
every route refusing another tenant. Ordinary calls go through scan_client; refusals are asserted on
the raw status codes (httpx), which is their point."""

from __future__ import annotations

import json
import uuid
import zipfile

import pytest
from prometheus_client.parser import text_string_to_metric_families

from scan_client import Client
from tests.stack import TINY, scan_client, start_run, wait_for_run

ITEMS = list(range(0, 1797, 150))  # 12 digits items


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def model_loads(anon_client) -> float:
    for fam in text_string_to_metric_families(anon_client.get("/metrics").text):
        if fam.name == "scan_model_loads":
            return sum(s.value for s in fam.samples if s.name == "scan_model_loads_total")
    return 0.0


@pytest.fixture(scope="module")
def second_run(client, small_dataset, gpu_worker) -> dict:
    """Another SUCCEEDED run (360 digits): the version an alias moves to, never served before this
    module (its first alias move is what loads it)."""
    run = wait_for_run(client, start_run(client, small_dataset, TINY)["id"], timeout=600)
    assert run["state"] == "SUCCEEDED", run
    return run


@pytest.fixture(scope="module")
def scan(client) -> Client:
    return scan_client(client)


@pytest.fixture(scope="module")
def item_pngs(client, digits_dataset) -> list[bytes]:
    return [client.get(f"/v1/datasets/{digits_dataset}/items/{i}.png").content for i in ITEMS]


@pytest.fixture(scope="module")
def item_files(item_pngs) -> list:
    """The same images as a hand-written multipart body, for the calls that must be refused."""
    return [("files", (f"item{i}.png", png, "image/png")) for i, png in zip(ITEMS, item_pngs)]


def new_model(client, *runs: dict) -> str:
    scan, name = scan_client(client), unique("digits")
    scan.create_model(name, "handwritten digits")
    for n, run in enumerate(runs, start=1):
        assert scan.publish_version(name, run["id"]).version == n
    return name


def test_models_are_named_per_tenant_and_checked(client, client_b, scan):
    name = unique("m")
    made = scan.create_model(name)
    assert (made.name, made.latest_version, made.aliases) == (name, None, {})
    assert client.post("/v1/models", json={"name": name}).status_code == 409
    assert client_b.post("/v1/models", json={"name": name}).status_code == 201  # unique per tenant only
    for bad in ("", "a b", "-x", "x" * 65, "a/b", "a@b", "\u00e9t\u00e9"):
        r = client.post("/v1/models", json={"name": bad})
        assert r.status_code == 422 and "name" in r.json()["detail"], (bad, r.text)
    r = client.post("/v1/models", json={"name": unique("m"), "description": "bell\x07"})
    assert r.status_code == 422 and "printable" in r.json()["detail"]
    assert client.post("/v1/models", json={"name": unique("m"), "description": "x" * 2001}).status_code == 422
    assert name in [m.name for m in scan.list_models(limit=1000).items]
    assert scan.get_model(name).name == name
    assert scan.update_model(name, "two\nlines").description == "two\nlines"
    scan.delete_model(name)
    assert client.get(f"/v1/models/{name}").status_code == 404
    assert client_b.get(f"/v1/models/{name}").status_code == 200  # B's own model of that name is untouched


def test_publish_takes_a_succeeded_run_of_the_tenant_once(client, client_b, scan, finished_run, small_dataset):
    name = new_model(client)
    v1 = scan.publish_version(name, finished_run["id"])
    assert (v1.model, v1.version, v1.run_id, v1.num_clusters) == (name, 1, finished_run["id"], 10)
    again = client.post(f"/v1/models/{name}/versions", json={"run_id": finished_run["id"]})
    assert again.status_code == 200 and again.json()["version"] == 1  # a retried publish makes no v2
    queued = scan.create_run(small_dataset, 10, overrides={"pretext.epochs": 1})
    scan.cancel_run(queued.id)
    r = client.post(f"/v1/models/{name}/versions", json={"run_id": queued.id})
    assert r.status_code == 409 and "SUCCEEDED" in r.json()["detail"]
    # Tenant B can neither publish A's run under its own model nor touch A's model.
    b_name = new_model(client_b)
    assert client_b.post(f"/v1/models/{b_name}/versions", json={"run_id": finished_run["id"]}).status_code == 404
    assert client_b.post(f"/v1/models/{name}/versions", json={"run_id": finished_run["id"]}).status_code == 404
    assert client_b.get(f"/v1/models/{name}/versions").status_code == 404
    assert client_b.get(f"/v1/models/{name}/versions/1").status_code == 404
    assert client.get(f"/v1/models/{name}/versions/2").status_code == 404
    listed = scan.list_versions(name)
    assert [v.version for v in listed.items] == [1] and listed.total == 1


def test_alias_moves_warm_first_resolve_at_request_time_and_roll_back(
    client, client_b, anon_client, scan, finished_run, second_run, item_pngs, item_files
):
    name = new_model(client, finished_run, second_run)
    assert client.post(f"/v1/models/{name}@production/predict", files=item_files).status_code == 404

    # The alias moves only once its version is loaded (and has run once) in the API process: the
    # move itself loads the never-served second run, the requests after it load nothing.
    loads = model_loads(anon_client)
    moved = scan.move_alias(name, "production", 2)
    assert moved.model_dump() == {"model": name, "alias": "production", "version": 2, "previous_version": None}
    assert model_loads(anon_client) == loads + 1
    answer = scan.predict_model(f"{name}@production", item_pngs, k=10)
    assert (answer.model, answer.version, answer.alias) == (name, 2, "production")
    assert answer.run_id == second_run["id"]
    assert model_loads(anon_client) == loads + 1  # no request waited for a cold model

    def clusters(answer) -> list[int]:
        return [p.cluster for p in answer.predictions]

    by_run = {run["id"]: clusters(scan.predict(run["id"], item_pngs)) for run in (finished_run, second_run)}
    assert clusters(scan.predict_model(f"{name}@production", item_pngs)) == by_run[second_run["id"]]
    assert clusters(scan.predict_model(f"{name}/versions/1", item_pngs)) == by_run[finished_run["id"]]

    moved = scan.move_alias(name, "production", 1)
    assert (moved.version, moved.previous_version) == (1, 2)
    answer = scan.predict_model(name, item_pngs)  # a bare name: its production alias
    assert (answer.version, answer.alias) == (1, "production")
    assert clusters(answer) == by_run[finished_run["id"]]

    back = scan.rollback_alias(name, "production")
    assert (back.version, back.previous_version) == (2, 1)
    assert scan.predict_model(f"{name}@production", item_pngs).version == 2
    back = scan.rollback_alias(name)
    assert (back.version, back.previous_version) == (1, 2)
    scan.move_alias(name, "staging", 2)
    model = scan.get_model(name)
    assert model.aliases == {"production": 1, "staging": 2} and model.latest_version == 2
    assert [v.aliases for v in scan.list_versions(name).items] == [["staging"], ["production"]]

    assert client.put(f"/v1/models/{name}/aliases/production", json={"version": 3}).status_code == 404
    assert client.put(f"/v1/models/{name}/aliases/bad alias", json={"version": 1}).status_code == 422
    assert client.post(f"/v1/models/{name}/aliases/staging/rollback").status_code == 409  # never moved
    for call in (
        lambda c: c.put(f"/v1/models/{name}/aliases/production", json={"version": 2}),
        lambda c: c.post(f"/v1/models/{name}/aliases/production/rollback"),
        lambda c: c.delete(f"/v1/models/{name}/aliases/staging"),
        lambda c: c.post(f"/v1/models/{name}@production/predict", files=item_files),
        lambda c: c.post(f"/v1/models/{name}/versions/1/predict", files=item_files),
        lambda c: c.post(f"/v1/models/{name}/neighbors", json={"k": 3, "query": {"items": [1]}}),
        lambda c: c.get(f"/v1/models/{name}/model"),
        lambda c: c.get(f"/v1/models/{name}/versions/1/model"),
        lambda c: c.get(f"/v1/models/{name}@production/clusters"),
        lambda c: c.get(f"/v1/models/{name}/versions/1/clusters"),
        lambda c: c.post(f"/v1/models/{name}/versions/1/clusters/0/unmerge"),
        lambda c: c.post(f"/v1/models/{name}/versions/1/neighbors", json={"k": 3, "query": {"items": [1]}}),
        lambda c: c.get(f"/v1/models/{name}@production/assignments"),
        lambda c: c.patch(f"/v1/models/{name}", json={"description": "mine now"}),
        lambda c: c.delete(f"/v1/models/{name}"),
    ):
        assert call(client_b).status_code == 404
    assert scan.get_model(name).aliases == {"production": 1, "staging": 2}

    # Without a production alias a bare name serves the latest version.
    scan.delete_alias(name, "production")
    answer = scan.predict_model(name, item_pngs)
    assert (answer.version, answer.alias, answer.run_id) == (2, None, second_run["id"])
    scan.delete_alias(name, "staging")
    assert client.post(f"/v1/models/{name}@staging/predict", files=item_files).status_code == 404


def test_named_and_merged_clusters_are_served_without_retraining(
    client, client_b, scan, finished_run, item_pngs, tmp_path
):
    name = new_model(client, finished_run)
    base = f"/v1/models/{name}/versions/1"
    raw = scan.predict(finished_run["id"], item_pngs, k=10).predictions
    a, b = raw[0].cluster, next(p.cluster for p in raw if p.cluster != raw[0].cluster)
    low, high = min(a, b), max(a, b)

    named = scan.name_cluster(name, 1, low, "loops", description="round strokes")
    assert named.name == "loops" and named.members == [low]
    assert client.patch(f"{base}/clusters/{high}", json={"name": "LOOPS"}).status_code == 409  # one name, one cluster
    assert client.patch(f"{base}/clusters/{high}", json={"name": "tab\tname"}).status_code == 422
    assert client.patch(f"{base}/clusters/{high}", json={"name": "x" * 101}).status_code == 422
    assert client.patch(f"{base}/clusters/99", json={"name": "nine"}).status_code == 404
    assert client.patch(f"{base}/clusters/{high}", json={"colour": "red"}).status_code == 422
    assert client_b.patch(f"{base}/clusters/{low}", json={"name": "mine"}).status_code == 404

    answer = scan.predict_model(name, item_pngs, k=10)
    for p, q in zip(answer.predictions, raw):
        assert p.cluster == q.cluster
        assert p.name == ("loops" if q.cluster == low else None)

    served = scan.merge_clusters(name, 1, [high, low])
    group = next(c for c in served.clusters if c.cluster == low)
    assert group.members == [low, high] and group.name == "loops" and group.description == "round strokes"
    assert len(served.clusters) == 9
    stats = {c.index: c.size for c in scan.clusters(finished_run["id"])}
    assert group.size == stats[low] + stats[high]
    assert client.patch(f"{base}/clusters/{high}", json={"name": "x"}).status_code == 409  # name it through {low}

    merged = scan.predict_model(name, item_pngs, k=10).predictions
    for p, q in zip(merged, raw):
        probs = {t.cluster: t.probability for t in q.top_k}  # k=10: all of them
        grouped = {c: v for c, v in probs.items() if c != high} | {low: probs[low] + probs[high]}
        listed = {t.cluster: t.probability for t in p.top_k}
        assert listed.keys() == grouped.keys()
        assert all(listed[c] == pytest.approx(grouped[c], abs=1e-5) for c in grouped)
        # The group's summed probability may now beat the cluster that won alone.
        assert p.cluster == max(grouped, key=grouped.get) or grouped[p.cluster] == pytest.approx(
            max(grouped.values()), abs=1e-6
        )
        assert p.confidence == pytest.approx(max(listed.values()), abs=1e-6)
        assert p.name == ("loops" if p.cluster == low else None)
        if q.cluster in (low, high):
            assert p.cluster == low

    # The training images' assignments, as the version serves them: the same as /predict.
    rows = {}
    for page in (1, 2):
        listed = scan.model_assignments(name, page_size=1000, page=page)
        assert listed.total == 1797 and listed.version == 1
        rows |= {a.item_index: a for a in listed.items}
    assert len(rows) == 1797
    for i, p in zip(ITEMS, merged):
        assert (rows[i].cluster, rows[i].name) == (p.cluster, p.name)
        assert rows[i].confidence == pytest.approx(p.confidence, abs=1e-4)
    assert not any(a.cluster == high for a in rows.values())
    in_group = scan.model_assignments(name, cluster=low, page_size=1000)
    assert in_group.total == sum(1 for a in rows.values() if a.cluster == low) > 0
    assert all(a.name == "loops" for a in in_group.items)
    assert client_b.get(f"/v1/models/{name}/versions/1/assignments").status_code == 404

    # Neighbours and the export carry the mapping and the names too.
    body = scan.model_neighbors(name, items=[ITEMS[0]], k=20)
    assert (body.model, body.version) == (name, 1)
    hits = body.results[0].neighbors
    assert all(h.cluster != high for h in hits)
    assert all(h.name == ("loops" if h.cluster == low else None) for h in hits)

    archive = scan.export_model(name, tmp_path / "model.zip", format="torchscript")
    with zipfile.ZipFile(archive) as zf:
        assert {"model.pt", "preprocessing.json", "clusters.json"} <= set(zf.namelist())
        spec = json.loads(zf.read("clusters.json"))
    assert (spec["model"], spec["version"]) == (name, 1)
    expected = {"cluster": high, "served_as": low, "name": "loops", "description": "round strokes"}
    assert spec["clusters"][high] == expected
    assert len(spec["clusters"]) == 10

    assert len(scan.unmerge_cluster(name, 1, high).clusters) == 10
    assert client.post(f"{base}/clusters/{high}/unmerge").status_code == 409
    after = scan.predict_model(name, item_pngs).predictions
    assert [p.cluster for p in after] == [q.cluster for q in raw]
    assert client.post(f"{base}/clusters/merge", json={"clusters": [low, low]}).status_code == 422
    assert client.post(f"{base}/clusters/merge", json={"clusters": [low, 10]}).status_code == 404
    assert client_b.post(f"{base}/clusters/merge", json={"clusters": [low, high]}).status_code == 404


def test_a_dataset_behind_a_model_version_is_not_deleted(client, scan, second_run, small_dataset):
    name = new_model(client, second_run)
    r = client.delete(f"/v1/datasets/{small_dataset}")
    assert r.status_code == 409 and "model version" in r.json()["detail"]
    assert scan.get_dataset(small_dataset).state == "READY"
    scan.delete_model(name)
    assert client.post(f"/v1/models/{name}/predict", files=[]).status_code == 404


def test_another_api_process_answers_warm_while_it_loads_the_moved_version(
    stack, client, keys, scan, finished_run, second_run, item_pngs
):
    """The alias move warms the process that handled it; a second API process (as with several
    workers) answers with the version it has loaded, saying so, while it loads the new one."""
    import os
    import signal
    import time

    from tests.stack import start_api

    name = new_model(client, finished_run, second_run)
    scan.move_alias(name, "production", 1)
    proc, base = start_api(stack.env, stack.var_dir / "api-second.log")
    try:
        with Client(base, keys["a"], timeout=240) as other:
            assert other.predict_model(f"{name}@production", item_pngs).version == 1
            loads = model_loads(other.http)
            scan.move_alias(name, "production", 2)
            first = other.predict_model(f"{name}@production", item_pngs)
            assert (first.version, first.run_id) == (1, finished_run["id"])  # warm, and truthful
            # The background load ends; a stall (no load for minutes) fails, a slow machine does not.
            deadline = time.monotonic() + 300
            while model_loads(other.http) < loads + 1:
                assert time.monotonic() < deadline, "the moved version never loaded in the second process"
                time.sleep(0.5)
            answer = other.predict_model(f"{name}@production", item_pngs)
            assert (answer.version, answer.run_id) == (2, second_run["id"])
            assert model_loads(other.http) == loads + 1  # loaded once, in the background
            # An explicit version is never swapped for another.
            assert other.predict_model(f"{name}/versions/2", item_pngs).version == 2
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
