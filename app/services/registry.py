"""The model registry: named models, their versions (published runs), aliases, and the names and
merges of a version's clusters. `resolve` turns what an app sends (``name``, ``name@alias``,
``name/versions/N``) into the run to serve, at request time:

    served = registry.resolve(session, tenant, "digits@production")
    served.run, served.version, served.clusters.names   # the run, its number, the cluster names

A bare ``name`` means its ``production`` alias, or its latest version while it has no such alias.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.errors import Conflict, Invalid, NotFound
from app.core.names import MAX_CLUSTER_NAME, MAX_DESCRIPTION, MAX_NAME, NAME_PATTERN
from app.core.text import is_printable
from app.services import runs as run_service
from app.tables import Cluster, ModelAlias, ModelVersion, RegisteredModel, Run, RunState, Tenant, VersionCluster, utcnow

DEFAULT_ALIAS = "production"
MAX_VERSION = 2**31 - 1  # fits an INTEGER column everywhere
_NAME = re.compile(NAME_PATTERN)
_REFERENCE = re.compile(r"^(?P<name>[^@/]+)(?:@(?P<alias>[^@/]+)|/versions/(?P<version>[0-9]{1,10}))?$")


def check_name(value: str, what: str = "name") -> str:
    if not _NAME.match(value):
        raise Invalid(
            f"{what}: {value[:80]!r} must be 1-{MAX_NAME} letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def check_text(value: str | None, what: str, limit: int, *, multiline: bool = False) -> str | None:
    """Printable text of bounded length (None clears it). PostgreSQL refuses NUL; control
    characters have no place in a label an app shows to people."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if len(value) > limit:
        raise Invalid(f"{what}: {len(value)} characters; at most {limit}")
    if not is_printable(value, multiline=multiline):  # the one rule for stored text (app/core/text.py)
        raise Invalid(f"{what}: only printable characters" + (" (and new lines)" if multiline else ""))
    return value


