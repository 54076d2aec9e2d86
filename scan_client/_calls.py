"""Every call of the API, described once: each function takes a method's arguments and returns the
`Call` (or `Poll`) that `Client` and `AsyncClient` run, so the two clients cannot drift apart. The
paths and bodies are those of app/routes/; the answers are the API's own schemas (app/schemas/).

A model reference is what an app sends instead of a run id: ``name`` (its production alias, else its
latest version), ``name@alias`` or ``name/versions/N``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Literal, TypeVar
from urllib.parse import quote, urlencode

import httpx
from pydantic import BaseModel, TypeAdapter

from app.schemas.assignment_jobs import AssignmentJobOut, DriftReport, JobAssignmentPage
from app.schemas.common import Page
from app.schemas.datasets import DatasetOut
from app.schemas.keys import KeyOwner
from app.schemas.predict import ModelPredictAnswer, NeighborsAnswer, PredictAnswer
from app.schemas.registry import (
    AliasOut,
    ModelOut,
    NamedAssignmentPage,
    NamedClusterOut,
    VersionClustersOut,
    VersionOut,
    VersionPage,
)
from app.schemas.results import ClusterOut, MetricsOut
from app.schemas.runs import EventPage, RunOut
from app.schemas.webhooks import WebhookCreated, WebhookDeliveryPage, WebhookOut
from app.schemas.weights import WeightsOut
from scan_client._common import TERMINAL, Call, Poll, Progress, ProgressFile, open_upload, predict_request

S = TypeVar("S", bound=BaseModel)


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()  # a field left as it is (None clears it)


def _as(schema: type[S]) -> Callable[[httpx.Response], S]:
    return lambda r: schema.model_validate_json(r.content)


def _list_of(schema: type[S]) -> Callable[[httpx.Response], list[S]]:
    adapter = TypeAdapter(list[schema])
    return lambda r: adapter.validate_json(r.content)


def _nothing(_response: httpx.Response) -> None:
    return None


def _id(value: str | int) -> str:
    """One path segment: an id is sent as it is, never as more of the path."""
    return quote(str(value), safe="")


def _ref(reference: str) -> str:
    return quote(reference, safe="@/")


def _params(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _upload(
    path: str,
    source: bytes | str | os.PathLike | BinaryIO,
    filename: str | None,
    progress: Progress | None,
    parse: Callable[[httpx.Response], Any],
    expect: tuple[int, ...],
    data: dict[str, str] | None,
    params: dict[str, Any] | None = None,
) -> Call:
    """A multipart upload of one file (field `file`) whose progress is reported as it is read."""
    raw, size, fname = open_upload(source, filename)
    body = ProgressFile(raw, size, progress)
    return Call(
        "POST",
        path,
        parse,
        expect,
        {"files": {"file": (fname, body, "application/octet-stream")}, "data": data or None, "params": params},
        rewind=body,
        cleanup=None if raw is source else raw.close,  # opened here (a path) or wrapped here (bytes)
    )


def _neighbors_request(
    items: Sequence[int] | None, vectors: Sequence[Sequence[float]] | None, images: Any, k: int, combine: str
) -> dict[str, Any]:
    given = [x is not None for x in (items, vectors, images)]
    if sum(given) != 1:
        raise ValueError("give exactly one of items, vectors or images")
    if images is not None:
        files = predict_request(images)
        if "files" not in files:
            raise ValueError("neighbours of images take image files (bytes or paths), not a pixel array")
        return {**files, "data": {"k": str(k), "combine": combine}}
    query = {"items": list(items)} if items is not None else {"vectors": [list(map(float, v)) for v in vectors]}
    return {"json": {"k": k, "query": query, "combine": combine}}


# -- keys and datasets --------------------------------------------------------------------------------


def whoami() -> Call[KeyOwner]:
    return Call("GET", "/v1/keys/current", _as(KeyOwner))


def upload_dataset(
    source: bytes | str | os.PathLike | BinaryIO,
    *,
    name: str | None = None,
    filename: str | None = None,
    split: str = "train",
    wait: bool = True,
    progress: Progress | None = None,
) -> Call[DatasetOut]:
    """Upload a zip / tar.gz / npz / IDX file (bytes, a path or an open binary file);
    `progress(sent, total)` is called as the body goes out."""
    return _upload(
        "/v1/datasets",
        source,
        filename,
        progress,
        _as(DatasetOut),
        (201, 202),
        {"name": name} if name else None,
        {"split": split, "wait": wait},
    )


def import_dataset(source: str, *, name: str | None = None, split: str = "train") -> Call[DatasetOut]:
    """A dataset the server knows by name (digits, cifar10, ...)."""
    body = {"source": source, "split": split, **({"name": name} if name else {})}
    return Call("POST", "/v1/datasets/import", _as(DatasetOut), (201, 202), {"json": body})


def get_dataset(dataset_id: str) -> Call[DatasetOut]:
    return Call("GET", f"/v1/datasets/{_id(dataset_id)}", _as(DatasetOut))


def list_datasets(*, state: str | None = None, limit: int | None = None, offset: int = 0) -> Call[Page[DatasetOut]]:
    params = _params(state=state, limit=limit, offset=offset)
    return Call("GET", "/v1/datasets", _as(Page[DatasetOut]), kwargs={"params": params})


def delete_dataset(dataset_id: str) -> Call[None]:
    return Call("DELETE", f"/v1/datasets/{_id(dataset_id)}", _nothing, (204,))


# -- runs ---------------------------------------------------------------------------------------------


def create_run(
    dataset_id: str,
    num_clusters: int | str | dict[str, int],  # K, "auto", or {"min": 2, "max": 20}
    *,
    preset: str = "small",
    overrides: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
    **extra: Any,
) -> Call[RunOut]:
    """Queue a run (`overrides`: dotted or nested config keys). With an `idempotency_key` a
    retried submit answers the run the first one made."""
    body = {"dataset_id": dataset_id, "num_clusters": num_clusters, "preset": preset, "overrides": overrides or {}}
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
    return Call("POST", "/v1/runs", _as(RunOut), (200, 202), {"json": {**body, **extra}, "headers": headers})


def get_run(run_id: str) -> Call[RunOut]:
    return Call("GET", f"/v1/runs/{_id(run_id)}", _as(RunOut))


def list_runs(
    *, state: str | None = None, dataset_id: str | None = None, limit: int | None = None, offset: int = 0
) -> Call[Page[RunOut]]:
    params = _params(state=state, dataset_id=dataset_id, limit=limit, offset=offset)
    return Call("GET", "/v1/runs", _as(Page[RunOut]), kwargs={"params": params})


def cancel_run(run_id: str) -> Call[RunOut]:
    return Call("POST", f"/v1/runs/{_id(run_id)}/cancel", _as(RunOut), (200, 202))


def retry_run(run_id: str) -> Call[RunOut]:
    """Resume a FAILED or CANCELED run from its last checkpoints."""
    return Call("POST", f"/v1/runs/{_id(run_id)}/retry", _as(RunOut), (202,))


def events(run_id: str, *, after: int = 0, limit: int | None = None) -> Call[EventPage]:
    """One page of the run's progress log; pass the answer's `next_after` as `after` for the next."""
    params = _params(after=after, limit=limit)
    return Call("GET", f"/v1/runs/{_id(run_id)}/events", _as(EventPage), kwargs={"params": params})


def _run_progress(run: RunOut) -> tuple:
    return run.state, tuple((s.stage, s.state, s.epoch, s.step) for s in run.stages)


def wait_for_run(
    run_id: str,
    states: tuple[str, ...] = TERMINAL,
    *,
    stall_timeout: float = 600.0,
    until: Callable[[RunOut], bool] | None = None,
    poll_s: float = 0.3,
) -> Poll[RunOut]:
    """Poll until the run's state is in `states` (or `until(run)`), or it ends. `stall_timeout`
    bounds a stall (no progress), never a slow run: StalledRun only when nothing moves."""

    def done(run: RunOut) -> bool:
        return (until(run) if until else run.state in states) or run.state in TERMINAL

    return Poll(f"run {run_id}", get_run(run_id), done, _run_progress, stall_timeout, poll_s)


def clusters(run_id: str) -> Call[list[ClusterOut]]:
    return Call("GET", f"/v1/runs/{_id(run_id)}/clusters", _list_of(ClusterOut))


def metrics(run_id: str) -> Call[MetricsOut]:
    return Call("GET", f"/v1/runs/{_id(run_id)}/metrics", _as(MetricsOut))


def predict(run_id: str, images: Any, *, k: int = 5) -> Call[PredictAnswer]:
    """`images`: image files (bytes or paths), sent as multipart; or a uint8 array (N, C, H, W) at
    the run's shape, sent raw as application/octet-stream (no decoding on the server)."""
    # k in the path, not as httpx params: merging params parses and rebuilds the URL once more, a
    # tenth of the cost of a one-image call.
    path = f"/v1/runs/{_id(run_id)}/predict?{urlencode({'k': k})}"
    return Call("POST", path, _as(PredictAnswer), kwargs=predict_request(images))


