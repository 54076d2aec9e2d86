"""Soak: submit runs to the PostgreSQL + Redis stack while workers are SIGKILLed and the database and
broker connections are cut for seconds, at random times; count what survives.

    SCAN_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/chaos SCAN_BROKER_URL=redis://127.0.0.1:6379/8 \\
        python bench/chaos.py --runs 6 --faults 9 --seed 1

The database named must be one this soak may own (it is migrated, never emptied). The API and the
workers it starts reach PostgreSQL and Redis through TCP proxies of this process (the same proxy as
tests/service/test_faults.py), so the machine's servers are never restarted. Prints runs submitted
/ succeeded / lost / failed (failed by the infrastructure vs by the run itself), epochs redone per
fault, and the status codes a poller of GET /v1/runs/{id} saw; the goal is 0 lost, 0 failed by the
infrastructure, 0 plain-text 500s. Every API call goes through scan_client: the submitter with its
retries (503 after Retry-After, with an Idempotency-Key so a resent submit makes no second run), the
poller with none, so that it sees every status the API answers.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402 - after the sys.path line, like the other benches

from app.schemas.runs import RunOut  # noqa: E402
from scan_client import ApiError, Client  # noqa: E402
from tests.service.tcp_proxy import TcpProxy  # noqa: E402

TERMINAL = ("SUCCEEDED", "FAILED", "CANCELED")
RECIPE = {
    "pretext.epochs": 8,
    "pretext.batch_size": 120,
    "clustering.epochs": 3,
    "clustering.num_heads": 2,
    "selflabel.epochs": 2,
}
# Words of the infrastructure in a run's error: such a failure is what this soak must never see.
INFRA_WORDS = (
    "OperationalError",
    "ConnectionError",
    "AdminShutdown",
    "unreachable",
    "max_stage_attempts",
    "connection",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _via(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = (parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else "") + f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


class Proc:
    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        self.args, self.env, self.log = args, env, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        out = open(self.log, "a")
        self.proc = subprocess.Popen(
            self.args, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def _worker(name: str, queue: str, env: dict[str, str], var: Path) -> Proc:
    return Proc(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers.celery_app",
            "worker",
            "-Q",
            queue,
            "-c",
            "1",
            "-P",
            "prefork",
            "-n",
            f"{name}@%h",
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
        ],
        env,
        var / f"worker-{name}.log",
    )


def _digits_npz(n: int) -> bytes:
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    buf = io.BytesIO()
    np.savez(
        buf, images=(digits.images[:n] * (255 / 16)).round().astype(np.uint8), labels=digits.target[:n].astype(np.int64)
    )
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument(
        "--faults",
        type=int,
        default=9,
        help="faults injected in all (kills, database cuts, broker cuts, in random order)",
    )
    ap.add_argument("--gap", type=float, nargs=2, default=(6.0, 15.0), help="seconds between faults (uniform)")
    ap.add_argument("--outage", type=float, nargs=2, default=(1.0, 4.0), help="seconds a cut lasts (uniform)")
    ap.add_argument("--gpu-workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800, help="give up on runs after this many seconds")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)

    pg_url = os.environ.get("SCAN_DATABASE_URL", "")
    redis_url = os.environ.get("SCAN_BROKER_URL", "")
    if not pg_url.startswith("postgres") or not redis_url.startswith("redis"):
        sys.exit(
            "set SCAN_DATABASE_URL (postgresql://...) and SCAN_BROKER_URL (redis://...) to a database "
            "and a Redis db this soak may use"
        )
    var = Path(tempfile.mkdtemp(prefix="scan-chaos-"))
    pg_target, redis_target = urlsplit(pg_url), urlsplit(redis_url)
    pg = TcpProxy(pg_target.hostname or "127.0.0.1", pg_target.port or 5432).start()
    rd = TcpProxy(redis_target.hostname or "127.0.0.1", redis_target.port or 6379).start()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        "SCAN_VAR_DIR": str(var),
        "SCAN_DATABASE_URL": _via(pg_url, pg.port),
        "SCAN_BROKER_URL": _via(redis_url, rd.port),
        "SCAN_HEARTBEAT_S": "1",
        "SCAN_STALE_AFTER_S": "10",
        "SCAN_RECOVER_INTERVAL_S": "1",
        "SCAN_DISPATCH_AFTER_S": "5",
        "SCAN_PROGRESS_INTERVAL_S": "0.5",
        "SCAN_MAX_STAGE_ATTEMPTS": "6",
    }
    os.environ.update({k: v for k, v in env.items() if k.startswith("SCAN_")})
    # This process (setup, reading the outcome) talks to the servers directly, not through the proxies.
    os.environ["SCAN_DATABASE_URL"], os.environ["SCAN_BROKER_URL"] = pg_url, redis_url

    from app.bootstrap import migrate
    from app.core.db import new_session
    from app.core.settings import get_settings
    from app.services.auth import create_key

    migrate(get_settings())
    with new_session() as session:
        key = create_key(session, f"chaos-{uuid.uuid4().hex[:8]}")
        session.commit()

    port = _free_port()
    api = Proc(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)],
        env,
        var / "api.log",
    )
    cpu = _worker("chaos-cpu", "cpu", env, var)
    gpus = [_worker(f"chaos-gpu{i}", "gpu", env, var) for i in range(args.gpu_workers)]
    procs = [api, cpu, *gpus]
    for p in procs:
        p.start()
    base = f"http://127.0.0.1:{port}"
    answered_503 = Counter()

    def count_503(response: httpx.Response) -> None:
        if response.status_code == 503:
            answered_503[response.request.method, response.request.url.path] += 1

    http = httpx.Client(
        base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=120, event_hooks={"response": [count_503]}
    )
    scan = Client(http=http, retries=20, max_retry_wait=5)
    probe = Client(base, key, timeout=30, retries=0)  # the poller: every answer counted, none retried
    try:
        _wait_http(base)
        dataset = scan.upload_dataset(_digits_npz(360), filename="digits360.npz", name="chaos")
        while dataset.state != "READY":
            time.sleep(0.5)
            dataset = scan.get_dataset(dataset.id)
        report = _soak(args, rng, scan, probe, dataset.id, pg, rd, gpus, answered_503)
    finally:
        for p in procs:
            p.stop()
        pg.close()
        rd.close()
        http.close()
        probe.close()
    print(f"\nlogs: {var}")
    sys.exit(0 if report else 1)


def _wait_http(base: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/livez", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit("the API did not start")


def _soak(
    args,
    rng: random.Random,
    scan: Client,
    probe: Client,
    dataset: str,
    pg: TcpProxy,
    rd: TcpProxy,
    gpus: list[Proc],
    answered_503: Counter,
) -> bool:
    polls: Counter = Counter()
    plain_500 = 0
    stop = threading.Event()
    ids: list[str] = []

    def submit(i: int) -> None:
        key = f"chaos-{uuid.uuid4()}"  # the same key on every resend: at most one run per submit
        while not stop.is_set():
            try:
                ids.append(scan.create_run(dataset, 10, preset="small", overrides=RECIPE, idempotency_key=key).id)
                return
            except (ApiError, httpx.HTTPError):  # retries spent, or a POST whose connection broke
                time.sleep(1)

    def poll() -> None:
        nonlocal plain_500
        while not stop.is_set():
            if ids:
                try:
                    probe.get_run(rng.choice(ids))
                    polls[200] += 1
                except ApiError as err:
                    polls[err.status_code] += 1
                    ctype = err.response.headers.get("content-type", "")
                    plain_500 += err.status_code >= 500 and not ctype.startswith("application/json")
                except httpx.HTTPError as exc:
                    polls[type(exc).__name__] += 1
            time.sleep(0.2)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    faults: Counter = Counter()
    t0 = time.monotonic()
    for i in range(args.runs):
        submit(i)
    for n in range(args.faults):
        time.sleep(rng.uniform(*args.gap))
        kind = rng.choice(("kill", "database", "broker"))
        outage = rng.uniform(*args.outage)
        if kind == "kill":
            worker = rng.choice(gpus)
            worker.kill()
            time.sleep(outage)
            worker.start()
        else:
            with (pg if kind == "database" else rd).down(outage):
                pass
        faults[kind] += 1
        print(f"[{time.monotonic() - t0:6.1f}s] fault {n + 1}/{args.faults}: {kind} for {outage:.1f}s", flush=True)
        if n == args.faults // 2:  # one more submit in the middle of the storm, through whatever is down
            submit(args.runs)
    states: dict[str, RunOut] = {}
    deadline = t0 + args.timeout
    while time.monotonic() < deadline:
        for run_id in ids:
            try:
                states[run_id] = scan.get_run(run_id)
            except (ApiError, httpx.HTTPError):
                continue
        if len(states) == len(ids) and all(s.state in TERMINAL for s in states.values()):
            break
        time.sleep(2)
    stop.set()
    poller.join(timeout=30)

    counts = Counter(s.state for s in states.values())
    unfinished = [i for i in ids if i not in states or states[i].state not in TERMINAL]
    failed = [s for s in states.values() if s.state == "FAILED"]
    by_infra = [s for s in failed if any(w in (s.error or "") for w in INFRA_WORDS)]
    redone, needed = _epochs(scan, ids)
    submitted = args.runs + 1
    lost = submitted - len(ids) + len(unfinished)
    submit_503 = answered_503["POST", "/v1/runs"]
    print(f"\nfaults: {dict(faults)} in {time.monotonic() - t0:.0f}s")
    print(
        f"runs submitted {submitted} | accepted {len(ids)} (503s answered on the way: {submit_503}) | "
        f"succeeded {counts['SUCCEEDED']} | lost {lost} | failed {len(failed)} "
        f"(by infrastructure {len(by_infra)}) | canceled {counts['CANCELED']}"
    )
    for s in failed:
        print(f"  failed {s.id}: {s.error}")
    total_faults = sum(faults.values()) or 1
    print(
        f"epochs trained {needed + redone}, needed {needed}, redone {redone} -> "
        f"{redone / total_faults:.2f} epochs redone per fault"
    )
    print(f"poller saw: {dict(polls)}; plain-text 500s: {plain_500}")
    ok = lost == 0 and not by_infra and plain_500 == 0
    print(f"goal 0 lost, 0 failed by infrastructure, 0 plain 500s: {'MET' if ok else 'NOT MET'}")
    return ok


def _epochs(scan: Client, ids: list[str]) -> tuple[int, int]:
    """(epochs redone, epochs needed) over all runs, from their progress logs: an epoch is trained
    once per start of its stage (a ``stage_started`` event) that reported the epoch's last step."""
    redone = needed = 0
    for run_id in ids:
        trained: set[tuple] = set()
        after, segment = 0, 0
        while True:
            try:
                page = scan.events(run_id, after=after, limit=1000)
            except ApiError:
                break
            for e in page.items:
                segment += e.kind == "stage_started"
                if e.kind == "progress" and e.epoch and e.steps and e.step == e.steps:
                    trained.add((e.stage, segment, e.epoch))
            if not page.items:
                break
            after = page.next_after
        distinct = {(stage, epoch) for stage, _, epoch in trained}
        redone += len(trained) - len(distinct)
        needed += len(distinct)
    return redone, needed


if __name__ == "__main__":
    main()
