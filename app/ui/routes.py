"""The cluster browser: server-rendered Jinja2 pages under /ui (plain HTML + CSS + a little JS).

Authentication is the API's: the key entered once on /ui/login is checked with the same
`key_row` as the `Authorization: Bearer` header and opens a server-side session
(app/services/ui_sessions.py); the browser keeps only its signed id in an HttpOnly, SameSite=Strict
cookie (Secure over https or with SCAN_SECURE_COOKIES), which every page, image and progress poll
below reads. Every form carries a CSRF token and every POST must come from this origin. Images
come from `/ui/datasets/{id}/items/{i}.png` (cookie-authenticated, so `<img>` tags load without
scripts setting headers).
"""

from __future__ import annotations

import hmac
import math
import secrets
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import numpy as np
from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.deps import SessionDep, SettingsDep
from app.schemas.common import MAX_INT, ClusterIndex, ItemIndex
from app.services import datasets as dataset_service
from app.services import registry, results, ui_sessions
from app.services import runs as run_service
from app.serving.model_cache import served_run
from app.tables import Dataset, Run, RunState, StageState, StageStatus, Tenant
from app.ui.charts import line_chart
from ml.stages import STAGES, run_fraction, stage_fraction

COOKIE = "scan_session"
LOGIN_CSRF_COOKIE = "scan_login_csrf"
RUNS_SHOWN = 200
MEMBERS_PER_PAGE = 96
NEIGHBORS_SHOWN = 24
TOP_ITEMS_SHOWN = 8

_APP_DIR = Path(__file__).resolve().parent.parent
templates = Jinja2Templates(directory=str(_APP_DIR / "templates"))
# Every page's logout form echoes its session's CSRF token (set by the UiTenant dependency).
templates.env.globals["csrf_token"] = lambda request: getattr(
    getattr(request.state, "ui_session", None), "csrf_token", ""
)
router = APIRouter(prefix="/ui", include_in_schema=False)


def _cookie_tenant(request: Request, session: SessionDep, settings: SettingsDep) -> Tenant:
    found = ui_sessions.find(session, settings, request.cookies.get(COOKIE))
    tenant = found[0] if found else None
    if found:
        request.state.ui_session = found[1]
    if tenant is None:
        if request.url.path.endswith((".png", "/progress")):
            raise HTTPException(401, "log in at /ui/login first")
        # Pages send the browser to the login form and back here afterwards.
        raise HTTPException(
            303, "log in at /ui/login first", headers={"Location": f"/ui/login?next={quote(request.url.path)}"}
        )
    return tenant


UiTenant = Annotated[Tenant, Depends(_cookie_tenant)]

_STATIC = {"style.css": "text/css; charset=utf-8", "ui.js": "text/javascript; charset=utf-8"}


@router.get("/static/{path}", name="ui_static")
def static_file(path: str):
    # A fixed list, not a directory mount: nothing else under app/ can be fetched by name.
    if path not in _STATIC:
        raise HTTPException(404, f"no static file {path}")
    return FileResponse(
        _APP_DIR / "static" / path, media_type=_STATIC[path], headers={"Cache-Control": "public, max-age=300"}
    )


def _secure(request: Request, settings) -> bool:
    return request.url.scheme == "https" or settings.secure_cookies


def _same_origin(request: Request) -> None:
    """A state-changing request must come from a page of this site: a browser always sends Origin
    (or at least Referer) on a cross-site POST, so a foreign or missing one is refused."""
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    origin = request.headers.get("origin") or ""
    referer = request.headers.get("referer") or ""
    if origin and origin != "null":
        if origin != own:
            raise HTTPException(403, "cross-site request refused (Origin does not match this site)")
    elif not (referer == own or referer.startswith(own + "/")):
        raise HTTPException(403, "cross-site request refused (no Origin or Referer from this site)")


def _login_page(request: Request, settings, next: str, error: str | None, status: int = 200):
    token = secrets.token_urlsafe(32)
    response = templates.TemplateResponse(
        request, "login.html", {"tenant": None, "next": next, "error": error, "login_csrf": token}, status_code=status
    )
    # Double-submit: the form's hidden token must equal this cookie, which another site cannot read.
    response.set_cookie(
        LOGIN_CSRF_COOKIE,
        token,
        httponly=True,
        samesite="strict",
        secure=_secure(request, settings),
        max_age=3600,
        path="/ui/login",
    )
    return response


