"""Bring-your-own backbone weights: a tenant's resource, never a server path.

Over HTTP, ``pretext.backbone_weights`` names one of the tenant's own finished runs (``"run:<id>"``:
its pretext backbone). A file path is refused with 422: a free path let one tenant train on another
tenant's weights and probe the server's files through the run's error. The CLI, which runs on the
user's own machine, keeps taking local paths (ml.config knows nothing of tenants).

The reference is checked when the run is created (owner, stage finished) and resolved to the file
only inside the worker, so the stored config and everything a tenant reads shows the reference.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from app.core.errors import Invalid
from app.tables import Run, StageState, StageStatus, Tenant

if TYPE_CHECKING:
    from ml.config import RunConfig

RUN_REF = re.compile(r"^run:([0-9a-f]{32})$")
FIELD = "pretext.backbone_weights"


def _source_run(session: Session, tenant_id: str, reference: Any) -> Run:
    match = RUN_REF.match(reference) if isinstance(reference, str) else None
    if match is None:
        raise Invalid(
            f'{FIELD}: give "run:<run id>" naming one of your finished runs; file paths and '
            "other values are not accepted over the API"
        )
    run = session.get(Run, match.group(1))
    # Another tenant's run reads exactly like one that does not exist: no oracle on foreign ids.
    if run is None or run.tenant_id != tenant_id:
        raise Invalid(f"{FIELD}: run {match.group(1)} not found among your runs")
    pretext = session.get(StageStatus, (run.id, "pretext"))
    if pretext is None or pretext.state != StageState.SUCCEEDED or not run.run_dir:
        raise Invalid(f"{FIELD}: run {run.id} has no finished pretext stage to take weights from")
    return run


def check_reference(session: Session, tenant: Tenant, config: dict[str, Any]) -> None:
    """422 unless the config's backbone weights (if any) are a reference the tenant owns."""
    reference = (config.get("pretext") or {}).get("backbone_weights")
    if reference is not None:
        _source_run(session, tenant.id, reference)


def resolve(session: Session, run: Run, cfg: RunConfig, local_dir: Callable[[Run], str] | None = None) -> RunConfig:
    """The run's recipe with its weights reference replaced by the file the worker loads (checked
    again: the source run may have been deleted, or the row edited, since the run was queued).
    ``local_dir(source_run)`` gives the source run's folder on this machine (pulled from the
    artifact store if there is one); default: its shared folder."""
    reference = cfg.pretext.backbone_weights
    if reference is None:
        return cfg
    from ml.rundir import RunDir

    source = _source_run(session, run.tenant_id, reference)
    path = RunDir(Path(local_dir(source) if local_dir else source.run_dir)).pretext_path
    if not path.is_file():
        raise Invalid(f"{FIELD}: run {source.id} no longer has its pretext weights")
    return cfg.model_copy(update={"pretext": cfg.pretext.model_copy(update={"backbone_weights": str(path)})})