def neighbors(
    run_id: str,
    *,
    items: Sequence[int] | None = None,
    vectors: Sequence[Sequence[float]] | None = None,
    images: Any = None,
    k: int = 10,
    combine: Literal["mean", "separate"] = "mean",
) -> Call[NeighborsAnswer]:
    """Nearest training items to dataset items, vectors in the index's space, or image files (one
    of them); several queries averaged (`mean`) or answered one by one (`separate`)."""
    kwargs = _neighbors_request(items, vectors, images, k, combine)
    return Call("POST", f"/v1/runs/{_id(run_id)}/neighbors", _as(NeighborsAnswer), kwargs=kwargs)


# -- registered models: names, versions, aliases ----------------------------------------------------


def create_model(name: str, description: str | None = None) -> Call[ModelOut]:
    body = {"name": name, **({"description": description} if description is not None else {})}
    return Call("POST", "/v1/models", _as(ModelOut), (201,), {"json": body})


def list_models(*, limit: int | None = None, offset: int = 0) -> Call[Page[ModelOut]]:
    return Call("GET", "/v1/models", _as(Page[ModelOut]), kwargs={"params": _params(limit=limit, offset=offset)})


def get_model(name: str) -> Call[ModelOut]:
    return Call("GET", f"/v1/models/{_id(name)}", _as(ModelOut))