@router.get("/login", name="ui_login_form", response_class=HTMLResponse)
def login_form(request: Request, settings: SettingsDep, next: Annotated[str, Query(max_length=500)] = ""):
    return _login_page(request, settings, next, None)


@router.post("/login", name="ui_login")
def login(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    api_key: Annotated[str, Form(max_length=200)] = "",
    next: Annotated[str, Form(max_length=500)] = "",
    csrf_token: Annotated[str, Form(max_length=100)] = "",
):
    _same_origin(request)
    expected = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not expected or not hmac.compare_digest(expected, csrf_token):
        return _login_page(request, settings, next, "The form expired; please log in again.", 403)
    opened = ui_sessions.open_session(session, settings, api_key.strip()) if api_key.strip() else None
    if opened is None:
        return _login_page(request, settings, next, "That API key is not valid (or has been revoked).", 401)
    # Only local paths: an attacker-supplied next=https://evil must not turn login into a redirector.
    target = next if next.startswith("/ui") and not next.startswith("//") else "/ui"
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        COOKIE,
        opened[0],
        httponly=True,
        samesite="strict",
        secure=_secure(request, settings),
        max_age=int(ui_sessions.LIFETIME.total_seconds()),
        path="/",
    )
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/ui/login")
    return response


@router.post("/logout", name="ui_logout")
def logout(
    request: Request, session: SessionDep, settings: SettingsDep, csrf_token: Annotated[str, Form(max_length=100)] = ""
):
    _same_origin(request)
    found = ui_sessions.find(session, settings, request.cookies.get(COOKIE))
    if found is not None:
        if not hmac.compare_digest(found[1].csrf_token, csrf_token):
            raise HTTPException(403, "missing or wrong CSRF token; log out from the page's button")
        ui_sessions.close(session, found[1])
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


# -- runs list and progress -------------------------------------------------------------------


def _progress(run: Run, stages: list[StageStatus]) -> tuple[float, str]:
    """Overall fraction done (the four stages weigh the same) and a short label."""
    if run.state == RunState.SUCCEEDED:
        return 1.0, "done"
    done: dict[str, float] = {}
    label = run.state.lower()
    for s in stages:
        if s.state == StageState.SUCCEEDED:
            done[s.stage] = 1.0
        elif s.state == StageState.RUNNING:
            done[s.stage] = stage_fraction(s.epoch, s.epochs, s.step, s.steps)
            label = f"{s.stage} {s.epoch or 0}/{s.epochs}" if s.epochs else s.stage
    if run.state in RunState.TERMINAL:
        label = run.state.lower()
    return run_fraction(done), label


def _k_label(run: Run) -> str:
    """ "10", or for "auto" / a range "10 (chosen in 2..20)", "auto: 2..20" before the choice."""
    if isinstance(run.config.get("num_clusters"), int):
        return str(run.num_clusters)
    lo, hi = run.recipe().num_clusters_range
    span = f"{lo}..{hi}"
    return f"{run.num_clusters} (chosen in {span})" if run.num_clusters is not None else f"auto: {span}"


def _run_view(run: Run, stages: list[StageStatus], dataset: Dataset | None) -> dict[str, Any]:
    progress, label = _progress(run, stages)
    return {
        "id": run.id,
        "state": run.state,
        "stage": run.stage,
        "num_clusters": _k_label(run),
        "preset": run.preset,
        "error": run.error,
        "created_at": run.created_at,
        "dataset_id": run.dataset_id,
        "dataset_name": dataset.name if dataset else run.dataset_id,
        "progress": progress,
        "progress_label": label,
        "terminal": run.state in RunState.TERMINAL,
    }


@router.get("", name="ui_runs", response_class=HTMLResponse)
def runs_page(request: Request, session: SessionDep, tenant: UiTenant):
    runs, _ = run_service.list_(session, tenant, state=None, dataset_id=None, limit=RUNS_SHOWN, offset=0)
    datasets = dataset_service.by_ids(session, tenant, {r.dataset_id for r in runs})
    views = [_run_view(r, run_service.stages(session, r), datasets.get(r.dataset_id)) for r in runs]
    return templates.TemplateResponse(request, "runs.html", {"tenant": tenant, "runs": views})


