"""Fixtures for the service and security suites (loaded once by tests/conftest.py, so both share one
stack): a real database (migrated from empty), a real uvicorn API process
and real `celery worker` processes, talked to over HTTP. Every test here is marked `service`.

Reusable fixtures (all session-scoped unless noted):

- ``stack``            -> Stack: ``.settings`` (app Settings of the test stack), ``.env`` (environment
                          for extra subprocesses), ``.mode`` ("embedded" | "services"), ``.base_url``.
- ``api_server``       -> base URL of the uvicorn process (http://127.0.0.1:<port>).
- ``gpu_worker``       -> WorkerProcess for queue ``gpu`` (training stages); ``.kill()`` SIGKILLs its
                          whole process group, ``.start()`` starts a fresh one.
- ``cpu_worker``       -> WorkerProcess for queue ``cpu`` (ingest).
- ``keys``             -> {"a": key of tenant-a, "b": key of tenant-b}.
- ``client``           -> httpx.Client on the API with tenant A's key (function-scoped use is fine).
- ``client_b``         -> the same for tenant B.
- ``anon_client``      -> no Authorization header.
- ``digits_dataset``   -> id of tenant A's `digits` dataset (imported through the API, READY).
- ``small_dataset``    -> id of a 360-image digits subset uploaded as .npz (fast training).
- ``finished_run``     -> dict (GET /v1/runs/{id}) of a run on digits that SUCCEEDED with TINY.
- ``TINY`` (module constant) -> overrides that train in well under a minute on 2 CPU cores.
- ``wait_for_run(client, run_id, states, timeout)`` -> the run dict once its state is in ``states``;
                          ``timeout`` bounds a stall (no progress), never a slow run.
- ``scan_client(client)`` -> the project's client (scan_client.Client) over a fixture's httpx client;
                          the helpers above go through it, not through hand-written httpx calls.
- ``db_session()``     -> a SQLAlchemy Session on the test database (context manager).
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
MODE = os.environ.get("SCAN_TEST_MODE", "embedded")
PG_URL = os.environ.get("SCAN_DATABASE_URL") or "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL = os.environ.get("SCAN_BROKER_URL") or "redis://127.0.0.1:6379/15"
MAX_UPLOAD = 4_000_000
MAX_DATASET = 64 << 20  # above Fashion-MNIST's 47 MB, far below what a 100 KB bomb declares

# Tiny enough for CI on 2 cores; still runs every stage for real.
TINY = {
    "pretext.epochs": 2,
    "pretext.batch_size": 128,
    "clustering.epochs": 2,
    "clustering.num_heads": 2,
    "selflabel.epochs": 1,
}
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELED")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    stack_dirs = [Path(__file__).parent / "service", Path(__file__).parent / "security"]
    for item in items:
        if any(d in Path(str(item.fspath)).parents for d in stack_dirs):
            item.add_marker(pytest.mark.service)


@dataclass
class Stack:
    mode: str
    env: dict[str, str]
    var_dir: Path
    base_url: str = ""

    @property
    def settings(self):
        from app.core.settings import get_settings

        return get_settings()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reset_services() -> None:
    """Empty PostgreSQL (every table, alembic_version included) and the Redis test database."""
    import psycopg
    import redis

    with psycopg.connect(PG_URL.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS public CASCADE")
        conn.execute("CREATE SCHEMA public")
    redis.Redis.from_url(REDIS_URL).flushdb()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    var_dir = tmp_path_factory.mktemp("scan-var")
    env = {
        "SCAN_VAR_DIR": str(var_dir),
        "SCAN_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
        "SCAN_MAX_SERVING_BODY_BYTES": str(MAX_UPLOAD),
        "SCAN_MAX_WEIGHTS_BYTES": str(MAX_UPLOAD),
        "SCAN_MAX_DATASET_BYTES": str(MAX_DATASET),
        "SCAN_INGEST_WAIT_S": "180",
        # Short heartbeats so a killed worker's stage is picked up within seconds in the tests.
        "SCAN_HEARTBEAT_S": "1",
        "SCAN_STALE_AFTER_S": "6",
        "SCAN_RECOVER_INTERVAL_S": "1",
        "SCAN_PROGRESS_INTERVAL_S": "0.5",
        # The gpu worker measures its device once per checkout, not once per test session.
        "SCAN_CALIBRATION_CACHE": str(ROOT / ".pytest_cache" / "scan-device-calibration.json"),
        "SCAN_CANCEL_CHECK_INTERVAL_S": "0.3",
        # Webhook receivers of the tests listen on loopback; retries come quickly.
        "SCAN_WEBHOOK_ALLOW_PRIVATE": "1",
        "SCAN_WEBHOOK_BACKOFF_S": "0.5",
        "SCAN_WEBHOOK_POLL_S": "0.2",
        "SCAN_DATABASE_URL": PG_URL if MODE == "services" else "",
        "SCAN_BROKER_URL": REDIS_URL if MODE == "services" else "",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    _clear_caches()
    if MODE == "services":
        _reset_services()
    from app.bootstrap import migrate

    migrate(Stack(MODE, env, var_dir).settings)
    yield Stack(MODE, {**os.environ, **env, "PYTHONUNBUFFERED": "1"}, var_dir)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _clear_caches()


def _clear_caches() -> None:
    from app.core import db, settings

    settings.get_settings.cache_clear()
    db.get_engine.cache_clear()
    db._factory.cache_clear()


@contextmanager
def db_session():
    from app.core.db import new_session

    with new_session() as session:
        yield session


class WorkerProcess:
    """A real `celery worker` in its own process group (so SIGKILL takes its children too)."""

    def __init__(self, stack: Stack, queues: str, name: str):
        self.stack, self.queues, self.name = stack, queues, name
        self.proc: subprocess.Popen | None = None
        self.log = stack.var_dir / f"worker-{name}.log"
        self.count = 0

    def start(self) -> None:
        self.count += 1
        log = open(self.log, "a")
        self.proc = subprocess.Popen(
            [
                PY,
                "-m",
                "celery",
                "-A",
                "workers.celery_app",
                "worker",
                "-Q",
                self.queues,
                "-c",
                "1",
                "-P",
                "prefork",
                "-n",
                f"{self.name}{self.count}@%h",
                "--loglevel",
                "INFO",
                "--without-gossip",
                "--without-mingle",
            ],
            cwd=ROOT,
            env=self.stack.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if " ready." in self.log.read_text():
                if self.log.read_text().count(" ready.") >= self.count:
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited: {self.log.read_text()[-3000:]}")
            time.sleep(0.2)
        raise RuntimeError(f"worker {self.name} did not become ready: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the whole worker (parent and pool children): nothing gets to acknowledge or requeue."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def start_api(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen, str]:
    """A uvicorn process of the API in its own process group, once /livez answers: (process, base URL)."""
    port = _free_port()
    log = open(log_path, "a")
    proc = subprocess.Popen(
        [PY, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(base + "/livez", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("API did not start: " + log_path.read_text()[-3000:])
        time.sleep(0.3)


@pytest.fixture(scope="session")
def api_server(stack: Stack) -> Iterator[str]:
    proc, base = start_api(stack.env, stack.var_dir / "api.log")
    stack.base_url = base
    yield base
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=20)


@pytest.fixture(scope="session")
def cpu_worker(stack: Stack) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(stack, "cpu", "cpu")
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture(scope="session")
def gpu_worker(stack: Stack) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(stack, "gpu", "gpu")
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture(scope="session")
def keys(stack: Stack) -> dict[str, str]:
    from app.services.auth import create_key

    with db_session() as session:
        out = {"a": create_key(session, "tenant-a"), "b": create_key(session, "tenant-b")}
        session.commit()
    return out


def _client(base: str, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=base, headers=headers, timeout=240)


@pytest.fixture(scope="session")
def client(api_server: str, keys: dict[str, str], cpu_worker: WorkerProcess) -> Iterator[httpx.Client]:
    with _client(api_server, keys["a"]) as c:
        yield c


@pytest.fixture(scope="session")
def client_b(api_server: str, keys: dict[str, str]) -> Iterator[httpx.Client]:
    with _client(api_server, keys["b"]) as c:
        yield c


@pytest.fixture(scope="session")
def anon_client(api_server: str) -> Iterator[httpx.Client]:
    with _client(api_server, None) as c:
        yield c


def scan_client(http: httpx.Client):
    """The project's client (scan_client) over a fixture's httpx client: same key, same connection."""
    from scan_client import Client

    return Client(http=http)


@pytest.fixture(scope="session")
def digits_dataset(client: httpx.Client) -> str:
    dataset = scan_client(client).import_dataset("digits")
    assert dataset.state == "READY", dataset
    return dataset.id


def digits_npz(n: int) -> bytes:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images[:n] * (255 / 16)).round().astype(np.uint8)  # (n, 8, 8)
    buf = io.BytesIO()
    np.savez(buf, images=images, labels=digits.target[:n].astype(np.int64))
    return buf.getvalue()


@pytest.fixture(scope="session")
def small_dataset(client: httpx.Client) -> str:
    return scan_client(client).upload_dataset(digits_npz(360), filename="digits360.npz", name="small").id


def wait_for_run(client: httpx.Client, run_id: str, states=TERMINAL, timeout: float = 600, until=None) -> dict:
    """GET /v1/runs/{id} (scan_client's `wait_for_run`) until its state is in `states` (or
    `until(run)` is true, `run` a dict), or the run ends.

    `timeout` bounds a *stall*, not the run: it fails only after `timeout` seconds without any
    progress (state, stage, epoch or step unchanged), so a slow, busy machine that keeps training
    is never failed for being slow, while a hung run still is."""
    check = None if until is None else (lambda run: until(run.model_dump(mode="json")))
    run = scan_client(client).wait_for_run(run_id, tuple(states), stall_timeout=timeout, until=check)
    return run.model_dump(mode="json")


def start_run(client: httpx.Client, dataset_id: str, overrides: dict, **extra) -> dict:
    run = scan_client(client).create_run(dataset_id, 10, preset="small", overrides=overrides, **extra)
    return run.model_dump(mode="json")


@pytest.fixture(scope="session")
def finished_run(client: httpx.Client, digits_dataset: str, gpu_worker: WorkerProcess) -> dict:
    run = start_run(client, digits_dataset, TINY)
    run = wait_for_run(client, run["id"], timeout=600)
    assert run["state"] == "SUCCEEDED", run
    return run
