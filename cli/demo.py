"""`make demo`: from a fresh clone to a trained model behind a running API, in one command.

1. creates ./var/, applies the migrations, creates the first API key (var/api-key.txt);
2. starts the API (uvicorn) and two Celery workers (queue gpu: training, queue cpu: ingest) in
   embedded mode: SQLite and the filesystem broker, no servers;
3. imports `digits` (and `fashion-mnist` when Debian's package put it in /usr/share/datasets, import
   only: training it on a laptop CPU takes far longer than a demo should);
4. trains a run on digits through the API (all calls through `scan_client`), with a progress bar
   moved by the run's Server-Sent Events;
5. prints the metrics and one /predict answer, then keeps the server running and prints its URLs.

Rerunning it reuses the demo's own dataset and finished run (their ids are kept in var/demo.json;
the run is found again by its Idempotency-Key), whatever datasets and runs the user created since,
and answers within seconds. SIGTERM or Ctrl-C stops the API and the workers and exits 0, with no
traceback: a worker still training gets a grace period, then SIGKILL (its stage resumes later from
the last checkpoint).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from app.bootstrap import ensure_first_key, migrate
from app.core.settings import get_settings
from app.schemas.datasets import DatasetOut
from app.schemas.runs import RunOut
from ml.stages import STAGES, stage_fraction
from scan_client import ApiError, Client

console = Console()
ROOT = Path(__file__).resolve().parent.parent
FASHION = Path("/usr/share/datasets/fashion-mnist")


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) != 0


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(args, cwd=ROOT, stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True)


def _wait_ready(base: str, procs: list[subprocess.Popen], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/readyz", timeout=3).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if any(p.poll() is not None for p in procs):
            raise SystemExit("the API or the worker exited; see var/logs/")
        time.sleep(0.5)
    raise SystemExit(f"API not ready after {timeout:.0f}s; see var/logs/api.log")


def _import(scan: Client, source: str, memory: Path) -> DatasetOut:
    """The demo's own import of `source`: the one it made before (remembered in `memory`) while it is
    still READY, never a dataset the user imported since (a different id would retrain the run)."""
    known = json.loads(memory.read_text()) if memory.exists() else {}
    dataset_id = known.get("datasets", {}).get(source)
    if dataset_id:
        try:
            dataset = scan.get_dataset(dataset_id)
            if dataset.state == "READY":
                return dataset
        except ApiError:
            pass  # deleted since: import again
    with console.status(f"importing {source} ..."):
        try:
            dataset = scan.import_dataset(source, name=f"demo-{source}")
        except ApiError as exc:
            raise SystemExit(f"import of {source} failed: {exc.detail}") from None
    known.setdefault("datasets", {})[source] = dataset.id
    memory.write_text(json.dumps(known, indent=1))
    return dataset


def _stop(procs: list[subprocess.Popen], grace: float = 20.0) -> None:
    """SIGTERM every child group; whatever still runs after `grace` seconds (a worker finishing a
    training step) is SIGKILLed. Never raises: stopping must not end in a traceback."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def _train(scan: Client, dataset: DatasetOut, overrides: dict) -> RunOut:
    try:
        run = scan.create_run(
            dataset.id,
            10,
            preset="small",
            overrides=overrides,
            idempotency_key=f"demo-{dataset.id}-{sorted(overrides.items())}",
        )
    except ApiError as exc:
        raise SystemExit(f"could not start the run: {exc.detail}") from None
    columns = (
        TextColumn("{task.description:<10}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as bar:
        tasks = {s: bar.add_task(s, total=1, info="waiting") for s in STAGES}

        def show(run: RunOut) -> None:
            for s in run.stages:
                done = 1.0 if s.state == "SUCCEEDED" else stage_fraction(s.epoch, s.epochs, s.step, s.steps)
                info = s.state.lower()
                if s.state in ("RUNNING", "SUCCEEDED") and s.epochs:
                    info = f"epoch {s.epoch or 0}/{s.epochs}"
                    if s.loss is not None:
                        info += f"  loss {s.loss:.3f}"
                    if s.images_per_s and s.state == "RUNNING":
                        info += f"  {s.images_per_s:.0f} img/s  ETA {s.eta_s or 0:.0f}s"
                bar.update(tasks[s.stage], total=1, completed=done, info=info)

        show(run)
        # The run's events as they happen (SSE): each one moves the bars; the stream ends with the run.
        for _event in scan.follow_events(run.id):
            show(scan.get_run(run.id))
        run = scan.wait_for_run(run.id)
        show(run)
        return run


def _print_metrics(scan: Client, run: RunOut) -> None:
    metrics = scan.metrics(run.id).metrics
    final = metrics.get(metrics.get("final", "selflabel"), {})
    mining = metrics.get("mining", {})
    table = Table(title="digits: clustering quality (labels used only to score)")
    for col in ("", "ACC", "NMI", "ARI", "top-5"):
        table.add_column(col)

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    table.add_row("SCAN", *(fmt(final.get(k)) for k in ("acc", "nmi", "ari", "top5_acc")))
    km = mining.get("kmeans", {})
    table.add_row("K-means on pretext features", *(fmt(km.get(k)) for k in ("acc", "nmi", "ari")), "-")
    console.print(table)
    if "neighbor_purity" in mining:
        console.print(f"neighbour purity (K={mining.get('num_neighbors')}): {mining['neighbor_purity']:.3f}")


def _predict_one(scan: Client, dataset: DatasetOut, run: RunOut) -> None:
    png = scan.request("GET", f"/v1/datasets/{dataset.id}/items/0.png").content
    try:
        answer = scan.predict(run.id, [png])
    except ApiError as exc:
        console.print(f"/predict answered {exc.status_code}: {exc.detail[:200]}")
        return
    console.print("[bold]POST /v1/runs/{id}/predict[/] with item 0 of digits:")
    console.print_json(answer.model_dump_json(exclude_none=True))


def _worker_args(queue: str) -> list[str]:
    celery = f"-m celery -A workers.celery_app worker -Q {queue} -c 1 -n {queue}@%h --loglevel INFO"
    return [sys.executable, *celery.split()]


def _start_stack(host: str, port: int, logs: Path) -> tuple[str, list[subprocess.Popen]]:
    """The API on the first free port from `port`, and two workers, as in production: ingest (cpu)
    never waits behind a training stage (gpu)."""
    while not _port_free(host, port):
        port += 1
    api = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", host, "--port", str(port)]
    procs = [_spawn(api, logs / "api.log")]
    procs += [_spawn(_worker_args(queue), logs / f"worker-{queue}.log") for queue in ("gpu", "cpu")]
    return f"http://{host}:{port}", procs


def _stop_on_signals(procs: list[subprocess.Popen]):
    """SIGTERM and Ctrl-C both stop the children and exit 0: no KeyboardInterrupt traceback."""

    def stop(*_: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not interrupt the stopping
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        console.print("\nstopping the API and the workers ...")
        _stop(procs)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return stop


def _import_datasets(scan: Client, memory: Path, fashion: bool) -> DatasetOut:
    digits = _import(scan, "digits", memory)
    console.print(
        f"digits: {digits.count} images {digits.height}x{digits.width}, {len(digits.class_names or [])} classes"
    )
    if fashion and FASHION.exists():
        fm = _import(scan, "fashion-mnist", memory)
        console.print(f"fashion-mnist: {fm.count} images imported (train it with POST /v1/runs)")
    return digits


def _print_ready(base: str, key_file: Path, seconds: float) -> None:
    console.print(
        f"\n[bold green]Ready[/] in {seconds:.0f}s.  API: {base}   docs: {base}/docs   UI: {base}/ui   key: {key_file}"
    )
    console.print(f'try: curl -H "Authorization: Bearer $(cat {key_file})" {base}/v1/runs')


def _serve(procs: list[subprocess.Popen], base: str) -> None:
    console.print("The server keeps running; Ctrl-C stops it.")
    console.print(f"[bold]Cluster browser:[/] {base}/ui")
    while all(p.poll() is None for p in procs):
        time.sleep(1)
    raise SystemExit("the API or the worker exited; see var/logs/")


# The digits recipe of bench/digits.py: ACC >= 0.85 in about 1.5 minutes on 2 idle CPU cores.
def main(
    pretext_epochs: int = typer.Option(60, help="SimCLR epochs (the paper uses 500 on CIFAR)"),
    clustering_epochs: int = typer.Option(40),
    selflabel_epochs: int = typer.Option(5),
    fashion: bool = typer.Option(True, help="also import Fashion-MNIST when Debian's package is there"),
    exit_after: bool = typer.Option(False, "--exit", help="stop the servers instead of leaving them up"),
) -> None:
    t0 = time.monotonic()
    settings = get_settings()
    settings.make_dirs()
    migrate(settings)
    written = ensure_first_key(settings)
    key = settings.api_key_file.read_text().strip()
    console.print(
        f"[bold]SCAN demo[/] ({'embedded: SQLite + filesystem broker' if settings.embedded else 'services'})"
        f"; API key {'created in' if written else 'read from'} {settings.api_key_file}"
    )
    logs = settings.var_dir / "logs"
    base, procs = _start_stack(settings.api_host, settings.api_port, logs)
    stop = _stop_on_signals(procs)
    try:
        _wait_ready(base, procs)
        console.print(f"API up at {base} after {time.monotonic() - t0:.1f}s (logs in {logs})")
        scan = Client(base, key, timeout=900)
        digits = _import_datasets(scan, settings.var_dir / "demo.json", fashion)
        t1 = time.monotonic()
        recipe = {
            "pretext.epochs": pretext_epochs,
            "clustering.epochs": clustering_epochs,
            "clustering.batch_size": 128,
            "selflabel.epochs": selflabel_epochs,
            "selflabel.batch_size": 256,
        }
        run = _train(scan, digits, recipe)
        if run.state != "SUCCEEDED":
            raise SystemExit(f"run {run.id} ended {run.state}: {run.error}")
        console.print(f"run {run.id} SUCCEEDED in {time.monotonic() - t1:.0f}s")
        _print_metrics(scan, run)
        _predict_one(scan, digits, run)
        _print_ready(base, settings.api_key_file, time.monotonic() - t0)
        if exit_after:
            stop()
        _serve(procs, base)
    except BaseException:
        _stop(procs)
        raise


if __name__ == "__main__":
    typer.run(main)