@router.get("/runs/{run_id}/progress", name="ui_run_progress")
def run_progress(run_id: str, session: SessionDep, tenant: UiTenant) -> dict[str, Any]:
    run = run_service.get(session, tenant, run_id)
    progress, label = _progress(run, run_service.stages(session, run))
    return {
        "id": run.id,
        "state": run.state,
        "stage": run.stage,
        "progress": progress,
        "label": label,
        "terminal": run.state in RunState.TERMINAL,
    }


# -- run page ---------------------------------------------------------------------------------


def _charts(history: dict[str, list[dict[str, Any]]]) -> list:
    charts = []
    for stage in [s for s in STAGES if s in history] + [s for s in history if s not in STAGES]:
        pts = [(h["epoch"], h.get("loss")) for h in history[stage] if "epoch" in h]
        if pts:
            charts.append(
                line_chart(
                    {stage: pts}, title=f"{stage} loss", x_label="epoch", css_class=f"chart chart-loss chart-{stage}"
                )
            )
    selflabel = history.get("selflabel", [])
    confident = [(h["epoch"], h["confident"]) for h in selflabel if "confident" in h]
    if confident:  # the paper's Fig. 4: confident samples grow, then plateau
        charts.append(
            line_chart(
                {"confident samples": confident},
                title="self-labeling: confident samples",
                x_label="epoch",
                css_class="chart chart-confident",
            )
        )
    return charts


METRIC_NAMES = ("acc", "nmi", "ari", "top5_acc", "many_to_one_acc", "neighbor_purity")


def _metrics(run: Run, session: Session) -> tuple[dict | None, dict | None]:
    """(metrics table, confusion matrix): the table has one column per stage that was evaluated."""
    data = results.stage_metrics(session, run)
    # The seeds' own table is _seeds's, the K sweep's _num_clusters_view's.
    stages = {k: _flatten(v) for k, v in data.items() if isinstance(v, dict) and k not in ("seeds", "num_clusters")}
    if not stages and any(isinstance(v, (int, float)) for v in data.values()):
        stages = {"final": data}  # a flat dict of one evaluation
    names = [n for n in METRIC_NAMES if any(n in v for v in stages.values())]
    names += sorted(
        {
            k
            for v in stages.values()
            for k, x in v.items()
            if isinstance(x, (int, float)) and not isinstance(x, bool) and k not in names
        }
    )
    table = None
    columns = [s for s in stages if any(n in stages[s] for n in names)]
    if names and columns:

        def fmt(x):
            if isinstance(x, float):
                return f"{x:.4f}"
            return "" if x is None else str(x)

        table = {
            "columns": columns,
            "rows": [{"name": n, "cells": [fmt(stages[c].get(n)) for c in columns]} for n in names],
        }
    final = stages.get(data.get("final")) if isinstance(data.get("final"), str) else None
    final = final or next((stages[s] for s in ("selflabel", "scan", "final") if s in stages), None)
    return table, final.get("confusion") if final else None


SEED_METRICS = ("acc", "nmi", "ari", "scan_loss", "confident")
STEP_NAMES = {"scan": "SCAN", "selflabel": "self-label"}


def _seeds(run: Run, session: Session) -> dict | None:
    """A run over several seeds: one row per seed (the kept one marked), then mean +- std."""
    data = results.stage_metrics(session, run).get("seeds")
    if not isinstance(data, dict) or not data.get("runs"):
        return None
    mean, std = data.get("mean") or {}, data.get("std") or {}
    columns = [
        (step, key) for step in ("scan", "selflabel") if step in mean for key in SEED_METRICS if key in mean[step]
    ]

    def fmt(x) -> str:
        if not isinstance(x, (int, float)):
            return ""
        return f"{x:.4g}"

    return {
        "n": data.get("n"),
        "criterion": data.get("criterion"),
        "columns": [f"{STEP_NAMES[step]} {key}" for step, key in columns],
        "rows": [
            {
                "name": f"seed {r['index'] + 1} ({r['seed']})",
                "kept": r["index"] == data.get("kept"),
                "cells": [fmt((r.get(step) or {}).get(key)) for step, key in columns],
            }
            for r in data["runs"]
        ],
        "summary": [f"{fmt(mean[step][key])} ± {fmt(std[step][key])}" for step, key in columns],
    }


