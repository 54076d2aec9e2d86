"""Bring-your-own backbone weights: a tenant's resource, never a server path.

Over HTTP, ``pretext.backbone_weights`` names either weights the tenant uploaded
(``"weights:<id>"``, POST /v1/weights: validated as a plain state dict that fits the chosen arch and
stored under ``weights/<id>/`` through the artifact store) or one of the tenant's own finished runs
(``"run:<id>"``: its pretext backbone). A file path is refused with 422: a free path let one tenant
train on another tenant's weights and probe the server's files through the run's error. The CLI,
which runs on the user's own machine, keeps taking local paths (ml.config knows nothing of tenants).

The reference is checked when the run is created (owner, stage finished) and resolved to the file
only inside the worker, so the stored config and everything a tenant reads shows the reference.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.artifacts import synced
from app.core.db import new_session
from app.core.errors import Conflict, Invalid, NotFound
from app.core.settings import Settings
from app.core.text import check_printable
from app.tables import Run, RunState, StageState, StageStatus, Tenant, Weights, owned

log = logging.getLogger("scan.weights")

if TYPE_CHECKING:
    from ml.config import RunConfig

RUN_REF = re.compile(r"^run:([0-9a-f]{32})$")
WEIGHTS_REF = re.compile(r"^weights:([0-9a-f]{32})$")
FIELD = "pretext.backbone_weights"
FILE = "backbone.pt"
# Any architecture of ml.networks.ARCHS (kept here so the API does not import torch to list them).
ARCHS = ("resnet18_cifar", "resnet18_stl", "resnet18", "resnet50", "convnet")


def _bad_reference() -> Invalid:
    return Invalid(
        f'{FIELD}: give "weights:<id>" (weights you uploaded with POST /v1/weights) or "run:<run id>" '
        "(one of your finished runs); file paths and other values are not accepted over the API"
    )


def _own_weights(session: Session, tenant_id: str, weights_id: str) -> Weights:
    row = session.get(Weights, weights_id)
    # Another tenant's weights read exactly like missing ones: no oracle on foreign ids.
    if row is None or row.tenant_id != tenant_id:
        raise Invalid(f"{FIELD}: weights {weights_id} not found among your weights (GET /v1/weights)")
    return row


def _check_fits(row: Weights, config: dict[str, Any]) -> None:
    arch, width = config.get("arch"), config.get("width")
    if row.arch != arch or (arch == "convnet" and row.width != width):
        shown = f"{row.arch} (width {row.width})" if row.arch == "convnet" else row.arch
        wanted = f"{arch} (width {width})" if arch == "convnet" else arch
        raise Invalid(f"{FIELD}: weights {row.id} are for {shown}, but this run's arch is {wanted}")


def _source_run(session: Session, tenant_id: str, reference: Any) -> Run:
    match = RUN_REF.match(reference) if isinstance(reference, str) else None
    if match is None:
        raise _bad_reference()
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
    if reference is None:
        return
    match = WEIGHTS_REF.match(reference) if isinstance(reference, str) else None
    if match is not None:
        _check_fits(_own_weights(session, tenant.id, match.group(1)), config)
    else:
        _source_run(session, tenant.id, reference)


def resolve(
    session: Session,
    run: Run,
    cfg: RunConfig,
    local_dir: Callable[[Run], str] | None = None,
    settings: Settings | None = None,
) -> RunConfig:
    """The run's recipe with its weights reference replaced by the file the worker loads (checked
    again: the source run or the weights may have been deleted, or the row edited, since the run
    was queued). ``local_dir(source_run)`` gives the source run's folder on this machine (pulled
    from the artifact store if there is one); default: its shared folder. Uploaded weights are
    pulled into ``settings``' weights folder."""
    reference = cfg.pretext.backbone_weights
    if reference is None:
        return cfg
    match = WEIGHTS_REF.match(reference) if isinstance(reference, str) else None
    if match is not None:
        row = _own_weights(session, run.tenant_id, match.group(1))
        _check_fits(row, {"arch": cfg.arch, "width": cfg.width})
        settings = settings or _settings()
        synced(settings).pull(f"weights/{row.id}")
        path = settings.weights_dir / row.id / FILE
        if not path.is_file():
            raise Invalid(f"{FIELD}: weights {row.id} are no longer stored")
    else:
        from ml.rundir import RunDir

        source = _source_run(session, run.tenant_id, reference)
        path = RunDir(Path(local_dir(source) if local_dir else source.run_dir)).pretext_path
        if not path.is_file():
            raise Invalid(f"{FIELD}: run {source.id} no longer has its pretext weights")
    return cfg.model_copy(update={"pretext": cfg.pretext.model_copy(update={"backbone_weights": str(path)})})


