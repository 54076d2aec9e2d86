"""Throughput of POST /predict over HTTP (16 concurrent clients) against the same model called
in-process at its best batch size, printed as a ratio (target >= 0.8), plus latency at 1 client.

    python bench/serve.py                         # ResNet-18 (CIFAR stem), 3x32x32, random weights
    python bench/serve.py --run-dir runs/digits   # a finished run of your own
    python bench/serve.py --arch convnet --size 8 --channels 1

Without --run-dir the model has random weights: throughput does not depend on what was learned,
and no training time is spent. The API runs as a real uvicorn process with its own SQLite
database in a temporary folder; the clients are threads of this process with one keep-alive
connection each, sending PNG files as multipart `files`, so decoding, conversion, the dynamic
batcher and the JSON answer are all inside the measured time. On a machine with few cores the
clients take CPU from the server; the ratio is then a lower bound.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def synthetic_run(run_dir: Path, arch: str, size: int, channels: int, clusters: int) -> Path:
    """A run directory whose models have random weights (enough for Predictor.load)."""
    import torch

    from ml.networks import ClusteringModel, ContrastiveModel, build_backbone
    from ml.saved_models import model_meta, save_clustering, save_contrastive

    torch.manual_seed(0)
    mean, std = [0.5] * channels, [0.25] * channels
    run_dir.mkdir(parents=True, exist_ok=True)
    contrastive = ContrastiveModel(build_backbone(arch, channels, mean, std))
    save_contrastive(
        run_dir / "pretext.pt",
        contrastive,
        model_meta(arch, channels, size, mean, std, hidden_dim=512, feature_dim=128, feature_space="head"),
    )
    model = ClusteringModel(build_backbone(arch, channels, mean, std), clusters, num_heads=1)
    save_clustering(
        run_dir / "model.pt", model, model_meta(arch, channels, size, mean, std, num_clusters=clusters, num_heads=1)
    )
    return run_dir


def in_process(
    run_dir: Path, device: str, images: np.ndarray, batch_sizes: list[int], seconds: float
) -> dict[int, float]:
    from ml.predictor import Predictor

    p = Predictor.load(run_dir, device=device)
    out = {}
    for bs in batch_sizes:
        batch = images[:bs]
        p.predict(batch)  # warm-up (allocations, cudnn autotune)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            p.predict(batch)
            n += bs
        out[bs] = n / (time.perf_counter() - t0)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def register_run(var_dir: Path, run_dir: Path, size: int, channels: int, clusters: int) -> tuple[str, str]:
    """Migrate a fresh SQLite database and add a tenant, a dataset and a SUCCEEDED run row."""
    os.environ["SCAN_VAR_DIR"] = str(var_dir)
    from app.bootstrap import migrate
    from app.core import db
    from app.core.db import session_scope
    from app.core.settings import get_settings

    # Settings and engine are cached per process: drop them so this var_dir is the one used.
    get_settings.cache_clear()
    db.get_engine.cache_clear()
    db._factory.cache_clear()
    from app.services.auth import create_key, tenant_for_key
    from app.tables import Dataset, DatasetState, Run, RunState

    migrate(get_settings())
    with session_scope() as session:
        key = create_key(session, "bench")
        tenant = tenant_for_key(session, key)
        dataset = Dataset(
            tenant_id=tenant.id,
            name="bench",
            source="bench",
            state=DatasetState.READY,
            count=0,
            height=size,
            width=size,
            channels=channels,
        )
        session.add(dataset)
        session.flush()
        run = Run(
            tenant_id=tenant.id,
            dataset_id=dataset.id,
            num_clusters=clusters,
            preset="bench",
            overrides={},
            config={},
            state=RunState.SUCCEEDED,
            run_dir=str(run_dir),
        )
        session.add(run)
        session.flush()
        return key, run.id


def start_api(var_dir: Path, env_extra: dict[str, str]) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    env = {**os.environ, "SCAN_VAR_DIR": str(var_dir), **env_extra}
    log = open(var_dir / "api.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "app.main:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(base + "/livez", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("API did not start:\n" + (var_dir / "api.log").read_text()[-3000:])
        time.sleep(0.3)


def png_files(images: np.ndarray) -> list[bytes]:
    from PIL import Image

    out = []
    for chw in images:
        hwc = chw[0] if chw.shape[0] == 1 else chw.transpose(1, 2, 0)
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(hwc)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def http_throughput(
    base: str, key: str, run_id: str, pngs: list[bytes], clients: int, per_request: int, seconds: float
) -> tuple[float, list[float]]:
    import httpx

    url = f"/v1/runs/{run_id}/predict"
    stop = time.perf_counter() + seconds
    counts = [0] * clients
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    start = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=120) as http:
            i = c
            start.wait()
            while time.perf_counter() < stop:
                files = [("files", (f"{j}.png", pngs[(i + j) % len(pngs)], "image/png")) for j in range(per_request)]
                t0 = time.perf_counter()
                r = http.post(url, files=files)
                latencies[c].append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors.append(r.text)
                    return
                counts[c] += per_request
                i += per_request

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"/predict failed: {errors[0]}")
    return sum(counts) / elapsed, [x for lat in latencies for x in lat]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", type=Path, help="a finished run (default: a random-weight model)")
    ap.add_argument("--arch", default="resnet18_cifar")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3, choices=(1, 3))
    ap.add_argument("--clusters", type=int, default=10)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument(
        "--per-request", type=int, nargs="+", default=[1, 8], help="images per HTTP request (each value is measured)"
    )
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16, 32, 64, 128, 256])
    ap.add_argument("--max-batch-size", type=int, default=64, help="the server's predict_max_batch_size")
    ap.add_argument("--max-delay-ms", type=float, default=5.0, help="the server's predict_max_delay_ms")
    args = ap.parse_args()

    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    if args.run_dir:
        from ml.predictor import Predictor

        p = Predictor.load(args.run_dir, device="cpu")
        size, channels, clusters, run_dir = p.image_size, p.channels, p.num_clusters, args.run_dir.resolve()
        what = f"run {run_dir}"
    else:
        size, channels, clusters = args.size, args.channels, args.clusters
        run_dir = synthetic_run(tmp / "run", args.arch, size, channels, clusters)
        what = f"{args.arch}, random weights"
    images = np.random.default_rng(0).integers(
        0, 256, (max(512, max(args.batch_sizes)), channels, size, size), dtype=np.uint8
    )

    print(
        f"model: {what}; input {channels}x{size}x{size}; device {device}; "
        f"{os.cpu_count()} CPUs; torch threads {torch.get_num_threads()}"
    )
    ips = in_process(run_dir, device, images, args.batch_sizes, seconds=max(1.0, args.seconds / 5))
    best_bs = max(ips, key=ips.get)
    print(
        "in-process Predictor.predict, images/s by batch size: " + ", ".join(f"{bs}: {v:,.0f}" for bs, v in ips.items())
    )
    print(f"in-process best: {ips[best_bs]:,.0f} images/s at batch {best_bs}")

    key, run_id = register_run(tmp / "var", run_dir, size, channels, clusters)
    proc, base = start_api(
        tmp / "var",
        {
            "SCAN_PREDICT_MAX_BATCH_SIZE": str(args.max_batch_size),
            "SCAN_PREDICT_MAX_DELAY_MS": str(args.max_delay_ms),
            "SCAN_SERVING_DEVICE": device,
        },
    )
    try:
        pngs = png_files(images[:256])
        http_throughput(base, key, run_id, pngs, 1, 1, 2.0)  # load the model, warm up
        _, lat = http_throughput(base, key, run_id, pngs, 1, 1, max(2.0, args.seconds / 2))
        lat_ms = np.array(lat) * 1000
        print(
            f"1 client, 1 image/request: p50 {np.percentile(lat_ms, 50):.1f} ms, "
            f"p99 {np.percentile(lat_ms, 99):.1f} ms ({len(lat_ms)} requests)"
        )
        rates = {}
        for per in args.per_request:
            rate, lat = http_throughput(base, key, run_id, pngs, args.clients, per, args.seconds)
            lat_ms = np.array(lat) * 1000
            rates[per] = rate
            print(
                f"HTTP /predict, {args.clients} clients x {per} image(s)/request: {rate:,.0f} images/s, "
                f"p50 {np.percentile(lat_ms, 50):.1f} ms, p99 {np.percentile(lat_ms, 99):.1f} ms"
            )
        # Measure the baseline again after the HTTP runs (server idle) and keep the better figure:
        # on a shared machine load drifts, and the ratio must not flatter the server.
        again = in_process(run_dir, device, images, args.batch_sizes, seconds=max(1.0, args.seconds / 5))
        ips = {bs: max(ips[bs], again[bs]) for bs in ips}
        best_bs = max(ips, key=ips.get)
        print(f"in-process best (max of two measurements): {ips[best_bs]:,.0f} images/s at batch {best_bs}")
        for per, rate in rates.items():
            ratio = rate / ips[best_bs]
            print(
                f"RATIO HTTP ({args.clients} clients x {per} image(s)/request) / in-process best = {ratio:.2f} "
                f"(target >= 0.8: {'met' if ratio >= 0.8 else 'NOT met'})"
            )
        metrics = __import__("httpx").get(base + "/metrics").text
        count = _sample(metrics, "scan_predict_batch_size_count")
        total = _sample(metrics, "scan_predict_batch_size_sum")
        if count:
            print(
                f"dynamic batcher: {count:,.0f} model calls, mean batch {total / count:.1f} images "
                f"(max_batch_size {args.max_batch_size}, max_delay_ms {args.max_delay_ms})"
            )
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


if __name__ == "__main__":
    main()