# -- cluster names and merges --------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterMap:
    """How a version serves its run's K clusters: ``target[i]`` is the cluster that cluster i is
    served as (itself, or the one it was merged into), ``names[i]`` / ``descriptions[i]`` the
    name and description of that served cluster (those of the target)."""

    target: tuple[int, ...]
    names: tuple[str | None, ...]
    descriptions: tuple[str | None, ...]

    @property
    def served(self) -> list[int]:
        """The clusters an answer can name, ascending (each merge group by its target)."""
        return sorted(set(self.target))

    @property
    def merged(self) -> bool:
        return any(t != i for i, t in enumerate(self.target))

    def apply(self, clusters: np.ndarray) -> np.ndarray:
        """Run cluster numbers -> served cluster numbers (assignments of a merged version)."""
        return np.asarray(self.target, dtype=np.int64)[np.asarray(clusters, dtype=np.int64)]

    def merge_probs(self, probs: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """(N, K) probabilities -> (N, G) over the served clusters (a merged group's probability
        is the sum of its members'), and the served cluster number of each of the G columns."""
        served = self.served
        if not self.merged:
            return probs, served
        column = {c: j for j, c in enumerate(served)}
        onehot = np.zeros((len(self.target), len(served)), dtype=probs.dtype)
        onehot[np.arange(len(self.target)), [column[t] for t in self.target]] = 1
        return probs @ onehot, served

    def name_of(self, cluster: int) -> str | None:
        return self.names[cluster] if 0 <= cluster < len(self.names) else None

    def as_json(self) -> list[dict[str, Any]]:
        """Per run cluster: what an export's clusters.json and the API list."""
        return [
            {"cluster": i, "served_as": t, "name": self.names[i], "description": self.descriptions[i]}
            for i, t in enumerate(self.target)
        ]


def cluster_map(rows: list[VersionCluster]) -> ClusterMap:
    by_index = {r.index: r for r in rows}
    k = max(by_index, default=-1) + 1
    target = tuple(
        by_index[i].merged_into if i in by_index and by_index[i].merged_into is not None else i for i in range(k)
    )
    own = {i: (r.name, r.description) for i, r in by_index.items()}
    return ClusterMap(
        target=target,
        names=tuple(own.get(t, (None, None))[0] for t in target),
        descriptions=tuple(own.get(t, (None, None))[1] for t in target),
    )


# -- what resolve hands back ----------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedModel:
    """The answer of `resolve`: which run serves a reference now, and how its clusters are named."""

    model: str
    version: int
    version_id: str
    alias: str | None
    run: Run
    clusters: ClusterMap
    # Resolved through an alias: where it pointed before and when it moved (a process that has
    # only the previous version loaded may serve it while it loads this one).
    previous_version_id: str | None = None
    moved_at: datetime | None = None

    @property
    def run_id(self) -> str:
        return self.run.id

    def describe(self) -> dict[str, Any]:
        """The fields every answer served through a model starts with."""
        return {"model": self.model, "version": self.version, "alias": self.alias, "run_id": self.run.id}


def parse_reference(reference: str) -> tuple[str, str | None, int | None]:
    m = _REFERENCE.match(reference or "")
    if not m:
        raise Invalid(f"model reference {reference[:80]!r}: use name, name@alias or name/versions/N")
    name, alias, version = m["name"], m["alias"], m["version"]
    check_name(name, "model name")
    if alias is not None:
        check_name(alias, "alias")
    if version is not None and not 1 <= int(version) <= MAX_VERSION:
        raise Invalid(f"model reference {reference[:80]!r}: versions are numbered 1..{MAX_VERSION}")
    return name, alias, int(version) if version is not None else None


def resolve(session: Session, tenant: Tenant, reference: str) -> ResolvedModel:
    """``name``, ``name@alias`` or ``name/versions/N`` of this tenant -> the version to serve now."""
    name, alias, number = parse_reference(reference)
    model = get(session, tenant, name)
    row = None
    if number is not None:
        version = get_version(session, model, number)
    elif alias is not None:
        row = session.get(ModelAlias, (model.id, alias))
        if row is None:
            raise NotFound(f"model {name!r} has no alias {alias!r} ({_alias_hint(session, model)})")
        version = session.get(ModelVersion, row.version_id)
    else:
        row = session.get(ModelAlias, (model.id, DEFAULT_ALIAS))
        if row is not None:
            version, alias = session.get(ModelVersion, row.version_id), DEFAULT_ALIAS
        else:
            version = session.scalar(
                select(ModelVersion).where(ModelVersion.model_id == model.id).order_by(ModelVersion.version.desc())
            )
            if version is None:
                raise Conflict(
                    f"model {name!r} has no versions yet; publish a SUCCEEDED run with POST /v1/models/{name}/versions"
                )
    resolved = _resolved(session, model, version, alias)
    if row is not None:
        resolved = replace(resolved, previous_version_id=row.previous_version_id, moved_at=row.updated_at)
    return resolved


def previous(session: Session, resolved: ResolvedModel) -> ResolvedModel | None:
    """The version an alias pointed at before its last move (None: none, or deleted since)."""
    if resolved.previous_version_id is None:
        return None
    version = session.get(ModelVersion, resolved.previous_version_id)
    if version is None:
        return None
    return _resolved(session, session.get(RegisteredModel, version.model_id), version, resolved.alias)


def _resolved(session: Session, model: RegisteredModel, version: ModelVersion, alias: str | None) -> ResolvedModel:
    run = session.get(Run, version.run_id)
    return ResolvedModel(
        model=model.name,
        version=version.version,
        version_id=version.id,
        alias=alias,
        run=run,
        clusters=cluster_map(version_clusters(session, version)),
    )


def _alias_hint(session: Session, model: RegisteredModel) -> str:
    names = session.scalars(select(ModelAlias.alias).where(ModelAlias.model_id == model.id).order_by(ModelAlias.alias))
    names = list(names)
    return f"its aliases: {', '.join(names)}" if names else "it has no aliases yet"


# -- models ----------------------------------------------------------------------------------------


def create(session: Session, tenant: Tenant, name: str, description: str | None) -> RegisteredModel:
    check_name(name, "name")
    model = RegisteredModel(
        tenant_id=tenant.id,
        name=name,
        description=check_text(description, "description", MAX_DESCRIPTION, multiline=True),
    )
    session.add(model)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise Conflict(f"you already have a model named {name!r}") from None
    return model


def get(session: Session, tenant: Tenant, name: str) -> RegisteredModel:
    model = session.scalar(
        select(RegisteredModel).where(RegisteredModel.tenant_id == tenant.id, RegisteredModel.name == name)
    )
    if model is None:
        raise NotFound(f"model {name[:80]!r} not found (list yours with GET /v1/models)")
    return model


def list_(session: Session, tenant: Tenant, *, limit: int, offset: int) -> tuple[list[RegisteredModel], int]:
    query = select(RegisteredModel).where(RegisteredModel.tenant_id == tenant.id)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(RegisteredModel.name).limit(limit).offset(offset))
    return list(rows), total


