"""The data layer shared by the API and the workers (SQLAlchemy 2.0, typed).

The schema exists only through the Alembic migrations in ``migrations/``; a test checks that
autogenerate finds no difference between these classes and ``alembic upgrade head``.
States are plain strings (not database enums) so adding one is a one-line migration on both
SQLite and PostgreSQL.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

if TYPE_CHECKING:
    from ml.config import RunConfig


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return uuid.uuid4().hex


# Wider than new_id()'s 32 hex digits, narrow enough that no NUL, surrogate or path reaches a query.
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def owned(session: Session, table: type[Any], row_id: str, tenant_id: str) -> Any | None:
    """The row of ``table`` with this id when ``tenant_id`` owns it, else None (the caller's 404).

    The one lookup of a tenant's resource by an id the client sent. An id that new_id() cannot have
    made is a miss without a query: PostgreSQL answers NUL in a text parameter with an error, not
    with no row (Schemathesis found the 500 in POST /v1/runs).
    """
    if not isinstance(row_id, str) or not _ID.fullmatch(row_id):
        return None
    row = session.get(table, row_id)
    return row if row is not None and row.tenant_id == tenant_id else None


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite hands back naive ones otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: UTCDateTime()}


class DatasetState:
    PENDING, INGESTING, READY, FAILED = "PENDING", "INGESTING", "READY", "FAILED"


class RunState:
    QUEUED, PRETEXT, MINING, CLUSTERING, SELFLABEL = "QUEUED", "PRETEXT", "MINING", "CLUSTERING", "SELFLABEL"
    SUCCEEDED, FAILED, CANCELED = "SUCCEEDED", "FAILED", "CANCELED"
    ALL = (QUEUED, PRETEXT, MINING, CLUSTERING, SELFLABEL, SUCCEEDED, FAILED, CANCELED)
    TERMINAL = (SUCCEEDED, FAILED, CANCELED)
    ACTIVE = (QUEUED, PRETEXT, MINING, CLUSTERING, SELFLABEL)


class StageState:
    PENDING, RUNNING, SUCCEEDED, FAILED, CANCELED = "PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELED"


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """A bearer key: only its SHA-256 is stored; ``prefix`` (public) finds the row in one lookup."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class Dataset(Base):
    __tablename__ = "datasets"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(String(500))
    split: Mapped[str] = mapped_column(String(32), default="train")
    state: Mapped[str] = mapped_column(String(16), default=DatasetState.PENDING)
    count: Mapped[int | None]
    height: Mapped[int | None]
    width: Mapped[int | None]
    channels: Mapped[int | None]
    labelled: Mapped[bool] = mapped_column(Boolean, default=False)
    class_names: Mapped[list[Any] | None]
    storage_path: Mapped[str | None] = mapped_column(String(1000))
    upload_path: Mapped[str | None] = mapped_column(String(1000))
    size_bytes: Mapped[int | None]
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    ready_at: Mapped[datetime | None]


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_runs_tenant_idempotency_key"),
        Index("ix_runs_tenant_state", "tenant_id", "state"),
    )
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    state: Mapped[str] = mapped_column(String(16), default=RunState.QUEUED)
    stage: Mapped[str | None] = mapped_column(String(16))  # the stage running or next to run
    # The run's recipe, validated once at submission (ml.config.RunConfig as JSON): its one stored
    # copy. num_clusters, preset and overrides below are read from it, never stored beside it.
    config: Mapped[dict[str, Any]]
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text)
    redeliveries: Mapped[int] = mapped_column(Integer, default=0)
    # The lease of the task now running a stage: a fresh heartbeat means "alive, leave it alone".
    lease_token: Mapped[str | None] = mapped_column(String(64))
    heartbeat_at: Mapped[datetime | None]
    # The outbox: when a message that wakes a worker for this run was last handed to the broker
    # (None: never, or owed again). The dispatcher re-sends runs no live worker holds whose message
    # is older than dispatch_after_s; the broker is never the only record of work to do.
    dispatched_at: Mapped[datetime | None]
    run_dir: Mapped[str | None] = mapped_column(String(1000))
    # Expected seconds per stage on the workers' reported device, made before the run was queued
    # (ml/estimate.py); what budget_minutes changed in the recipe, if it was given.
    estimate: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    @property
    def num_clusters(self) -> int | None:
        """K: as asked, or for "auto" / a range the K the clustering stage chose (None before)."""
        asked = self.config["num_clusters"]
        return asked if isinstance(asked, int) else self.config.get("num_clusters_chosen")

    @property
    def preset(self) -> str:
        return str(self.config["preset"])

    @property
    def overrides(self) -> dict[str, Any]:
        """What the config changes from its preset (dotted keys), derived from the config."""
        return self.recipe().overrides()

    def recipe(self) -> RunConfig:
        """The stored config parsed into the typed model: it was validated when the run was
        submitted, so reading it back is parsing, not a second check."""
        from ml.config import RunConfig

        return RunConfig.model_validate(self.config)


