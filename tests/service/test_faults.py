"""Faults of the infrastructure cost latency, never a run (the services suite: PostgreSQL + Redis).

The API and the `gpu` worker of this module reach PostgreSQL and Redis through TCP proxies the test
controls (tests/service/tcp_proxy.py): a cut drops every live connection and refuses new ones, as a
server restart does, without touching the machine's servers. Every wait here is on an observed
state (an epoch reached, a state entered), never on training finishing within a tight time.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from app.tables import Run, RunEvent, StageStatus, utcnow
from tests.service.tcp_proxy import TcpProxy
from tests.stack import MODE, PG_URL, REDIS_URL, TERMINAL, Stack, WorkerProcess, _client, db_session, start_api

pytestmark = pytest.mark.skipif(MODE != "services", reason="cuts PostgreSQL and Redis connections")

STALE_AFTER_S = 8
DISPATCH_AFTER_S = 3
# Small, but pretext long enough to be cut three times while it trains (each cut waits for an epoch).
LONG = {
    "pretext.epochs": 14,
    "pretext.batch_size": 120,
    "clustering.epochs": 2,
    "clustering.num_heads": 2,
    "selflabel.epochs": 1,
}
SHORT = {
    "pretext.epochs": 4,
    "pretext.batch_size": 120,
    "clustering.epochs": 1,
    "clustering.num_heads": 1,
    "selflabel.epochs": 1,
}


def _via(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = (parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else "") + f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass
class Faulty:
    """The API and gpu worker of this module, both behind the proxies."""

    pg: TcpProxy
    redis: TcpProxy
    stack: Stack
    client: httpx.Client
    worker: WorkerProcess
    api: subprocess.Popen
    statuses: Counter = field(default_factory=Counter)


@pytest.fixture(scope="module")
def faulty(stack, keys, small_dataset, gpu_worker) -> Iterator[Faulty]:
    # The session's gpu worker talks to the servers directly; it must not take this module's runs.
    gpu_worker.stop()
    pg_target, redis_target = urlsplit(PG_URL), urlsplit(REDIS_URL)
    pg = TcpProxy(pg_target.hostname, pg_target.port or 5432).start()
    redis = TcpProxy(redis_target.hostname, redis_target.port or 6379).start()
    env = {
        **stack.env,
        "SCAN_DATABASE_URL": _via(PG_URL, pg.port),
        "SCAN_BROKER_URL": _via(REDIS_URL, redis.port),
        "SCAN_STALE_AFTER_S": str(STALE_AFTER_S),
        "SCAN_DISPATCH_AFTER_S": str(DISPATCH_AFTER_S),
        "SCAN_RETRY_AFTER_S": "2",
    }
    mine = Stack(stack.mode, env, stack.var_dir)
    api, base = start_api(env, stack.var_dir / "api-faults.log")
    worker = WorkerProcess(mine, "gpu", "faults-gpu")
    worker.start()
    with _client(base, keys["a"]) as client:
        yield Faulty(pg, redis, mine, client, worker, api)
    worker.stop()
    os.killpg(api.pid, signal.SIGTERM)
    api.wait(timeout=30)
    pg.close()
    redis.close()
    gpu_worker.start()


def _submit(f: Faulty, dataset: str, overrides: dict, key: str | None = None) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return f.client.post(
        "/v1/runs",
        headers=headers,
        json={"dataset_id": dataset, "num_clusters": 10, "preset": "small", "overrides": overrides},
    )


def _run(run_id: str) -> Run:
    with db_session() as session:
        return session.get(Run, run_id)


def _events(run_id: str, kind: str | None = None) -> list[RunEvent]:
    with db_session() as session:
        query = session.query(RunEvent).filter_by(run_id=run_id)
        if kind:
            query = query.filter_by(kind=kind)
        return query.order_by(RunEvent.id).all()


def _epoch(run_id: str, stage: str = "pretext") -> int:
    with db_session() as session:
        status = session.get(StageStatus, (run_id, stage))
        return status.epoch or 0 if status else 0


def _wait(what: str, check, timeout: float = 900, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def _wait_state(run_id: str, states=TERMINAL, timeout: float = 900) -> Run:
    return _wait(f"run {run_id} in {states}", lambda: (r := _run(run_id)) and r.state in states and r, timeout)


class _Poller:
    """GET /v1/runs/{id} in a loop through the faulty API; records every status and body shape."""

    def __init__(self, f: Faulty, run_id: str):
        self.f, self.run_id = f, run_id
        self.seen: Counter = Counter()
        self.bad: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> _Poller:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                r = self.f.client.get(f"/v1/runs/{self.run_id}", timeout=30)
            except httpx.HTTPError as exc:
                self.bad.append(f"transport error {exc!r}")
                continue
            self.seen[r.status_code] += 1
            json_body = r.headers.get("content-type", "").startswith("application/json")
            if r.status_code not in (200, 503) or not json_body or "detail" not in r.json() and r.status_code != 200:
                self.bad.append(f"{r.status_code} {r.headers.get('content-type')} {r.text[:200]}")
            elif r.status_code == 503 and not r.headers.get("retry-after"):
                self.bad.append(f"503 without Retry-After: {r.text[:200]}")
            time.sleep(0.05)


def _pretext_epochs_trained(run_id: str) -> tuple[int, int]:
    """(epochs trained in all attempts of pretext, epochs of the recipe) from the progress log."""
    done, epochs, start = set(), 0, 0
    for e in _events(run_id):  # a start of the stage opens a new segment (attempt numbers can repeat)
        start += e.kind == "stage_started" and e.stage == "pretext"
        if e.kind == "progress" and e.stage == "pretext" and e.epoch is not None and e.steps and e.step == e.steps:
            done.add((start, e.epoch))
            epochs = e.epochs or epochs
    return len(done), epochs


def test_postgres_cut_three_times_during_pretext(faulty, small_dataset):
    """Three cuts of every database connection while pretext trains: the run succeeds, at most one
    epoch is redone per cut, and a poller of the API sees only 200 and 503 JSON."""
    f = faulty
    r = _submit(f, small_dataset, LONG)
    assert r.status_code == 202, r.text
    run_id = r.json()["id"]
    with _Poller(f, run_id) as poller:
        for cut in range(3):
            reached = _wait("pretext progress", lambda cut=cut: _epoch(run_id) >= 2 * cut + 1 and _run(run_id))
            assert reached.state == "PRETEXT", f"pretext ended before cut {cut + 1}: {reached.state}"
            with f.pg.down(seconds=3):
                pass
            # The next cut only after training has moved on again.
            mark = _epoch(run_id)
            _wait(
                "training to continue after the cut",
                lambda mark=mark: _epoch(run_id) > mark or _run(run_id).state != "PRETEXT",
            )
        run = _wait_state(run_id)
    assert run.state == "SUCCEEDED", run.error
    trained, epochs = _pretext_epochs_trained(run_id)
    assert epochs == LONG["pretext.epochs"]
    assert trained - epochs <= 3, f"{trained - epochs} epochs redone for 3 cuts"
    assert not poller.bad, poller.bad[:5]
    assert poller.seen[503] >= 1, f"the poller never saw the database down: {poller.seen}"
    assert poller.seen[200] >= 1


def test_redis_cut_during_a_stage_does_not_stop_it(faulty, small_dataset):
    f = faulty
    r = _submit(f, small_dataset, LONG)
    assert r.status_code == 202, r.text
    run_id = r.json()["id"]
    _wait("pretext progress", lambda: _epoch(run_id) >= 1)
    with f.redis.down(seconds=4):
        mark = _epoch(run_id)
        # Training goes on while the broker is gone.
        _wait(
            "training to continue without the broker",
            lambda: _epoch(run_id) > mark or _run(run_id).state not in ("QUEUED", "PRETEXT"),
            timeout=600,
        )
    run = _wait_state(run_id)
    assert run.state == "SUCCEEDED", run.error
    started = [e for e in _events(run_id, "stage_started") if e.stage == "pretext"]
    assert [e.attempt for e in started] == [1], "the broker cut restarted the stage"


def test_a_lost_message_costs_latency_not_the_run(faulty, small_dataset):
    import redis

    f = faulty
    f.worker.stop()
    try:
        r = _submit(f, small_dataset, SHORT)
        assert r.status_code == 202, r.text
        run_id = r.json()["id"]
        assert _run(run_id).dispatched_at is not None
        # A Redis without persistence restarted: the queue is gone.
        redis.Redis.from_url(REDIS_URL).delete("gpu")
    finally:
        f.worker.start()
    run = _wait_state(run_id)
    assert run.state == "SUCCEEDED", run.error
    assert _events(run_id, "redispatched"), "the run was not re-sent by the dispatcher"


def test_submit_while_the_broker_is_down_is_503_then_the_same_key_works(faulty, small_dataset):
    f = faulty
    key = f"faults-{uuid.uuid4()}"
    with f.redis.down():
        r = _submit(f, small_dataset, SHORT, key=key)
        assert r.status_code == 503, r.text
        assert "broker" in r.json()["detail"] and r.headers.get("retry-after")
    with db_session() as session:
        assert session.query(Run).filter_by(idempotency_key=key).count() == 0, "a run was left under the key"
    r = _submit(f, small_dataset, SHORT, key=key)
    assert r.status_code == 202, r.text
    run = _wait_state(r.json()["id"])
    assert run.state == "SUCCEEDED", run.error
    again = _submit(f, small_dataset, SHORT, key=key)
    assert again.status_code == 200 and again.json()["id"] == run.id


def test_every_route_answers_503_json_while_the_database_is_down(faulty, small_dataset):
    f = faulty
    with f.pg.down():
        for method, path in (
            ("GET", "/v1/runs"),
            ("GET", "/v1/datasets"),
            ("GET", f"/v1/datasets/{small_dataset}"),
            ("POST", "/v1/runs"),
            ("GET", "/readyz"),
        ):
            r = f.client.request(
                method, path, json={"dataset_id": small_dataset, "num_clusters": 10} if method == "POST" else None
            )
            assert r.status_code == 503, (path, r.status_code, r.text)
            assert r.headers["content-type"].startswith("application/json") and r.json()["detail"], path
    assert f.client.get("/v1/runs").status_code == 200


def test_cancel_with_no_worker_alive_is_immediate(faulty, small_dataset):
    f = faulty
    f.worker.stop()
    try:
        queued = _submit(f, small_dataset, SHORT).json()["id"]
        t0 = time.monotonic()
        r = f.client.post(f"/v1/runs/{queued}/cancel")
        assert r.status_code == 202 and r.json()["state"] == "CANCELED", r.text
        assert time.monotonic() - t0 < 1.0
    finally:
        f.worker.start()
    # A run whose worker died mid-stage (its lease goes stale): canceled at once, not when a worker returns.
    run_id = _submit(f, small_dataset, LONG).json()["id"]
    _wait("pretext progress", lambda: _epoch(run_id) >= 1)
    f.worker.kill()
    try:
        stale = utcnow() - timedelta(seconds=STALE_AFTER_S + 1)
        # Stale, or already dropped by a dispatcher (other workers of the suite run one too).
        _wait(
            "the lease to go stale",
            lambda: (r := _run(run_id)).lease_token is None or r.heartbeat_at < stale,
            timeout=120,
        )
        t0 = time.monotonic()
        r = f.client.post(f"/v1/runs/{run_id}/cancel")
        assert r.status_code == 202 and r.json()["state"] == "CANCELED", r.text
        assert time.monotonic() - t0 < 1.0
    finally:
        f.worker.start()
    assert _run(run_id).state == "CANCELED"


def test_retry_of_a_failed_run_resumes_from_its_checkpoint(faulty, small_dataset):
    """A run that used up its attempts (max_stage_attempts=1, its worker killed) is FAILED; retry
    gives it a new budget and it resumes pretext from its last epoch checkpoint."""
    f = faulty
    f.worker.stop()
    strict = WorkerProcess(
        Stack(f.stack.mode, {**f.stack.env, "SCAN_MAX_STAGE_ATTEMPTS": "1"}, f.stack.var_dir), "gpu", "faults-strict"
    )
    strict.start()
    try:
        run_id = _submit(f, small_dataset, LONG).json()["id"]
        _wait("pretext progress", lambda: _epoch(run_id) >= 3)
        strict.kill()
        strict.start()
        run = _wait_state(run_id, timeout=300)
        assert run.state == "FAILED" and "max_stage_attempts=1" in run.error, run.error
        assert "batch_size" not in run.error  # no memory advice: nothing said it was memory
    finally:
        strict.stop()
        f.worker.start()
    epoch_at_failure = _epoch(run_id)
    assert f.client.post(f"/v1/runs/{run_id}/retry").status_code == 202
    assert f.client.post(f"/v1/runs/{run_id}/retry").status_code == 409  # no longer FAILED
    run = _wait_state(run_id)
    assert run.state == "SUCCEEDED", run.error
    retried = _events(run_id, "retried")
    assert len(retried) == 1 and "FAILED" in retried[0].message
    after = [e for e in _events(run_id, "progress") if e.id > retried[0].id and e.stage == "pretext"]
    assert after and min(e.epoch for e in after) >= epoch_at_failure, "pretext restarted from scratch"


def test_a_run_folder_refusing_writes_for_a_moment_is_retried_not_failed(faulty, small_dataset):
    """The run's checkpoint folder refuses every write for a while (chattr +i: even root gets EPERM,
    as from a read-only remount): the stage hits the disk error, waits, resumes from its checkpoint
    in the same attempt once the folder is writable again, and the run succeeds."""
    if shutil.which("chattr") is None:
        pytest.skip("needs chattr (e2fsprogs) to make a folder refuse writes")
    f = faulty
    r = _submit(f, small_dataset, LONG)
    assert r.status_code == 202, r.text
    run_id = r.json()["id"]
    _wait("pretext progress", lambda: _epoch(run_id) >= 1)
    checkpoints = Path(_run(run_id).run_dir) / "checkpoints"
    if not checkpoints.is_dir() or subprocess.run(["chattr", "+i", str(checkpoints)]).returncode != 0:
        pytest.skip(f"cannot make {checkpoints} immutable on this file system")
    errors_before = f.worker.log.read_text().count("hit a disk error")
    try:
        _wait(
            "the stage to hit the read-only folder",
            lambda: (
                f.worker.log.read_text().count("hit a disk error") > errors_before or _run(run_id).state in TERMINAL
            ),
            timeout=600,
        )
    finally:
        subprocess.run(["chattr", "-i", str(checkpoints)], check=True)
    assert f.worker.log.read_text().count("hit a disk error") > errors_before, "the fault never reached the stage"
    run = _wait_state(run_id)
    assert run.state == "SUCCEEDED", run.error
    started = [e for e in _events(run_id, "stage_started") if e.stage == "pretext"]
    assert [e.attempt for e in started] == [1], "the disk error cost an attempt"