def update_model(session: Session, tenant: Tenant, name: str, description: str | None) -> RegisteredModel:
    model = get(session, tenant, name)
    model.description = check_text(description, "description", MAX_DESCRIPTION, multiline=True)
    session.commit()
    return model


def delete_model(session: Session, tenant: Tenant, name: str) -> None:
    """The model, its versions, aliases and cluster names; the runs stay."""
    model = get(session, tenant, name)
    session.execute(delete(ModelAlias).where(ModelAlias.model_id == model.id))
    session.delete(model)
    session.commit()


def aliases(session: Session, model: RegisteredModel) -> dict[str, int]:
    """alias -> version number."""
    rows = session.execute(
        select(ModelAlias.alias, ModelVersion.version)
        .join(ModelVersion, ModelVersion.id == ModelAlias.version_id)
        .where(ModelAlias.model_id == model.id)
        .order_by(ModelAlias.alias)
    )
    return {a: v for a, v in rows}


def latest_version(session: Session, model: RegisteredModel) -> int | None:
    return session.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.model_id == model.id))


# -- versions --------------------------------------------------------------------------------------


def publish(session: Session, tenant: Tenant, name: str, run_id: str) -> tuple[ModelVersion, bool]:
    """Publish a SUCCEEDED run of the tenant as the model's next version: (version, created).
    Publishing the same run again answers the version it already is (a retried request makes no
    second version)."""
    model = get(session, tenant, name)
    run = run_service.get(session, tenant, run_id)
    if run.state != RunState.SUCCEEDED:
        raise Conflict(f"run {run.id} is {run.state}; only a SUCCEEDED run can be published as a model version")
    for _attempt in range(5):
        existing = session.scalar(
            select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.run_id == run.id)
        )
        if existing is not None:
            return existing, False
        number = (latest_version(session, model) or 0) + 1
        version = ModelVersion(model_id=model.id, version=number, run_id=run.id)
        session.add(version)
        try:
            session.flush()
        except IntegrityError:  # a concurrent publish took this number: take the next one
            session.rollback()
            continue
        indices = list(session.scalars(select(Cluster.index).where(Cluster.run_id == run.id))) or list(
            range(run.num_clusters)
        )
        session.add_all([VersionCluster(version_id=version.id, index=i) for i in indices])
        session.commit()
        return version, True
    raise Conflict(f"model {name!r} is being published to concurrently; retry the request")


def version_run(session: Session, version: ModelVersion) -> Run:
    return session.get(Run, version.run_id)


def get_version(session: Session, model: RegisteredModel, number: int) -> ModelVersion:
    version = session.scalar(
        select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.version == number)
    )
    if version is None:
        latest = latest_version(session, model)
        hint = f"its versions are 1..{latest}" if latest else "it has no versions yet"
        raise NotFound(f"model {model.name!r} has no version {number} ({hint})")
    return version


def list_versions(
    session: Session, model: RegisteredModel, *, limit: int, offset: int
) -> tuple[list[ModelVersion], int]:
    query = select(ModelVersion).where(ModelVersion.model_id == model.id)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(ModelVersion.version.desc()).limit(limit).offset(offset))
    return list(rows), total


def version_aliases(session: Session, model: RegisteredModel) -> dict[str, list[str]]:
    """version id -> the aliases pointing at it."""
    out: dict[str, list[str]] = {}
    for alias, version_id in session.execute(
        select(ModelAlias.alias, ModelAlias.version_id)
        .where(ModelAlias.model_id == model.id)
        .order_by(ModelAlias.alias)
    ):
        out.setdefault(version_id, []).append(alias)
    return out