def update_model(name: str, description: str | None) -> Call[ModelOut]:
    return Call("PATCH", f"/v1/models/{_id(name)}", _as(ModelOut), kwargs={"json": {"description": description}})


def delete_model(name: str) -> Call[None]:
    """The model, its versions and aliases (the runs stay)."""
    return Call("DELETE", f"/v1/models/{_id(name)}", _nothing, (204,))


def publish_version(name: str, run_id: str) -> Call[VersionOut]:
    """A SUCCEEDED run as the model's next version (a run already published: that version)."""
    return Call("POST", f"/v1/models/{_id(name)}/versions", _as(VersionOut), (200, 201), {"json": {"run_id": run_id}})


def list_versions(name: str, *, limit: int | None = None, offset: int = 0) -> Call[VersionPage]:
    params = _params(limit=limit, offset=offset)
    return Call("GET", f"/v1/models/{_id(name)}/versions", _as(VersionPage), kwargs={"params": params})


def get_version(name: str, version: int) -> Call[VersionOut]:
    return Call("GET", f"/v1/models/{_id(name)}/versions/{_id(version)}", _as(VersionOut))


def move_alias(name: str, alias: str, version: int) -> Call[AliasOut]:
    """Point `alias` at `version`; answers once that version is loaded and has run once, so no
    request after the move waits for a cold model."""
    path = f"/v1/models/{_id(name)}/aliases/{_id(alias)}"
    return Call("PUT", path, _as(AliasOut), kwargs={"json": {"version": version}})


def rollback_alias(name: str, alias: str = "production") -> Call[AliasOut]:
    """Move `alias` back to the version it pointed at before its last move."""
    return Call("POST", f"/v1/models/{_id(name)}/aliases/{_id(alias)}/rollback", _as(AliasOut))


def delete_alias(name: str, alias: str) -> Call[None]:
    return Call("DELETE", f"/v1/models/{_id(name)}/aliases/{_id(alias)}", _nothing, (204,))


# -- named and merged clusters ----------------------------------------------------------------------


def model_clusters(reference: str) -> Call[VersionClustersOut]:
    """The served clusters of a model reference: names, descriptions, merged members, sizes."""
    return Call("GET", f"/v1/models/{_ref(reference)}/clusters", _as(VersionClustersOut))


def name_cluster(
    model: str, version: int, cluster: int, name: str | None = UNSET, *, description: str | None = UNSET
) -> Call[NamedClusterOut]:
    """Name and/or describe a served cluster of a version; a field not given stays, None clears it."""
    body = {k: v for k, v in {"name": name, "description": description}.items() if v is not UNSET}
    path = f"/v1/models/{_id(model)}/versions/{_id(version)}/clusters/{_id(cluster)}"
    return Call("PATCH", path, _as(NamedClusterOut), kwargs={"json": body})