class StageStatus(Base):
    __tablename__ = "stage_status"
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    stage: Mapped[str] = mapped_column(String(16), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), default=StageState.PENDING)
    epoch: Mapped[int | None]
    epochs: Mapped[int | None]
    step: Mapped[int | None]
    steps: Mapped[int | None]
    loss: Mapped[float | None] = mapped_column(Float)
    images_per_s: Mapped[float | None] = mapped_column(Float)
    eta_s: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    duration_s: Mapped[float | None] = mapped_column(Float)
    summary: Mapped[dict[str, Any] | None]


class RunEvent(Base):
    """The progress log: one row per throttled progress report and per state change."""

    __tablename__ = "run_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))  # progress | stage_started | stage_finished | state | error
    stage: Mapped[str | None] = mapped_column(String(16))
    attempt: Mapped[int | None]
    epoch: Mapped[int | None]
    epochs: Mapped[int | None]
    step: Mapped[int | None]
    steps: Mapped[int | None]
    loss: Mapped[float | None] = mapped_column(Float)
    message: Mapped[str | None] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None]


class Cluster(Base):
    __tablename__ = "clusters"
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    size: Mapped[int]
    mean_confidence: Mapped[float | None] = mapped_column(Float)
    prototype: Mapped[int | None]
    top_items: Mapped[list[Any] | None]
    matched_label: Mapped[str | None] = mapped_column(String(200))


class Assignment(Base):
    __tablename__ = "assignments"
    __table_args__ = (Index("ix_assignments_run_cluster", "run_id", "cluster"),)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    item_index: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    cluster: Mapped[int]
    confidence: Mapped[float] = mapped_column(Float)


class RunMetrics(Base):
    __tablename__ = "run_metrics"
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    metrics: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class UiSession(Base):
    """A cluster-browser login. The browser holds only a random, signed session id; the row stores
    its SHA-256, the key it was opened with (revoking the key ends the session) and the CSRF token
    every form of the session must echo."""

    __tablename__ = "ui_sessions"
    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    api_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]


