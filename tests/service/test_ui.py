"""The cluster browser under /ui: cookie login over HTTP, then real pages in headless Chromium
(Debian's /usr/bin/chromium driven by Playwright), with screenshots checked for what they show."""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
needs_chromium = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="Debian chromium is not installed (make chromium)"
)
DOCS_IMG = Path(__file__).resolve().parents[2] / "docs" / "img" / "cluster-grid.png"


def login(c: httpx.Client, key: str, next: str = "/ui") -> httpx.Response:
    """POST /ui/login as the login page's form does: with its CSRF token, from this origin."""
    page = c.get("/ui/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    return c.post(
        "/ui/login",
        data={"api_key": key, "next": next, "csrf_token": token},
        headers={"Origin": str(c.base_url).rstrip("/")},
    )


def logout(c: httpx.Client) -> httpx.Response:
    token = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/ui").text).group(1)
    return c.post("/ui/logout", data={"csrf_token": token}, headers={"Origin": str(c.base_url).rstrip("/")})


@contextmanager
def ui_client(base: str, key: str | None = None) -> Iterator[httpx.Client]:
    """A cookie-holding client, logged in through POST /ui/login when given a key."""
    with httpx.Client(base_url=base, follow_redirects=False, timeout=120) as c:
        if key:
            r = login(c, key)
            assert r.status_code == 303, r.text
        yield c


# -- over HTTP ----------------------------------------------------------------------------------


def test_ui_login_sets_an_httponly_cookie_checked_like_the_api(api_server, keys):
    with ui_client(api_server) as c:
        r = c.get("/ui")
        assert r.status_code == 303 and r.headers["location"].startswith("/ui/login")
        r = login(c, "scan_nope_wrong")
        assert r.status_code == 401 and "not valid" in r.text
        assert "scan_session=" not in r.headers.get("set-cookie", "")
        r = login(c, keys["a"], next="https://evil.example/")
        assert r.status_code == 303 and r.headers["location"] == "/ui"  # no open redirect
        cookie = [h for h in r.headers.get_list("set-cookie") if h.startswith("scan_session=")][0]
        assert "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
        assert keys["a"] not in cookie  # a session id, never the key
        r = c.get("/ui")
        assert r.status_code == 200 and "tenant-a" in r.text
        r = logout(c)
        assert r.status_code == 303
        assert c.get("/ui").status_code == 303


def test_ui_images_and_pages_are_per_tenant(api_server, keys, finished_run, digits_dataset):
    run_id = finished_run["id"]
    with ui_client(api_server, keys["a"]) as a, ui_client(api_server, keys["b"]) as b, ui_client(api_server) as anon:
        r = a.get(f"/ui/datasets/{digits_dataset}/items/3.png")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(r.content)).size == (8, 8)
        assert anon.get(f"/ui/datasets/{digits_dataset}/items/3.png").status_code == 401
        assert b.get(f"/ui/datasets/{digits_dataset}/items/3.png").status_code == 404
        assert b.get(f"/ui/runs/{run_id}").status_code == 404
        assert a.get(f"/ui/datasets/{digits_dataset}/items/99999.png").status_code == 404
        progress = a.get(f"/ui/runs/{run_id}/progress").json()
        assert progress == {
            "id": run_id,
            "state": "SUCCEEDED",
            "stage": None,
            "progress": 1.0,
            "label": "done",
            "terminal": True,
        }
        assert a.get(f"/ui/runs/{run_id}/clusters/99").status_code == 404


# -- in Chromium --------------------------------------------------------------------------------


@pytest.fixture
def page(browser, api_server, keys):
    """A browser page logged in through the login form (the key typed once)."""
    context = browser.new_context(base_url=api_server, viewport={"width": 1200, "height": 900})
    page = context.new_page()
    page.goto("/ui")
    assert "/ui/login" in page.url
    page.fill("#api_key", keys["a"])
    page.click("#login-form button[type=submit]")
    page.wait_for_url(re.compile(r".*/ui$"))
    yield page
    context.close()