def _num_clusters_view(run: Run, session: Session) -> dict[str, Any] | None:
    """The K sweep of an "auto" / range run: its criterion per K as a chart, and the K chosen."""
    sweep = results.stage_metrics(session, run).get("num_clusters")
    if not isinstance(sweep, dict) or not isinstance(sweep.get("curve"), list):
        return None
    pts = [(r["k"], r["criterion"]) for r in sweep["curve"] if isinstance(r, dict) and "k" in r]
    chosen = sweep.get("chosen")
    mark = [(k, c) for k, c in pts if k == chosen]
    return {
        "chosen": chosen,
        "range": sweep.get("range"),
        "criterion": sweep.get("criterion"),
        "curve": [r for r in sweep["curve"] if isinstance(r, dict)],
        "chart": line_chart(
            {"neighbour modularity": pts, f"chosen K = {chosen}": mark},
            title="criterion per number of clusters K",
            x_label="K",
            css_class="chart chart-num-clusters",
        ),
    }


def _shortcut_warnings(run: Run, session: Session) -> list[dict[str, str]]:
    """The plain-words warnings of ml.shortcuts (neighbours or clusters following brightness,
    colour, polarity...), per stage that raised one."""
    data = results.stage_metrics(session, run)
    return [
        {"stage": stage, "text": v["shortcuts"]["warning"]}
        for stage, v in data.items()
        if isinstance(v, dict) and isinstance(v.get("shortcuts"), dict) and v["shortcuts"].get("warning")
    ]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"kmeans": {"acc": 0.6}} -> {"kmeans.acc": 0.6}; lists (the confusion matrix) stay as they are."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _confusion(matrix, class_names: list[str] | None) -> dict | None:
    if not matrix:
        return None
    m = np.asarray(matrix, dtype=np.int64)
    names = list(class_names or [])
    rows_total = m.sum(axis=1, keepdims=True).clip(min=1)
    shade = m / rows_total

    def label(i: int) -> str:
        return names[i] if i < len(names) else str(i)

    return {
        "columns": [label(j) for j in range(m.shape[1])],
        "rows": [
            {
                "name": label(i),
                "cells": [{"value": int(m[i, j]), "shade": float(shade[i, j])} for j in range(m.shape[1])],
            }
            for i in range(m.shape[0])
        ],
    }


@router.get("/runs/{run_id}", name="ui_run", response_class=HTMLResponse)
def run_page(request: Request, run_id: str, session: SessionDep, tenant: UiTenant):
    run = run_service.get(session, tenant, run_id)
    dataset = dataset_service.get(session, tenant, run.dataset_id)
    stages = run_service.stages(session, run)
    table, confusion = _metrics(run, session)
    clusters = []
    finished = results.clusters(session, run) if run.state == RunState.SUCCEEDED else []
    for c in finished:
        clusters.append(
            {
                "index": c.index,
                "size": c.size,
                "mean_confidence": c.mean_confidence,
                "prototype": c.prototype,
                "matched_label": c.matched_label,
                "top_items": [int(i) for i in (c.top_items or [])[:TOP_ITEMS_SHOWN]],
            }
        )
    return templates.TemplateResponse(
        request,
        "run.html",
        {
            "tenant": tenant,
            "run": _run_view(run, stages, dataset),
            "stages": stages,
            "charts": _charts(run_service.history(session, run)),
            "metrics": table,
            "seeds": _seeds(run, session),
            "confusion": _confusion(confusion, dataset.class_names if dataset else None),
            "clusters": clusters,
            "shortcut_warnings": _shortcut_warnings(run, session),
            "num_clusters": _num_clusters_view(run, session),
            "estimate": run.estimate or {},
            "published": registry.published_versions(session, tenant, run.id),
        },
    )


@router.post("/runs/{run_id}/retry", name="ui_run_retry")
def retry_run(
    request: Request,
    run_id: str,
    session: SessionDep,
    tenant: UiTenant,
    settings: SettingsDep,
    csrf_token: Annotated[str, Form(max_length=100)] = "",
):
    # Same origin and the session's CSRF token, like every UI form; then the same service as
    # POST /v1/runs/{id}/retry (same owner and state checks), and back to the page.
    _same_origin(request)
    if not hmac.compare_digest(request.state.ui_session.csrf_token, csrf_token):
        raise HTTPException(403, "missing or wrong CSRF token; use the page's Retry button")
    run_service.retry(session, settings, tenant, run_id)
    return RedirectResponse(f"/ui/runs/{quote(run_id)}", status_code=303)