def merge_clusters(
    model: str, version: int, clusters: Sequence[int], *, name: str | None = None
) -> Call[VersionClustersOut]:
    """Serve `clusters` as one (the lowest number names the group): a mapping of the version,
    nothing is retrained; `name` names the group (default: the name it had)."""
    body = {"clusters": list(clusters), **({"name": name} if name is not None else {})}
    path = f"/v1/models/{_id(model)}/versions/{_id(version)}/clusters/merge"
    return Call("POST", path, _as(VersionClustersOut), kwargs={"json": body})


def unmerge_cluster(model: str, version: int, cluster: int) -> Call[VersionClustersOut]:
    """Serve a merged cluster on its own again (a group's own number: dissolve the group)."""
    path = f"/v1/models/{_id(model)}/versions/{_id(version)}/clusters/{_id(cluster)}/unmerge"
    return Call("POST", path, _as(VersionClustersOut))


# -- serving through a model reference --------------------------------------------------------------


def predict_model(reference: str, images: Any, *, k: int = 5) -> Call[ModelPredictAnswer]:
    """/predict through `name`, `name@alias` or `name/versions/N`, resolved on the server at
    request time; the answer names the version that served and each cluster's name."""
    path = f"/v1/models/{_ref(reference)}/predict?{urlencode({'k': k})}"
    return Call("POST", path, _as(ModelPredictAnswer), kwargs=predict_request(images))


def model_neighbors(
    reference: str,
    *,
    items: Sequence[int] | None = None,
    vectors: Sequence[Sequence[float]] | None = None,
    images: Any = None,
    k: int = 10,
    combine: Literal["mean", "separate"] = "mean",
) -> Call[NeighborsAnswer]:
    """`neighbors` in the version a model reference points at now, with cluster names."""
    kwargs = _neighbors_request(items, vectors, images, k, combine)
    return Call("POST", f"/v1/models/{_ref(reference)}/neighbors", _as(NeighborsAnswer), kwargs=kwargs)


def model_assignments(
    reference: str,
    *,
    cluster: int | None = None,
    min_confidence: float | None = None,
    page: int = 1,
    page_size: int | None = None,
) -> Call[NamedAssignmentPage]:
    """The training images' clusters as the version serves them (merged, named)."""
    params = _params(cluster=cluster, min_confidence=min_confidence, page=page, page_size=page_size)
    return Call("GET", f"/v1/models/{_ref(reference)}/assignments", _as(NamedAssignmentPage), kwargs={"params": params})


def export_model(
    reference: str, path: str | os.PathLike, *, format: Literal["onnx", "torchscript"] = "onnx"
) -> Call[Path]:
    """Download the model a reference points at (a zip: the ONNX or TorchScript model,
    preprocessing.json and clusters.json with the version's names and merges) to `path`."""
    target = Path(path)

    def save(r: httpx.Response) -> Path:
        target.write_bytes(r.content)
        return target

    return Call("GET", f"/v1/models/{_ref(reference)}/model", save, kwargs={"params": {"format": format}})


# -- assignment jobs: a dataset assigned to a finished model, with a drift report --------------------


def create_assignment_job(
    dataset_id: str, model: str, *, confidence_threshold: float | None = None, batch_size: int | None = None
) -> Call[AssignmentJobOut]:
    """Assign a READY dataset with a run id or a model reference, on the workers, in batches."""
    body = {"dataset_id": dataset_id, "model": model}
    body |= _params(confidence_threshold=confidence_threshold, batch_size=batch_size)
    return Call("POST", "/v1/assignment-jobs", _as(AssignmentJobOut), (202,), {"json": body})


def list_assignment_jobs(
    *, state: str | None = None, limit: int | None = None, offset: int = 0
) -> Call[Page[AssignmentJobOut]]:
    params = _params(state=state, limit=limit, offset=offset)
    return Call("GET", "/v1/assignment-jobs", _as(Page[AssignmentJobOut]), kwargs={"params": params})


def get_assignment_job(job_id: str) -> Call[AssignmentJobOut]:
    return Call("GET", f"/v1/assignment-jobs/{_id(job_id)}", _as(AssignmentJobOut))


def cancel_assignment_job(job_id: str) -> Call[AssignmentJobOut]:
    """Stop the job after its current batch."""
    return Call("POST", f"/v1/assignment-jobs/{_id(job_id)}/cancel", _as(AssignmentJobOut), (202,))


