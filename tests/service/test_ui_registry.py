"""The model registry in /ui: create a model, publish, move an alias, and name and merge clusters on
the grid of a version, through the forms (over HTTP and in headless Chromium, as tests/service/test_ui.py)."""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import pytest

from tests.service.test_ui import all_images_loaded, check_screenshot, ui_client

DOCS_IMG = Path(__file__).resolve().parents[2] / "docs" / "img" / "model-version.png"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def token(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html)[1]


def published_model(client, run_id: str) -> str:
    name = unique("ui")
    assert client.post("/v1/models", json={"name": name}).status_code == 201
    assert client.post(f"/v1/models/{name}/versions", json={"run_id": run_id}).status_code == 201
    return name


def test_ui_registry_forms_check_origin_token_and_tenant(api_server, keys, client, finished_run):
    origin = {"Origin": api_server}
    with ui_client(api_server, keys["a"]) as a, ui_client(api_server, keys["b"]) as b:
        page = a.get("/ui/models")
        assert page.status_code == 200 and 'id="create-model"' in page.text
        name = unique("ui")
        assert a.post("/ui/models", data={"name": name}, headers=origin).status_code == 403  # no token
        assert a.post("/ui/models", data={"name": name, "csrf_token": token(page.text)}).status_code == 403  # no origin
        r = a.post("/ui/models", data={"name": name, "csrf_token": token(page.text)}, headers=origin)
        assert r.status_code == 303 and r.headers["location"] == f"/ui/models/{name}"
        r = a.post("/ui/models", data={"name": name, "csrf_token": token(page.text)}, headers=origin)
        assert r.status_code == 409 and "already have a model" in r.text and 'id="form-error"' in r.text
        r = a.post("/ui/models", data={"name": "bad name", "csrf_token": token(page.text)}, headers=origin)
        assert r.status_code == 422 and 'id="form-error"' in r.text

        model_page = a.get(f"/ui/models/{name}").text
        assert finished_run["id"] in model_page  # offered for publishing
        r = a.post(
            f"/ui/models/{name}/versions",
            data={"run_id": finished_run["id"], "csrf_token": token(model_page)},
            headers=origin,
        )
        assert r.status_code == 303
        r = a.post(
            f"/ui/models/{name}/aliases",
            data={"alias": "production", "version": "1", "csrf_token": token(model_page)},
            headers=origin,
        )
        assert r.status_code == 303
        assert client.get(f"/v1/models/{name}").json()["aliases"] == {"production": 1}
        assert f"{name} v1" in a.get(f"/ui/runs/{finished_run['id']}").text  # the run page links its versions

        # Tenant B: its own valid session and token, A's model: not found, nothing changed.
        b_token = token(b.get("/ui/models").text)
        assert b.get(f"/ui/models/{name}").status_code == 404
        assert b.get(f"/ui/models/{name}/versions/1").status_code == 404
        for path, data in (
            (f"/ui/models/{name}/versions", {"run_id": finished_run["id"]}),
            (f"/ui/models/{name}/aliases", {"alias": "production", "version": "1"}),
            (f"/ui/models/{name}/versions/1/clusters/0", {"cluster_name": "mine"}),
            (f"/ui/models/{name}/versions/1/merge", {"clusters": ["0", "1"]}),
        ):
            r = b.post(path, data={**data, "csrf_token": b_token}, headers=origin)
            assert r.status_code == 404, (path, r.status_code)
        clusters = client.get(f"/v1/models/{name}/versions/1/clusters").json()["clusters"]
        assert len(clusters) == 10 and all(c["name"] is None for c in clusters)

        version_page = a.get(f"/ui/models/{name}/versions/1").text
        r = a.post(
            f"/ui/models/{name}/versions/1/clusters/0",
            data={"cluster_name": "ring\x07", "csrf_token": token(version_page)},
            headers=origin,
        )
        assert r.status_code == 422 and "printable" in r.text


@pytest.fixture
def page(browser, api_server, keys):
    context = browser.new_context(base_url=api_server, viewport={"width": 1200, "height": 900})
    page = context.new_page()
    page.goto("/ui/login")
    page.fill("#api_key", keys["a"])
    page.click("#login-form button[type=submit]")
    page.wait_for_url(re.compile(r".*/ui$"))
    yield page
    context.close()


def test_browser_names_and_merges_clusters_on_their_grid(page, client, finished_run, tmp_path):
    name = published_model(client, finished_run["id"])
    page.click("a.nav >> text=Models")
    page.wait_for_url("**/ui/models")
    page.click(f'tr[data-model="{name}"] a')
    page.wait_for_url(f"**/ui/models/{name}")
    page.click('tr[data-version="1"] a >> text=name & merge clusters')
    page.wait_for_url(f"**/ui/models/{name}/versions/1")

    cells = page.locator("#version-clusters .cluster-cell")
    assert cells.count() == 10
    n_imgs, n_loaded = all_images_loaded(page, "#version-clusters")
    assert n_imgs >= 10 and n_loaded == n_imgs  # the grid the person names from really shows images

    sizes = {c["index"]: c["size"] for c in client.get(f"/v1/runs/{finished_run['id']}/clusters").json()}
    a, b = sorted(sorted(sizes, key=sizes.get, reverse=True)[:2])
    cell = page.locator(f"#cluster-{a}")
    cell.locator("input[name=cluster_name]").fill("loops")
    cell.locator("input[name=description]").fill("round strokes")
    cell.locator("button >> text=Save").click()
    page.wait_for_load_state("networkidle")
    assert page.locator(f"#cluster-{a} .cluster-name").inner_text() == "loops"
    named = client.get(f"/v1/models/{name}/versions/1/clusters").json()["clusters"]
    assert next(c for c in named if c["cluster"] == a)["name"] == "loops"

    page.check(f"#cluster-{a} input[name=clusters]")
    page.check(f"#cluster-{b} input[name=clusters]")
    page.fill("#merge-form input[name=group_name]", "round things")
    page.click("#merge-button")
    page.wait_for_load_state("networkidle")
    assert page.locator(f"#cluster-{b}").get_attribute("data-served-as") == str(a)
    assert "merged into" in page.locator(f"#cluster-{b}").inner_text()
    assert page.locator(f"#cluster-{a} .cluster-name").inner_text() == "round things"
    served = client.get(f"/v1/models/{name}/clusters").json()["clusters"]
    group = next(c for c in served if c["cluster"] == a)
    assert group["members"] == [a, b] and group["name"] == "round things" and len(served) == 9
    assert group["size"] == sizes[a] + sizes[b]
    check_screenshot(page.locator("#version-clusters").screenshot(path=str(tmp_path / "named.png")))
    if os.environ.get("SCAN_WRITE_DOCS_SCREENSHOT"):  # refresh the README's picture from this run
        DOCS_IMG.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(DOCS_IMG), type="png", clip={"x": 0, "y": 0, "width": 1200, "height": 700})

    page.locator(f"#cluster-{b} button.unmerge").click()
    page.wait_for_load_state("networkidle")
    assert page.locator(f"#cluster-{b}").get_attribute("data-served-as") == str(b)
    assert len(client.get(f"/v1/models/{name}/clusters").json()["clusters"]) == 10