@router.get("/runs/{run_id}/clusters/{cluster}", name="ui_cluster", response_class=HTMLResponse)
def cluster_page(
    request: Request,
    run_id: str,
    cluster: ClusterIndex,
    session: SessionDep,
    tenant: UiTenant,
    order: str = Query("desc", pattern="^(asc|desc)$"),
    page: int = Query(1, ge=1, le=MAX_INT),
):
    run = run_service.get(session, tenant, run_id)
    row = results.cluster(session, run, cluster)
    pages = max(1, math.ceil(row.size / MEMBERS_PER_PAGE))
    page = min(page, pages)
    members, total = results.assignments(
        session,
        run,
        cluster=cluster,
        min_confidence=None,
        page=page,
        page_size=MEMBERS_PER_PAGE,
        order=f"confidence_{order}",
    )
    return templates.TemplateResponse(
        request,
        "cluster.html",
        {
            "tenant": tenant,
            "run": _run_view(run, [], dataset_service.get(session, tenant, run.dataset_id)),
            "cluster": row,
            "members": members,
            "total": total,
            "order": order,
            "page": page,
            "pages": pages,
        },
    )


@router.get("/runs/{run_id}/items/{item}/neighbors", name="ui_neighbors", response_class=HTMLResponse)
async def neighbors_page(request: Request, run_id: str, item: ItemIndex, session: SessionDep, tenant: UiTenant):
    run = run_service.get(session, tenant, run_id)
    served = await served_run(run_service.servable_run_dir(run))
    n_items = len(served.assignments["cluster"])
    if not 0 <= item < n_items:
        raise HTTPException(404, f"item {item} is out of range: the dataset has {n_items} items")
    k = min(NEIGHBORS_SHOWN + 1, n_items)
    scores, ids = await run_in_threadpool(served.search, np.asarray(served.features[item : item + 1]), k)
    cluster = served.assignments["cluster"]
    neighbors = [
        {"item": int(i), "score": float(s), "cluster": int(cluster[i])}
        for s, i in zip(scores[0], ids[0])
        if i >= 0 and i != item
    ]
    labels = served.cluster_labels
    c = int(cluster[item])
    return templates.TemplateResponse(
        request,
        "neighbors.html",
        {
            "tenant": tenant,
            "run": _run_view(run, [], None),
            "item": item,
            "cluster": c,
            "label": labels[c] if labels else None,
            "confidence": float(served.assignments["confidence"][item]),
            "neighbors": neighbors,
        },
    )


# -- images ---------------------------------------------------------------------------------


@router.get("/datasets/{dataset_id}/items/{item}.png", name="ui_item_png")
def item_image(dataset_id: str, item: ItemIndex, session: SessionDep, tenant: UiTenant, settings: SettingsDep):
    """The API's `/v1/datasets/{id}/items/{i}.png`, authenticated by the cookie so `<img>` works."""
    dataset = dataset_service.get(session, tenant, dataset_id)
    return Response(
        dataset_service.item_png(settings, dataset, item),
        media_type="image/png",
        headers={"Cache-Control": "private, max-age=86400"},
    )


# -- assignment jobs --------------------------------------------------------------------------


@router.get("/assignment-jobs/{job_id}", name="ui_assignment_job", response_class=HTMLResponse)
def assignment_job_page(request: Request, job_id: str, session: SessionDep, tenant: UiTenant):
    """Progress, the drift report and the most novel images of an assignment job (same service and
    owner check as GET /v1/assignment-jobs/{id})."""
    from app.services import assignment_jobs
    from app.tables import JobState

    job = assignment_jobs.get(session, tenant, job_id)
    dataset = dataset_service.get(session, tenant, job.dataset_id)
    drift = assignment_jobs.drift(session, job) if job.state == JobState.SUCCEEDED and job.drift else None
    return templates.TemplateResponse(
        request,
        "assignment_job.html",
        {
            "tenant": tenant,
            "job": job,
            "dataset_name": dataset.name,
            "fraction": (job.processed / job.total) if job.total else 1.0,
            "drift": drift,
        },
    )