def resume_assignment_job(job_id: str) -> Call[AssignmentJobOut]:
    """Continue a FAILED or CANCELED job at its checkpoint."""
    return Call("POST", f"/v1/assignment-jobs/{_id(job_id)}/resume", _as(AssignmentJobOut), (202,))


def wait_for_assignment_job(
    job_id: str,
    states: tuple[str, ...] = TERMINAL,
    *,
    stall_timeout: float = 600.0,
    until: Callable[[AssignmentJobOut], bool] | None = None,
    poll_s: float = 0.3,
) -> Poll[AssignmentJobOut]:
    """Poll until the job's state is in `states` (or `until(job)`), or it ends; StalledRun only
    when neither its state nor `processed` moves for `stall_timeout` seconds."""

    def done(job: AssignmentJobOut) -> bool:
        return (until(job) if until else job.state in states) or job.state in TERMINAL

    return Poll(
        f"assignment job {job_id}",
        get_assignment_job(job_id),
        done,
        lambda job: (job.state, job.processed),
        stall_timeout,
        poll_s,
    )


def job_assignments(
    job_id: str,
    *,
    cluster: int | None = None,
    order: Literal["item", "novelty_desc", "confidence_asc"] = "item",
    limit: int | None = None,
    offset: int = 0,
) -> Call[JobAssignmentPage]:
    """The job's assignments so far: run cluster, the cluster it is served as and its name in the
    job's model version, confidence, novelty distance."""
    params = _params(cluster=cluster, order=order, limit=limit, offset=offset)
    return Call(
        "GET", f"/v1/assignment-jobs/{_id(job_id)}/assignments", _as(JobAssignmentPage), kwargs={"params": params}
    )


def drift_report(job_id: str) -> Call[DriftReport]:
    """The drift report of a SUCCEEDED job against the model's training data (409 before)."""
    return Call("GET", f"/v1/assignment-jobs/{_id(job_id)}/drift", _as(DriftReport))


# -- webhooks -----------------------------------------------------------------------------------------


def create_webhook(url: str) -> Call[WebhookCreated]:
    """Register a URL for your runs' and jobs' state changes; keep the answer's `secret` (shown once)
    to check each delivery's X-Scan-Signature."""
    return Call("POST", "/v1/webhooks", _as(WebhookCreated), (201,), {"json": {"url": url}})


def list_webhooks() -> Call[list[WebhookOut]]:
    return Call("GET", "/v1/webhooks", _list_of(WebhookOut))


def delete_webhook(webhook_id: str) -> Call[None]:
    return Call("DELETE", f"/v1/webhooks/{_id(webhook_id)}", _nothing, (204,))


def webhook_deliveries(webhook_id: str, *, limit: int | None = None, offset: int = 0) -> Call[WebhookDeliveryPage]:
    """The webhook's deliveries, newest first, each with its attempts."""
    params = _params(limit=limit, offset=offset)
    return Call(
        "GET", f"/v1/webhooks/{_id(webhook_id)}/deliveries", _as(WebhookDeliveryPage), kwargs={"params": params}
    )


# -- bring-your-own backbone weights ------------------------------------------------------------------


def upload_weights(
    source: bytes | str | os.PathLike | BinaryIO,
    *,
    arch: str,
    width: int = 32,
    name: str | None = None,
    filename: str | None = None,
    progress: Progress | None = None,
) -> Call[WeightsOut]:
    """A state dict saved with torch.save that fits `arch` (and `width` for the convnet); a run
    starts from it with ``overrides={"pretext.backbone_weights": answer.reference}``."""
    fields = {"arch": arch, "width": str(width), **({"name": name} if name else {})}
    return _upload("/v1/weights", source, filename, progress, _as(WeightsOut), (201,), fields)


def list_weights(*, limit: int | None = None, offset: int = 0) -> Call[Page[WeightsOut]]:
    return Call("GET", "/v1/weights", _as(Page[WeightsOut]), kwargs={"params": _params(limit=limit, offset=offset)})


def get_weights(weights_id: str) -> Call[WeightsOut]:
    return Call("GET", f"/v1/weights/{_id(weights_id)}", _as(WeightsOut))


def delete_weights(weights_id: str) -> Call[None]:
    """409 while a run in progress starts from them."""
    return Call("DELETE", f"/v1/weights/{_id(weights_id)}", _nothing, (204,))