def all_images_loaded(page, selector: str) -> tuple[int, int]:
    """(images under selector, how many decoded with a real width)."""
    page.wait_for_load_state("networkidle")
    return page.evaluate(
        """sel => {
        const imgs = Array.from(document.querySelectorAll(sel + ' img'));
        return [imgs.length, imgs.filter(i => i.complete && i.naturalWidth > 0).length];
    }""",
        selector,
    )


def check_screenshot(png: bytes, min_colors: int = 8) -> Image.Image:
    img = Image.open(io.BytesIO(png)).convert("RGB")
    # A blank or broken page renders in a handful of colours; thumbnails and charts give many.
    assert len(img.getcolors(maxcolors=1 << 16) or range(1 << 16)) >= min_colors
    return img


@needs_chromium
def test_browser_runs_list_and_run_page(page, finished_run, tmp_path):
    run_id = finished_run["id"]
    row = page.locator(f'tr[data-run-id="{run_id}"]')
    assert row.locator(".state").inner_text() == "SUCCEEDED"
    assert row.locator(".progress .bar").get_attribute("style").replace(" ", "") == "width:100.0%"
    row.locator("a").first.click()
    page.wait_for_url(f"**/ui/runs/{run_id}")

    cells = page.locator("#cluster-grid .cluster-cell")
    assert cells.count() == 10
    n_imgs, n_loaded = all_images_loaded(page, "#cluster-grid")
    assert n_imgs >= 10 and n_loaded == n_imgs  # every prototype and top image really loaded
    assert page.locator("#cluster-grid img.prototype").count() >= 1
    charts = page.locator("#training-curves svg")
    titles = [charts.nth(i).get_attribute("aria-label") for i in range(charts.count())]
    assert {"pretext loss", "clustering loss", "selflabel loss", "self-labeling: confident samples"} <= set(titles)
    assert page.locator("#training-curves polyline").count() >= 4
    metrics = page.locator("#metrics-table").inner_text()
    assert "acc" in metrics and "nmi" in metrics and "neighbor_purity" in metrics
    assert page.locator("#confusion-matrix tbody tr").count() == 10

    shot = page.screenshot(full_page=True, path=str(tmp_path / "run.png"))
    check_screenshot(shot, min_colors=32)
    grid = page.locator("#cluster-grid").screenshot(path=str(tmp_path / "grid.png"))
    img = check_screenshot(grid)
    assert img.width > 300 and img.height > 100
    if os.environ.get("SCAN_WRITE_DOCS_SCREENSHOT"):  # refresh the README's picture from this run
        DOCS_IMG.parent.mkdir(parents=True, exist_ok=True)
        page.locator("#cluster-grid").screenshot(path=str(DOCS_IMG), type="png")


@needs_chromium
def test_browser_cluster_page_pages_lowest_confidence_first(page, client, finished_run):
    run_id = finished_run["id"]
    clusters = client.get(f"/v1/runs/{run_id}/clusters").json()
    biggest = max(clusters, key=lambda c: c["size"])
    page.goto(f"/ui/runs/{run_id}/clusters/{biggest['index']}?order=asc")
    n_imgs, n_loaded = all_images_loaded(page, "#members")
    assert n_imgs == min(biggest["size"], 96) and n_loaded == n_imgs
    captions = page.locator("#members figcaption").all_inner_texts()
    confidences = [float(c.split("·")[1]) for c in captions]
    assert confidences == sorted(confidences)
    rows = client.get(f"/v1/runs/{run_id}/assignments", params={"cluster": biggest["index"], "page_size": 1000}).json()[
        "items"
    ]
    assert confidences[0] == pytest.approx(min(r["confidence"] for r in rows), abs=0.006)
    if biggest["size"] > 96:
        page.click("a[rel=next]")
        page.wait_for_url("**page=2")
        more = [float(c.split("·")[1]) for c in page.locator("#members figcaption").all_inner_texts()]
        assert more and more[0] >= confidences[-1] - 0.006
    page.click("#toggle-order")
    page.wait_for_url("**order=desc")
    top = [float(c.split("·")[1]) for c in page.locator("#members figcaption").all_inner_texts()]
    assert top == sorted(top, reverse=True)