def _settings() -> Settings:
    from app.core.settings import get_settings

    return get_settings()


# --- uploaded weights: create (validate + store), list, get, delete -------------------------------


def create(
    settings: Settings,
    tenant: Tenant,
    weights_id: str,
    *,
    name: str,
    arch: str,
    width: int,
    upload_path: Path,
) -> Weights:
    """Validate the uploaded file (``uploads/<id>/``) and store its backbone tensors, then the row.

    Whatever happens, the upload folder is removed; on any refusal nothing stays (no file, no row).
    Runs in a thread: torch is imported lazily so the API imports it only when weights arrive."""
    target = settings.weights_dir / weights_id
    try:
        check_printable(name, "the weights' name", Invalid)
        if arch not in ARCHS:
            raise Invalid(f"arch: {arch!r} is not one of {', '.join(ARCHS)}")
        import torch

        from ml.networks import read_backbone_file

        try:
            tensors = read_backbone_file(upload_path, arch, width, name=upload_path.name)
        except ValueError as exc:
            raise Invalid(str(exc)) from exc
        target.mkdir(parents=True, exist_ok=True)
        tmp = target / f".{FILE}.tmp"
        torch.save(tensors, tmp)  # the backbone's tensors only: nothing else of the upload is kept
        os.replace(tmp, target / FILE)
        size = (target / FILE).stat().st_size
        synced(settings).push(f"weights/{weights_id}")
        with new_session() as session:
            row = Weights(
                id=weights_id,
                tenant_id=tenant.id,
                name=name[:200],
                arch=arch,
                width=width,
                tensors=len(tensors),
                size_bytes=size,
            )
            session.add(row)
            session.commit()
            session.refresh(row)
            session.expunge(row)
        return row
    except BaseException:
        _remove_files(settings, weights_id)
        raise
    finally:
        shutil.rmtree(upload_path.parent, ignore_errors=True)


def discard_upload(upload_path: Path | None) -> None:
    """Remove an upload refused before validation (its folder is ``uploads/<id>/``)."""
    if upload_path is not None:
        shutil.rmtree(upload_path.parent, ignore_errors=True)


def _remove_files(settings: Settings, weights_id: str) -> None:
    shutil.rmtree(settings.weights_dir / weights_id, ignore_errors=True)
    synced(settings).delete(f"weights/{weights_id}")


def get(session: Session, tenant: Tenant, weights_id: str) -> Weights:
    row = owned(session, Weights, weights_id, tenant.id)
    if row is None:
        raise NotFound(f"weights {weights_id} not found (list yours with GET /v1/weights)")
    return row


def list_(session: Session, tenant: Tenant, *, limit: int, offset: int) -> tuple[list[Weights], int]:
    query = select(Weights).where(Weights.tenant_id == tenant.id)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(Weights.created_at.desc(), Weights.id).limit(limit).offset(offset)).all()
    return list(rows), total


def delete(session: Session, settings: Settings, tenant: Tenant, weights_id: str) -> None:
    """Delete the row and the file; 409 while a run that starts from them has not passed pretext."""
    row = get(session, tenant, weights_id)
    reference = f"weights:{row.id}"
    active = session.scalars(select(Run).where(Run.tenant_id == tenant.id, Run.state.in_(RunState.ACTIVE))).all()
    users = [r.id for r in active if ((r.config or {}).get("pretext") or {}).get("backbone_weights") == reference]
    if users:
        raise Conflict(
            f"weights {row.id} are used by {len(users)} run(s) in progress ({', '.join(users[:3])}); "
            "cancel them first (POST /v1/runs/{id}/cancel)"
        )
    session.delete(row)
    session.commit()
    _remove_files(settings, row.id)