class WorkerDevice(Base):
    """What a worker advertised at start (ml/calibrate.py): its device, memory and measured
    throughput. ``seen_at`` is refreshed by the worker's dispatcher loop; the API counts a worker
    whose row is fresh as one that can take a run (app/services/devices.py)."""

    __tablename__ = "worker_devices"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)  # Celery's hostname, unique per worker
    queues: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))
    device_name: Mapped[str] = mapped_column(String(200))
    memory_bytes: Mapped[int] = mapped_column(BigInteger)
    calibration: Mapped[dict[str, Any]]
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class RegisteredModel(Base):
    """A name an app calls instead of a run id (the model-registry habit of MLflow and Triton):
    its versions are published runs, its aliases (``production``, ``staging``) point at versions."""

    __tablename__ = "registered_models"
    __table_args__ = (UniqueConstraint("tenant_id", "name", name="uq_registered_models_tenant_name"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelVersion(Base):
    """A SUCCEEDED run published under a model as version 1, 2, ... (numbers are never reused)."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version", name="uq_model_versions_model_version"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    model_id: Mapped[str] = mapped_column(ForeignKey("registered_models.id", ondelete="CASCADE"), index=True)
    version: Mapped[int]
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelAlias(Base):
    """``name@alias`` -> a version. Moving it is one UPDATE of this row; ``previous_version_id`` is
    where a rollback moves it back to."""

    __tablename__ = "model_aliases"
    model_id: Mapped[str] = mapped_column(ForeignKey("registered_models.id", ondelete="CASCADE"), primary_key=True)
    alias: Mapped[str] = mapped_column(String(64), primary_key=True)
    version_id: Mapped[str] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"), index=True)
    previous_version_id: Mapped[str | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class VersionCluster(Base):
    """A cluster of a model version as the app sees it: a name, a description, and the cluster it
    was merged into (None: served on its own). Kept with the version, so naming or merging never
    retrains, and two models that publish the same run may name its clusters differently."""

    __tablename__ = "version_clusters"
    version_id: Mapped[str] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str | None] = mapped_column(String(100))
    description: Mapped[str | None] = mapped_column(Text)
    merged_into: Mapped[int | None]


class Weights(Base):
    """Bring-your-own backbone weights a tenant uploaded (POST /v1/weights): validated as a plain
    state dict that fits ``arch`` and stored as the backbone's tensors only, under
    ``weights/<id>/backbone.pt`` (artifact store key). Runs name them as ``"weights:<id>"``."""

    __tablename__ = "weights"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    arch: Mapped[str] = mapped_column(String(32))
    width: Mapped[int]
    tensors: Mapped[int]
    size_bytes: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobState:
    QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELED"
    ALL = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED)
    TERMINAL = (SUCCEEDED, FAILED, CANCELED)
    ACTIVE = (QUEUED, RUNNING)


class AssignmentJob(Base):
    """A dataset assigned to a finished model, in batches on the workers. ``processed`` is the
    checkpoint: the rows of items below it are committed in the same transaction that moved it, so
    a resumed job (worker killed, cancel then resume) continues there without duplicates. The lease
    (``lease_token`` + ``heartbeat_at``) and the outbox (``dispatched_at``) work as they do for runs."""

    __tablename__ = "assignment_jobs"
    __table_args__ = (Index("ix_assignment_jobs_tenant_state", "tenant_id", "state"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    model: Mapped[str] = mapped_column(String(200))  # the reference the client sent
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED)
    total: Mapped[int]
    processed: Mapped[int] = mapped_column(Integer, default=0)
    batch_size: Mapped[int]
    confidence_threshold: Mapped[float] = mapped_column(Float)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    lease_token: Mapped[str | None] = mapped_column(String(64))
    heartbeat_at: Mapped[datetime | None]
    dispatched_at: Mapped[datetime | None]
    drift: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class JobAssignment(Base):
    """One item of an assignment job: its cluster, confidence and novelty (cosine distance to its
    nearest training image in the run's faiss index)."""

    __tablename__ = "job_assignments"
    __table_args__ = (Index("ix_job_assignments_job_cluster", "job_id", "cluster"),)
    job_id: Mapped[str] = mapped_column(ForeignKey("assignment_jobs.id", ondelete="CASCADE"), primary_key=True)
    item_index: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    cluster: Mapped[int]
    confidence: Mapped[float] = mapped_column(Float)
    distance: Mapped[float] = mapped_column(Float)


class Webhook(Base):
    """A URL of a tenant that hears of every state change of its runs and assignment jobs. The
    secret signs each delivery (HMAC-SHA256); it is shown once, when the webhook is registered."""

    __tablename__ = "webhooks"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(String(2048))
    secret: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class DeliveryState:
    PENDING, DELIVERED, FAILED = "PENDING", "DELIVERED", "FAILED"


class WebhookDelivery(Base):
    """The webhook outbox: written in the transaction of the state change it reports, sent (and
    retried with backoff) by the workers' sender until delivered or out of attempts."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_state_next", "state", "next_attempt_at"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    webhook_id: Mapped[str] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"), index=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    event: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]]
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]


class WebhookAttempt(Base):
    __tablename__ = "webhook_attempts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int]
    at: Mapped[datetime] = mapped_column(default=utcnow)
    status_code: Mapped[int | None]
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[float] = mapped_column(Float)
