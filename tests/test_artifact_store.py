"""The artifact store: a folder backend and an S3 backend (against moto's S3 server, started here on
loopback), and two training workers that share nothing but the database, the broker and the bucket:
each has its own local folder, the stage killed on one is resumed on the other from the checkpoint
the first pushed."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    pytest.importorskip("moto.server", reason="moto[server] is in the test extra: pip install -e '.[test]'")
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    import boto3

    client = boto3.client("s3", endpoint_url=url)
    while True:  # no deadline: a busy machine may take a while to import moto
        try:
            client.list_buckets()
            break
        except Exception:  # noqa: BLE001 - any error means not up yet; the loop checks the process
            assert proc.poll() is None, "moto server exited"
            time.sleep(0.2)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _bucket(endpoint: str, name: str) -> str:
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["folder", "s3"])
def store(request, tmp_path, s3_endpoint):
    from app.core.artifacts import open_store

    if request.param == "folder":
        return open_store(f"file://{tmp_path / 'shared'}")
    return open_store(f"s3://{_bucket(s3_endpoint, 'b-' + str(abs(hash(tmp_path)) % 10**8))}/pre/fix", s3_endpoint)


def test_store_round_trip_and_sync_by_version(store, tmp_path):
    from app.core.artifacts import Synced

    a, b = Synced(store, tmp_path / "a"), Synced(store, tmp_path / "b")
    ckpt = tmp_path / "a" / "runs" / "r1" / "checkpoints" / "pretext.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"epoch-1")
    (tmp_path / "a" / "runs" / "r1" / "config.json").write_text("{}")
    assert a.push("runs/r1") == 2
    assert a.push("runs/r1") == 0, "nothing changed: nothing sent"
    assert set(store.versions("runs/r1")) == {"runs/r1/checkpoints/pretext.pt", "runs/r1/config.json"}
    assert store.versions("runs/r") == {}, "a prefix is a folder, not a string prefix"
    assert b.pull("runs/r1") == 2
    got = tmp_path / "b" / "runs" / "r1" / "checkpoints" / "pretext.pt"
    assert got.read_bytes() == b"epoch-1"
    # A newer checkpoint of the same size (as torch checkpoints of one model are) still travels.
    time.sleep(0.01)
    ckpt.write_bytes(b"epoch-2")
    assert a.push("runs/r1") == 1
    assert b.pull("runs/r1") == 1 and got.read_bytes() == b"epoch-2"
    # A local file newer than the store's (written here, not pushed yet) is not overwritten.
    got.write_bytes(b"epoch-3")
    assert b.pull("runs/r1") == 0 and got.read_bytes() == b"epoch-3"
    assert not any(".synced" in k for k in store.versions("runs/r1")), "the manifest stays local"
    a.delete("runs/r1")
    assert store.versions("runs/r1") == {}


def test_open_store_rejects_unknown_urls():
    from app.core.artifacts import open_store

    assert open_store("") is None
    with pytest.raises(ValueError, match="s3://bucket"):
        open_store("s3:///no-bucket")
    with pytest.raises(ValueError, match="file:///path"):
        open_store("ftp://x/y")


# The API's part (env "api"): the upload lands in its own folder, create() pushes it and queues the ingest.
API_UPLOAD = """
import io, sys
import numpy as np
from sklearn.datasets import load_digits
from app.bootstrap import migrate
from app.core.db import new_session
from app.core.settings import get_settings
from app.services import auth, datasets
settings = get_settings()
migrate(settings)
digits = load_digits()
path = datasets.upload_dir(settings, "ds1") / "digits.npz"
path.parent.mkdir(parents=True)
np.savez(path, images=(digits.images * (255 / 16)).round().astype(np.uint8), labels=digits.target)
with new_session() as session:
    tenant = auth.get_or_create_tenant(session, "t")
    session.commit()
    datasets.create(settings, tenant, "ds1", name="digits", source="digits.npz", split="train",
                    upload_path=str(path))
"""

# The cpu worker's part (env "ingest", another folder): ingest fetches the upload from the bucket.
INGEST_AND_SUBMIT = """
import json, sys
from app.core.db import new_session
from app.core.settings import get_settings
from app.services import auth, datasets, runs
settings = get_settings()
with new_session() as session:
    datasets.ingest(session, settings, "ds1")
    tenant = auth.get_or_create_tenant(session, "t")
    run, _ = runs.submit(session, settings, tenant, json.loads(sys.argv[1]), None)
    print(run.id)
"""

# The API again (env "api"): serving a run trained elsewhere fetches it, without the checkpoints.
API_SERVE = """
import sys
from app.core.db import new_session
from app.tables import Run
from app.services import runs
with new_session() as session:
    print(runs.servable_run_dir(session.get(Run, sys.argv[1])))
