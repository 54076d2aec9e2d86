"""Looking up a tenant's finished run for serving (shared by /predict, /neighbors, /model and /ui)."""
from __future__ import annotations

from pathlib import Path

from fastapi import HTTPException
from sqlalchemy.orm import Session

from app.models import Run, RunState
from app.serving.model_cache import ServedRun, model_cache


def tenant_run(session: Session, tenant_id: str, run_id: str) -> Run:
    """The run if it belongs to the tenant; another tenant's run is indistinguishable from none."""
    run = session.get(Run, run_id)
    if run is None or run.tenant_id != tenant_id:
        raise HTTPException(404, f"run {run_id} not found")
    return run


def succeeded_run_dir(run: Run) -> Path:
    if run.state != RunState.SUCCEEDED:
        raise HTTPException(409, f"run {run.id} is {run.state}; serving needs a run in state SUCCEEDED")
    if not run.run_dir or not Path(run.run_dir).is_dir():
        raise HTTPException(409, f"run {run.id} has no model files on this server")
    return Path(run.run_dir)


def load_served(run_dir: Path) -> ServedRun:
    """Blocking (reads model and arrays on first use): call from a worker thread."""
    return model_cache().get(run_dir)


async def served_run(run_dir: Path) -> ServedRun:
    """The loaded run: straight from the cache when it is there, else loaded in a worker thread
    (a thread hop costs more than the lookup itself on a busy machine)."""
    from starlette.concurrency import run_in_threadpool
    return model_cache().peek(run_dir) or await run_in_threadpool(load_served, run_dir)