def published_versions(session: Session, tenant: Tenant, run_id: str) -> list[tuple[str, int]]:
    """(model name, version) of every version that publishes this run (the run page links them)."""
    rows = session.execute(
        select(RegisteredModel.name, ModelVersion.version)
        .join(ModelVersion, ModelVersion.model_id == RegisteredModel.id)
        .where(RegisteredModel.tenant_id == tenant.id, ModelVersion.run_id == run_id)
        .order_by(RegisteredModel.name, ModelVersion.version)
    )
    return [(n, v) for n, v in rows]


# -- aliases ---------------------------------------------------------------------------------------


def alias_target(session: Session, tenant: Tenant, name: str, alias: str, number: int) -> ResolvedModel:
    """What `move_alias` will point at: checked, so the caller can warm its model first."""
    check_name(alias, "alias")
    model = get(session, tenant, name)
    return _resolved(session, model, get_version(session, model, number), alias)


def move_alias(session: Session, tenant: Tenant, name: str, alias: str, number: int) -> tuple[int | None, int]:
    """Point ``name@alias`` at version ``number`` in one statement: every request resolves either
    the old or the new version, never neither. Returns (previous version number, new number)."""
    check_name(alias, "alias")
    model = get(session, tenant, name)
    version = get_version(session, model, number)
    row = session.get(ModelAlias, (model.id, alias), with_for_update=True)
    if row is None:
        session.add(ModelAlias(model_id=model.id, alias=alias, version_id=version.id, updated_at=utcnow()))
        try:
            session.commit()
        except IntegrityError:  # created concurrently: move that one instead
            session.rollback()
            return move_alias(session, tenant, name, alias, number)
        return None, number
    previous_id = row.version_id
    if previous_id != version.id:
        session.execute(
            update(ModelAlias)
            .where(ModelAlias.model_id == model.id, ModelAlias.alias == alias)
            .values(version_id=version.id, previous_version_id=previous_id, updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
    session.commit()
    previous = session.get(ModelVersion, previous_id)
    return (previous.version if previous else None), number


def rollback_target(session: Session, tenant: Tenant, name: str, alias: str) -> int:
    """The version number a rollback of ``name@alias`` moves back to."""
    model = get(session, tenant, name)
    row = session.get(ModelAlias, (model.id, alias))
    if row is None:
        raise NotFound(f"model {name!r} has no alias {alias!r} ({_alias_hint(session, model)})")
    previous = session.get(ModelVersion, row.previous_version_id) if row.previous_version_id else None
    if previous is None:
        raise Conflict(
            f"{name}@{alias} has never pointed elsewhere (or that version was deleted); "
            f"move it with PUT /v1/models/{name}/aliases/{alias}"
        )
    return previous.version


def delete_alias(session: Session, tenant: Tenant, name: str, alias: str) -> None:
    model = get(session, tenant, name)
    if session.get(ModelAlias, (model.id, alias)) is None:
        raise NotFound(f"model {name!r} has no alias {alias!r} ({_alias_hint(session, model)})")
    session.execute(delete(ModelAlias).where(ModelAlias.model_id == model.id, ModelAlias.alias == alias))
    session.commit()


# -- cluster names and merges -------------------------------------------------------------------


def version_clusters(session: Session, version: ModelVersion) -> list[VersionCluster]:
    return list(
        session.scalars(
            select(VersionCluster).where(VersionCluster.version_id == version.id).order_by(VersionCluster.index)
        )
    )


def _version_rows(session: Session, tenant: Tenant, name: str, number: int) -> tuple[ModelVersion, dict]:
    version = get_version(session, get(session, tenant, name), number)
    rows = {r.index: r for r in version_clusters(session, version)}
    return version, rows


def _check_index(rows: dict, index: int, name: str, number: int) -> None:
    if index not in rows:
        raise NotFound(f"{name}/versions/{number} has no cluster {index} (clusters 0..{len(rows) - 1})")


def _check_unique_name(rows: dict, target: int, new_name: str | None) -> None:
    """A name belongs to one served cluster: two groups with the same name should be merged."""
    if new_name is None:
        return
    for i, r in rows.items():
        if (r.merged_into is None) and i != target and r.name is not None and r.name.casefold() == new_name.casefold():
            raise Conflict(f"cluster {i} is already named {r.name!r}; merge the two clusters instead of naming both")


def name_cluster(
    session: Session, tenant: Tenant, name: str, number: int, index: int, changes: dict[str, str | None]
) -> VersionCluster:
    """Set a served cluster's name and/or description (keys absent from ``changes`` stay). A
    cluster merged into another is named through that one."""
    _version, rows = _version_rows(session, tenant, name, number)
    _check_index(rows, index, name, number)
    row = rows[index]
    if row.merged_into is not None:
        raise Conflict(
            f"cluster {index} is merged into cluster {row.merged_into}; name that one (or unmerge {index} first)"
        )
    if "name" in changes:
        new = check_text(changes["name"], "name", MAX_CLUSTER_NAME)
        _check_unique_name(rows, index, new)
        row.name = new
    if "description" in changes:
        row.description = check_text(changes["description"], "description", MAX_DESCRIPTION, multiline=True)
    session.commit()
    return row


def merge_clusters(
    session: Session, tenant: Tenant, name: str, number: int, clusters: list[int], new_name: str | None
) -> int:
    """Serve the listed clusters (and whatever is already merged with them) as one: the lowest
    cluster number of the group. Returns that number. No retraining: a mapping of the version."""
    _version, rows = _version_rows(session, tenant, name, number)
    for c in clusters:
        _check_index(rows, c, name, number)
    targets = {rows[c].merged_into if rows[c].merged_into is not None else c for c in clusters}
    if len(targets) < 2:
        raise Invalid("clusters: name at least two clusters that are not already served as one")
    into = min(targets)
    members = [i for i, r in rows.items() if i in targets or r.merged_into in targets]
    if new_name is not None:
        new = check_text(new_name, "name", MAX_CLUSTER_NAME)
        _check_unique_name({i: r for i, r in rows.items() if i not in targets}, into, new)
    else:  # keep the name of the group: the target's, else the first one a member had
        new = rows[into].name or next((rows[t].name for t in sorted(targets) if rows[t].name), None)
    for i in members:
        rows[i].merged_into = None if i == into else into
    rows[into].name = new
    if rows[into].description is None:
        rows[into].description = next((rows[t].description for t in sorted(targets) if rows[t].description), None)
    session.commit()
    return into


def unmerge_cluster(session: Session, tenant: Tenant, name: str, number: int, index: int) -> list[int]:
    """Serve a merged cluster on its own again; unmerging a group's target dissolves the group.
    Returns the clusters that are on their own again."""
    _version, rows = _version_rows(session, tenant, name, number)
    _check_index(rows, index, name, number)
    row = rows[index]
    if row.merged_into is not None:
        freed = [index]
    else:
        freed = [i for i, r in rows.items() if r.merged_into == index]
        if not freed:
            raise Conflict(f"cluster {index} is not merged with any other cluster")
    for i in freed:
        rows[i].merged_into = None
    for i in freed:  # a name the group took over stays with the group, not with both
        try:
            _check_unique_name(rows, i, rows[i].name)
        except Conflict:
            rows[i].name = None
    session.commit()
    return freed


def cluster_table(session: Session, resolved: ResolvedModel) -> list[dict[str, Any]]:
    """The served clusters of a version: number, name, description, the run clusters it gathers,
    its size and confidence (over the training set), and the matched label of evaluation if any."""
    stats = {c.index: c for c in session.scalars(select(Cluster).where(Cluster.run_id == resolved.run.id))}
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(resolved.clusters.target):
        groups.setdefault(t, []).append(i)
    out = []
    for t in sorted(groups):
        members = groups[t]
        sizes = [stats[m].size if m in stats else 0 for m in members]
        size = sum(sizes)
        conf = [
            (stats[m].mean_confidence or 0.0) * s
            for m, s in zip(members, sizes)
            if m in stats and stats[m].mean_confidence is not None
        ]
        head = stats.get(t)
        out.append(
            {
                "cluster": t,
                "name": resolved.clusters.names[t],
                "description": resolved.clusters.descriptions[t],
                "members": members,
                "size": size,
                "mean_confidence": (sum(conf) / size) if conf and size else None,
                "prototype": head.prototype if head else None,
                "matched_label": head.matched_label if head else None,
            }
        )
    return out