"""


def _python(code: str, env: dict, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _worker(env: dict, name: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers.celery_app",
            "worker",
            "-Q",
            "gpu",
            "-c",
            "1",
            "-n",
            f"{name}@%h",
            "--without-gossip",
            "--without-mingle",
        ],
        cwd=ROOT,
        env=env,
        stdout=open(log, "a"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait(what: str, ok, procs: list[subprocess.Popen], logs: list[Path]) -> None:
    """Poll without a deadline (pytest's timeout is the hang guard); fail if a worker exits."""
    while not ok():
        for p, log in zip(procs, logs):
            assert p.poll() is None, f"worker exited while waiting for {what}: {log.read_text()[-3000:]}"
        time.sleep(0.3)


def test_two_workers_with_separate_folders_finish_one_run_across_a_kill(s3_endpoint, tmp_path):
    from app.core.artifacts import open_store

    bucket = _bucket(s3_endpoint, "fleet")
    var = tmp_path / "var"  # the shared part: SQLite + the filesystem broker stand in for PostgreSQL + Redis
    base = {
        **os.environ,
        **CREDENTIALS,
        "PYTHONPATH": str(ROOT),
        "SCAN_VAR_DIR": str(var),
        "SCAN_DATABASE_URL": "",
        "SCAN_BROKER_URL": "",
        "SCAN_ARTIFACT_STORE": f"s3://{bucket}/scan",
        "SCAN_S3_ENDPOINT": s3_endpoint,
        "SCAN_HEARTBEAT_S": "1",
        "SCAN_STALE_AFTER_S": "6",
        "SCAN_RECOVER_INTERVAL_S": "1",
        "SCAN_PROGRESS_INTERVAL_S": "0.5",
    }
    env = {name: {**base, "SCAN_ARTIFACTS_DIR": str(tmp_path / name)} for name in ("api", "ingest", "a", "b")}
    body = {
        "dataset_id": "ds1",
        "num_clusters": 10,
        "preset": "small",
        "overrides": {
            "pretext.epochs": 8,
            "pretext.batch_size": 128,
            "clustering.epochs": 1,
            "clustering.num_heads": 1,
            "selflabel.epochs": 1,
        },
    }
    store = open_store(f"s3://{bucket}/scan", s3_endpoint)
    _python(API_UPLOAD, env["api"])
    assert list(store.versions("uploads/ds1")) == ["uploads/ds1/digits.npz"]
    run_id = _python(INGEST_AND_SUBMIT, env["ingest"], json.dumps(body)).split()[-1]
    assert "datasets/ds1/images.npy" in store.versions("datasets/ds1")
    assert store.versions("uploads/ds1") == {}, "the upload is deleted once ingested"
    db = sqlite3.connect(var / "scan.db")

    def pretext_epoch() -> int:
        row = db.execute("SELECT epoch FROM stage_status WHERE run_id=? AND stage='pretext'", (run_id,)).fetchone()
        return row[0] or 0

    ckpt_key = f"runs/{run_id}/checkpoints/pretext.pt"
    log_a, log_b = tmp_path / "worker-a.log", tmp_path / "worker-b.log"
    worker_a = _worker(env["a"], "a", log_a)
    try:
        # Killed once its first epoch's checkpoint is in the bucket (pushed before progress says so).
        _wait("a checkpoint in the bucket", lambda: ckpt_key in store.versions(f"runs/{run_id}"), [worker_a], [log_a])
        os.killpg(worker_a.pid, signal.SIGKILL)
        worker_a.wait()
        import torch

        pushed = torch.load(Path(store_path(store, ckpt_key, tmp_path)), weights_only=False)["epoch"]
        assert pretext_epoch() < 8 and pushed < 7, "pretext finished before the kill; make it longer"
        assert not (tmp_path / "b" / "runs" / run_id).exists()
        b_started = time.time()

        worker_b = _worker(env["b"], "b", log_b)
        try:
            _wait(
                "the run to finish",
                lambda: (
                    db.execute("SELECT state FROM runs WHERE id=?", (run_id,)).fetchone()[0]
                    in ("SUCCEEDED", "FAILED", "CANCELED")
                ),
                [worker_b],
                [log_b],
            )
        finally:
            os.killpg(worker_b.pid, signal.SIGKILL)
            worker_b.wait()
    finally:
        if worker_a.poll() is None:
            os.killpg(worker_a.pid, signal.SIGKILL)
            worker_a.wait()
    state, error = db.execute("SELECT state, error FROM runs WHERE id=?", (run_id,)).fetchone()
    assert state == "SUCCEEDED", (error, log_b.read_text()[-3000:])
    # B resumed pretext where A's pushed checkpoint left it: A's epochs were not trained again.
    history = json.loads((tmp_path / "b" / "runs" / run_id / "history.json").read_text())["pretext"]
    assert [h["epoch"] for h in history] == list(range(1, 9))
    assert all(h["time"] < b_started for h in history[: pushed + 1])
    assert all(h["time"] > b_started for h in history[pushed + 1 :])
    stored = json.loads(Path(store_path(store, f"runs/{run_id}/history.json", tmp_path)).read_text())
    assert stored["pretext"] == history
    # Every artifact of the run is in the bucket; A's folder never got past pretext.
    keys = store.versions(f"runs/{run_id}")
    for name in ("model.pt", "scan.pt", "pretext.pt", "index.faiss", "assignments.npz", "clusters.json"):
        assert f"runs/{run_id}/{name}" in keys, name
    assert not (tmp_path / "a" / "runs" / run_id / "model.pt").exists()
    assert db.execute("SELECT count(*) FROM assignments WHERE run_id=?", (run_id,)).fetchone()[0] == 1797
    served = Path(_python(API_SERVE, env["api"], run_id).strip())
    assert served == tmp_path / "api" / "runs" / run_id
    assert (served / "model.pt").is_file() and (served / "index.faiss").is_file()
    assert not (served / "checkpoints").exists() or not any((served / "checkpoints").iterdir())


def store_path(store, key: str, tmp_path: Path) -> Path:
    out = tmp_path / "fetched" / key
    store.get(key, out)
    return out