@needs_chromium
def test_browser_neighbours_view(page, finished_run):
    run_id = finished_run["id"]
    page.goto(f"/ui/runs/{run_id}/items/5/neighbors")
    n_imgs, n_loaded = all_images_loaded(page, "#neighbors")
    assert n_imgs == 24 and n_loaded == 24
    assert page.locator(".query img").evaluate("i => i.naturalWidth") > 0
    first = page.locator("#neighbors .neighbor").first
    target = first.get_attribute("data-item")
    first.locator("a").click()
    page.wait_for_url(f"**/items/{target}/neighbors")
    assert f"item {target}" in page.locator("h1").inner_text()


@needs_chromium
def test_browser_progress_bar_follows_a_live_run(page, client, small_dataset):
    """The runs list updates state and bar by polling, without reloading the page."""
    r = client.post(
        "/v1/runs",
        json={"dataset_id": small_dataset, "num_clusters": 10, "preset": "small", "overrides": {"pretext.epochs": 50}},
    )
    run_id = r.json()["id"]
    try:
        page.goto("/ui")
        row = page.locator(f'tr[data-run-id="{run_id}"]')
        assert row.locator(".state").inner_text() in ("QUEUED", "PRETEXT")
        page.evaluate("window.__no_reload = true")
        client.post(f"/v1/runs/{run_id}/cancel")
        page.wait_for_function(
            """id => document.querySelector(`tr[data-run-id="${id}"] .state`).textContent === 'CANCELED'""",
            arg=run_id,
            timeout=60_000,
        )
        assert page.evaluate("window.__no_reload") is True  # updated in place, not reloaded
        assert row.locator(".progress").get_attribute("data-terminal") == "true"
    finally:
        client.post(f"/v1/runs/{run_id}/cancel")


def test_ui_retry_button_resumes_a_canceled_run(api_server, keys, client, client_b, small_dataset):
    """The run page of a CANCELED run shows the retry button; it goes through the same service as
    POST /v1/runs/{id}/retry (another tenant gets 404, a running run 409)."""
    r = client.post(
        "/v1/runs",
        json={"dataset_id": small_dataset, "num_clusters": 10, "preset": "small", "overrides": {"pretext.epochs": 50}},
    )
    run_id = r.json()["id"]
    client.post(f"/v1/runs/{run_id}/cancel")
    from tests.stack import wait_for_run

    assert wait_for_run(client, run_id, timeout=300)["state"] == "CANCELED"
    try:
        with ui_client(api_server, keys["a"]) as a, ui_client(api_server, keys["b"]) as b:
            page = a.get(f"/ui/runs/{run_id}").text
            assert 'id="retry-button"' in page
            token = re.search(r'id="retry-form">\s*<input type="hidden" name="csrf_token" value="([^"]+)"', page)[1]
            origin = {"Origin": api_server}
            assert a.post(f"/ui/runs/{run_id}/retry", headers=origin).status_code == 403  # no token
            assert a.post(f"/ui/runs/{run_id}/retry", data={"csrf_token": token}).status_code == 403  # no origin
            b_page = b.get("/ui").text
            b_token = re.search(r'name="csrf_token" value="([^"]+)"', b_page)[1]
            assert b.post(f"/ui/runs/{run_id}/retry", data={"csrf_token": b_token}, headers=origin).status_code == 404
            r = a.post(f"/ui/runs/{run_id}/retry", data={"csrf_token": token}, headers=origin)
            assert r.status_code == 303 and r.headers["location"] == f"/ui/runs/{run_id}"
            run = client.get(f"/v1/runs/{run_id}").json()
            assert run["state"] not in ("CANCELED", "FAILED") and run["error"] is None
            assert 'id="retry-button"' not in a.get(f"/ui/runs/{run_id}").text
            assert a.post(f"/ui/runs/{run_id}/retry", data={"csrf_token": token}, headers=origin).status_code == 409
            kinds = [e["kind"] for e in client.get(f"/v1/runs/{run_id}/events").json()["items"]]
            assert "retried" in kinds
    finally:
        client.post(f"/v1/runs/{run_id}/cancel")
