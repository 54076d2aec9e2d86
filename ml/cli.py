"""`scan` command line: the whole pipeline on a folder of images, no server needed.

scan train digits --clusters 10 --out runs/digits --preset small
scan train digits --clusters auto --out runs/digits-auto      # K chosen in 2..20 (or --clusters 5..15)
scan evaluate runs/digits
scan predict runs/digits a.png b.jpg
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as Bar
from rich.table import Table

from ml.config import DEFAULT_PRESET

app = typer.Typer(add_completion=False, no_args_is_help=True, help="SCAN: learn to classify images without labels.")
console = Console(stderr=True)


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key.path=value` pairs; values are JSON when they parse as JSON (numbers, booleans, lists),
    strings otherwise."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            _fail(f"override {pair!r} is not of the form key.path=value")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def parse_num_clusters(text: str) -> int | str | dict[str, int]:
    """--clusters: "10", "auto", or a range "5..15" (also "5-15")."""
    text = text.strip().lower()
    if text == "auto" or text.lstrip("+-").isdigit():
        return text if text == "auto" else int(text)
    for sep in ("..", "-", ":"):
        lo, found, hi = text.partition(sep)
        if found and lo.strip().isdigit() and hi.strip().isdigit():
            return {"min": int(lo), "max": int(hi)}
    _fail(f"--clusters {text!r}: give a number (10), auto, or a range (5..15)")


def _load(source: str, split: str, cache_dir: Path | None):
    from ml.data import DataError, load_source

    try:
        return load_source(source, split=split, cache_dir=cache_dir)
    except DataError as e:
        _fail(str(e))
    except FileNotFoundError as e:
        _fail(f"{source}: {e}")


@app.command()
def train(
    source: str = typer.Argument(
        ..., help="folder, archive, .npz, IDX, CIFAR/STL folder, or a built-in name (digits, fashion-mnist)"
    ),
    clusters: str = typer.Option(
        ..., "--clusters", "-k", help='number of clusters: 10, "auto" (chosen in 2..20) or a range 5..15'
    ),
    out: Path = typer.Option(..., "--out", "-o", help="run directory"),
    preset: str = typer.Option(DEFAULT_PRESET, help="small (CPU) | cifar | stl | imagenet (see ml/config.py)"),
    set_: list[str] = typer.Option([], "--set", help="override, e.g. --set pretext.epochs=100"),
    split: str = typer.Option("train", help="split of the source to train on"),
    cache_dir: Path | None = typer.Option(Path(".cache/scan"), help="decoded-dataset cache"),
    device: str | None = typer.Option(None, help="auto | cpu | cuda"),
    seed: int | None = typer.Option(None),
    seeds: int | None = typer.Option(
        None, help="train clustering and self-labeling this many times (1-10) on one pretext: mean +- std"
    ),
) -> None:
    """Train all four SCAN stages; rerunning the same command resumes where it stopped."""
    from pydantic import ValidationError

    from ml.config import RunConfig
    from ml.pipeline import STAGES, prepare_run, run_stage

    overrides = parse_overrides(set_)
    if device:
        overrides["device"] = device
    if seed is not None:
        overrides["seed"] = seed
    if seeds is not None:
        overrides["seeds"] = seeds
    try:
        cfg = RunConfig.from_preset(preset, parse_num_clusters(clusters), overrides)
    except (ValidationError, ValueError) as e:
        _fail(f"invalid configuration: {e}")
    data = _load(source, split, cache_dir)
    console.print(
        f"{data.images.shape[0]} images {tuple(data.images.shape[1:])} from {data.source}"
        + (f", {len(data.class_names or [])} labelled classes" if data.labels is not None else "")
    )
    prepare_run(out, cfg)
    timings = {}
    for stage in STAGES:
        with Bar(
            TextColumn(f"[bold]{stage:<10}"),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=console,
        ) as bar:
            task = bar.add_task(stage, total=1.0, info="")

            def report(p, bar=bar, task=task):
                if p.epoch is None:  # a note, not progress: print it (shortcut warnings)
                    if p.message:
                        console.print(f"[yellow]{p.stage}: {p.message}")
                    return
                done = ((p.epoch - 1) + p.step / max(p.steps, 1)) / max(p.epochs, 1)
                info = f"epoch {p.epoch}/{p.epochs}"
                if p.loss is not None:
                    info += f" loss {p.loss:.4f}"
                if p.images_per_s:
                    info += f" {p.images_per_s:,.0f} img/s"
                bar.update(task, completed=min(done, 1.0), info=info)

            t0 = time.perf_counter()
            run_stage(stage, out, data, progress=report)
            bar.update(task, completed=1.0)
            timings[stage] = time.perf_counter() - t0
    _print_metrics(out, timings)


@app.command()
def evaluate(
    run_dir: Path = typer.Argument(..., help="a finished run directory"),
    source: str | None = typer.Argument(
        None, help="labelled data to evaluate on (default: the stored training metrics)"
    ),
    split: str = typer.Option("test"),
    cache_dir: Path | None = typer.Option(Path(".cache/scan")),
) -> None:
    """Print the run's metrics table, or evaluate the final model on another labelled split."""
    if source is None:
        _print_metrics(run_dir, None)
        return
    import numpy as np

    from ml.evaluate import cluster_metrics
    from ml.predictor import Predictor

    data = _load(source, split, cache_dir)
    if data.labels is None:
        _fail(f"{source}: has no labels to evaluate against")
    try:
        predictor = Predictor.load(run_dir, device="auto")
    except FileNotFoundError as e:
        _fail(str(e))
    probs = predictor.predict(np.asarray(data.images))
    metrics = cluster_metrics(probs, np.asarray(data.labels))
    print(json.dumps({k: v for k, v in metrics.items() if k != "confusion"}, indent=1))


