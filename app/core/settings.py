"""The one settings object for the API, the workers and the CLI (environment first).

With no environment at all the service runs embedded: a SQLite file, Celery's filesystem transport
and every artifact under ``./var/``. ``DATABASE_URL``/``BROKER_URL`` (or their ``SCAN_`` forms)
switch it to PostgreSQL and Redis without any other change. Nothing else in the code reads
``os.environ``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ml.limits import MAX_K


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SCAN_", populate_by_name=True, extra="ignore")

    var_dir: Path = Field(
        Path("var"),
        description="Root of everything written locally (embedded database, "
        "broker folder, datasets, runs, uploads, the first API key).",
    )
    database_url: str = Field(
        "",
        validation_alias=AliasChoices("SCAN_DATABASE_URL", "DATABASE_URL", "database_url"),
        description="SQLAlchemy URL; empty means SQLite at <var_dir>/scan.db. postgresql:// is rewritten "
        "to the psycopg 3 driver.",
    )
    broker_url: str = Field(
        "",
        validation_alias=AliasChoices("SCAN_BROKER_URL", "BROKER_URL", "broker_url"),
        description="Celery broker; empty means the filesystem transport under <var_dir>/broker "
        "(no server). redis://host:6379/0 in production.",
    )
    artifacts_dir: Path | None = Field(
        None,
        description="Datasets and run directories; default <var_dir>. "
        "Shared by the API and every worker unless SCAN_ARTIFACT_STORE is set.",
    )
    artifact_store: str = Field(
        "",
        description="Where artifacts outlive a machine: empty = the artifacts "
        "folder itself (shared by every process); file:///shared/folder or "
        "s3://bucket/prefix = a store that workers pull from and push to, the "
        "artifacts folder a local cache (app/core/artifacts.py).",
    )
    s3_endpoint: str = Field("", description="S3 endpoint URL for a non-AWS server (MinIO: http://minio:9000).")
    max_upload_bytes: int = Field(1 << 30, ge=1, description="Largest accepted upload; larger ones get 413.")
    max_weights_bytes: int = Field(
        512 << 20, ge=1, description="Largest accepted backbone weights upload (POST /v1/weights); larger get 413."
    )
    ingest_wait_s: float = Field(
        120.0,
        ge=0,
        description="How long POST /v1/datasets waits for the ingest task before answering 202 instead of 201/4xx.",
    )
    visibility_timeout_s: int = Field(
        12 * 3600,
        ge=60,
        description="Redis redelivers an unacknowledged task after this long; must exceed the longest stage.",
    )
    max_stage_attempts: int = Field(
        3,
        ge=1,
        description="A stage delivered more often than this (worker killed, OOM) fails the run instead of looping.",
    )
    heartbeat_s: float = Field(10.0, gt=0, description="How often a running stage marks itself alive.")
    stale_after_s: float = Field(
        120.0,
        gt=0,
        description="A stage whose heartbeat is older than this is "
        "presumed dead; a worker re-enqueues it and it resumes from its checkpoint.",
    )
    recover_interval_s: float = Field(30.0, gt=0, description="How often each worker looks for dead stages.")
    infra_retry_s: float = Field(
        600.0,
        gt=0,
        description="How long a running stage waits (training "
        "paused) for an unreachable database or broker before it hands the run back "
        "to the dispatcher; infrastructure errors never fail a stage.",
    )
    dispatch_after_s: float = Field(
        30.0,
        gt=0,
        description="The dispatcher re-sends a run that should be "
        "moving, that no live worker holds and whose last message is older than "
        "this (and the queue is empty): a lost message costs this much latency.",
    )
    queue_order: Literal["oldest_run", "message"] = Field(
        "oldest_run",
        description="What a free worker runs: `oldest_run` (the earliest submitted run that is "
        "waiting, so a run's next stage goes before a later run's first stage) or `message` (the run named "
        "by the message, in queue order: stages of concurrent runs interleave).",
    )
    calibration_cache: Path | None = Field(
        None,
        description="Where a training worker keeps its measured device figures (ml/calibrate.py), "
        "reused while the device and torch stay the same; default <var_dir>/calibration/<host>.json.",
    )
    retry_after_s: int = Field(5, ge=1, description="Retry-After of a 503 when the database or broker is unreachable.")
    progress_interval_s: float = Field(1.0, ge=0, description="Least time between two progress rows.")
    cancel_check_interval_s: float = Field(0.5, ge=0, description="Least time between two cancel-flag reads.")
    predict_max_batch_size: int = Field(
        64,
        ge=1,
        description="Dynamic batcher: most images one model call "
        "takes from concurrent /predict requests (Triton's max_batch_size).",
    )
    predict_max_delay_ms: float = Field(
        5.0,
        ge=0,
        description="Dynamic batcher: longest a request waits "
        "for others to share its batch (Triton's max_queue_delay); a batch stops waiting as soon as "
        "no other request is being read.",
    )
    serving_instances: int = Field(
        1,
        ge=1,
        le=256,
        description="Dynamic batcher: batches of one run's model that run at once in an API process, each in "
        "its own thread (Triton's instance_group count). On a CPU, one per core with SCAN_SERVING_TORCH_THREADS=0 "
        "gives each its own core: no layer waits for a thread the event loop has taken. A GPU uses one.",
    )
    serving_torch_threads: int = Field(
        0,
        ge=0,
        le=1024,
        description="torch intra-op threads of an API process (for /predict, /neighbors, /v2 infer). "
        "0: the process's cores divided among SCAN_SERVING_INSTANCES (torch's own default with one instance).",
    )
    model_cache_size: int = Field(
        4,
        ge=1,
        description="Finished runs kept loaded (model + faiss index) per API process; least recently used is evicted.",
    )
    max_predict_images: int = Field(256, ge=1, description="Most images one /predict request may carry (413).")
    max_dataset_bytes: int = Field(
        8 << 30,
        ge=1,
        description="Largest decoded dataset (N x C x H x W "
        "bytes); checked from the file's headers before anything is allocated "
        "(npz, IDX, gz, archives of images). Larger ones answer 422.",
    )
    neighbors_max_queries: int = Field(
        256,
        ge=1,
        le=100_000,
        description="Most query items, vectors or images in one /neighbors request; more answer 422.",
    )
    neighbors_max_results: int = Field(
        65_536,
        ge=1,
        le=10_000_000,
        description="Most neighbours one "
        "/neighbors answer may list (queries x k with combine=separate); "
        "more answer 422 before any search runs.",
    )
    max_serving_body_bytes: int = Field(
        64 << 20,
        ge=1024,
        description="Largest /predict or /neighbors "
        "request body; larger ones get 413 as soon as the limit is passed "
        "(the body is read as a stream, never buffered whole first).",
    )
    predict_max_image_pixels: int = Field(
        4096 * 4096,
        ge=64,
        description="Largest image (width x height) "
        "/predict and /neighbors decode; JPEGs are decoded at a reduced "
        "scale when far larger than the model's input.",
    )
    session_secret: str = Field(
        "",
        description="Signs the cluster browser's session cookie. Empty: a random "
        "secret generated once into <var_dir>/session-secret (set it when several "
        "API hosts share one database).",
    )
    secure_cookies: bool = Field(
        False,
        description="Mark the session cookie Secure even when the API sees "
        "plain http (TLS ends at a proxy in front of it). Over https it always is.",
    )
    metrics_token: str = Field(
        "",
        description="Bearer token that GET /metrics requires. Empty: /metrics "
        "answers only clients on the loopback interface (a local scraper or sidecar).",
    )
    neighbors_max_k: int = Field(
        1024,
        ge=1,
        le=MAX_K,
        description="Largest k for /neighbors (faiss GPU indexes stop at 2048); larger k answers 422.",
    )
    serving_device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the API process runs models for /predict and /neighbors."
    )
    auth_cache_s: float = Field(
        30.0,
        ge=0,
        description="How long an API process trusts a key it has verified, and a run it found servable, without "
        "asking the database again. A key revoked through this host's API or by `scan admin revoke-key` on a host "
        "sharing <var_dir> is refused at once (a stamp file); other hosts refuse it within this time. 0: ask the "
        "database on every request.",
    )
    assignment_batch_size: int = Field(
        256,
        ge=1,
        le=8192,
        description="Images per batch of an assignment job: the unit of progress, of the checkpoint "
        "(rows committed with the offset) and of the cancel check.",
    )
    webhooks_per_tenant: int = Field(10, ge=1, le=1000, description="Most webhook URLs one tenant may register.")
    webhook_allow_private: bool = Field(
        False,
        description="Let webhooks reach loopback, private (RFC 1918), link-local (cloud metadata) and "
        "other non-public addresses. Off: such URLs answer 422 and are refused again at delivery time "
        "(after DNS resolution), so a tenant cannot make the workers call internal services.",
    )
    webhook_timeout_s: float = Field(5.0, gt=0, le=60, description="Time limit of one webhook delivery attempt.")
    webhook_backoff_s: float = Field(
        10.0,
        gt=0,
        description="Wait before the first retry of a failed webhook delivery; "
        "doubled after each further failure (capped at an hour).",
    )
    webhook_max_attempts: int = Field(
        8, ge=1, le=50, description="Attempts before a webhook delivery is given up (FAILED)."
    )
    webhook_poll_s: float = Field(
        1.0, gt=0, description="How often each worker's sender looks for webhook deliveries due."
    )
    default_page_size: int = Field(50, ge=1)
    max_page_size: int = Field(1000, ge=1)
    api_host: str = Field("127.0.0.1", description="Where `make demo` binds the API.")
    api_port: int = Field(8000, description="Where `make demo` binds the API.")

    @field_validator("database_url")
    @classmethod
    def _psycopg_driver(cls, url: str) -> str:
        # SQLAlchemy's bare postgresql:// means psycopg2, which we do not ship.
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix) :]
        return url

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.var_dir / 'scan.db').resolve()}"

    @property
    def broker(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_dir(self) -> Path:
        return (self.var_dir / "broker").resolve()

    @property
    def artifacts(self) -> Path:
        return (self.artifacts_dir or self.var_dir).resolve()

    @property
    def datasets_dir(self) -> Path:
        return self.artifacts / "datasets"

    @property
    def runs_dir(self) -> Path:
        return self.artifacts / "runs"

    @property
    def weights_dir(self) -> Path:
        return self.artifacts / "weights"

    @property
    def uploads_dir(self) -> Path:
        return self.artifacts / "uploads"

    @property
    def api_key_file(self) -> Path:
        return self.var_dir.resolve() / "api-key.txt"

    @property
    def is_sqlite(self) -> bool:
        return self.db_url.startswith("sqlite")

    @property
    def embedded(self) -> bool:
        return self.is_sqlite and self.broker.startswith("filesystem")

    def make_dirs(self) -> None:
        for path in (self.var_dir, self.datasets_dir, self.runs_dir, self.uploads_dir):
            path.mkdir(parents=True, exist_ok=True)
        if self.broker.startswith("filesystem"):
            (self.broker_dir / "queue").mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    return Settings()