@app.command()
def predict(
    run_dir: Path = typer.Argument(..., help="a finished run directory"),
    images: list[Path] = typer.Argument(..., help="image files"),
) -> None:
    """Cluster id, confidence and matched label for each image."""

    from ml.clusters import matched_labels, read_clusters
    from ml.data import DataError, conform_images, decode_image
    from ml.predictor import Predictor
    from ml.rundir import RunDir

    try:
        predictor = Predictor.load(run_dir, device="auto")
    except FileNotFoundError as e:
        _fail(str(e))
    decoded = []
    for path in images:
        try:
            decoded.append(decode_image(path.read_bytes(), str(path)))
        except (DataError, OSError) as e:
            _fail(str(e))
    batch = conform_images(decoded, (predictor.image_size, predictor.image_size), predictor.channels)
    probs = predictor.predict(batch)
    labels = matched_labels(read_clusters(RunDir(run_dir).clusters_path), probs.shape[1]) or []
    table = Table("image", "cluster", "confidence", "label")
    for path, p in zip(images, probs):
        c = int(p.argmax())
        label = labels[c] if c < len(labels) else None
        table.add_row(str(path), str(c), f"{p[c]:.3f}", label or "")
    Console().print(table)


def _print_metrics(run_dir: Path, timings: dict[str, float] | None) -> None:
    path = run_dir / "metrics.json"
    if not path.exists():
        _fail(f"{path} does not exist: train first")
    metrics = json.loads(path.read_text())
    table = Table(title=f"SCAN on {run_dir}")
    for col in ("method", "ACC", "NMI", "ARI", "top-5"):
        table.add_column(col)
    rows = [
        ("K-means on pretext features", metrics.get("mining", {}).get("kmeans")),
        ("SCAN", metrics.get("scan")),
        ("SCAN + self-label", metrics.get("selflabel")),
    ]
    for name, m in rows:
        if m:
            table.add_row(
                name,
                *(
                    f"{m[k]:.3f}" if isinstance(m.get(k), (int, float)) else "-"
                    for k in ("acc", "nmi", "ari", "top5_acc")
                ),
            )
    Console().print(table)
    _print_seeds(metrics.get("seeds"))
    purity = metrics.get("mining", {}).get("neighbor_purity")
    if purity is not None:
        Console().print(f"neighbour purity (K={metrics['mining']['num_neighbors']}): {purity:.3f}")
    sweep = metrics.get("num_clusters")
    if isinstance(sweep, dict) and sweep.get("curve"):
        curve = ", ".join(f"{r['k']}: {r['criterion']:.3f}" for r in sweep["curve"])
        Console().print(f"clusters: K={sweep['chosen']} chosen by {sweep['criterion']} ({curve})")
    if timings:
        Console().print("wall time: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))


def _print_seeds(seeds: dict[str, Any] | None) -> None:
    """A run over several seeds: every seed's ACC / NMI / ARI / SCAN loss, then mean +- std."""
    if not seeds:
        return
    step = "selflabel" if "selflabel" in seeds["mean"] else "scan"
    keys = [k for k in ("acc", "nmi", "ari", "scan_loss", "confident") if k in seeds["mean"][step]]
    table = Table(title=f"{seeds['n']} seeds after {'self-labeling' if step == 'selflabel' else 'SCAN'}")
    for col in ("seed", *keys):
        table.add_column(col)
    for r in seeds["runs"]:
        kept = " (kept)" if r["index"] == seeds["kept"] else ""
        table.add_row(f"{r['index'] + 1}: {r['seed']}{kept}", *(f"{r[step][k]:.4g}" for k in keys))
    table.add_row("mean +- std", *(f"{seeds['mean'][step][k]:.4g} +- {seeds['std'][step][k]:.2g}" for k in keys))
    Console().print(table)
    Console().print(f"kept: {seeds['criterion']}")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
