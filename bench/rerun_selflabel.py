"""Rerun the self-labeling stage of a finished Fashion-MNIST run with other settings, on a copy, and
report test ACC of the SCAN and the self-labelled model: how docs/fashion.md sections 12-14 compare
self-label variants from one SCAN model without paying for the pretext and clustering again.

    python bench/rerun_selflabel.py bench/out/fashion-mnist bench/out/sl-e2 --set selflabel.entropy_weight=2

The source run is left as it is; the copy holds its pretext, neighbours and SCAN model, and the
overrides are applied to the copy's config.json (validated as any run's config is).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ml.cli import parse_overrides
from ml.config import RunConfig
from ml.data import load_source
from ml.evaluate import cluster_metrics
from ml.pipeline import load_config, prepare_run, run_stage
from ml.predictor import Predictor
from ml.rundir import RunDir


# What the self-label stage reads from a finished run (its config is written anew, with the
# overrides); the run's checkpoints and outputs stay behind.
def _inputs(run: RunDir) -> list[Path]:
    return [
        run.pretext_path,
        run.features_path,
        run.neighbors_path,
        run.index_path,
        run.metrics_path,
        run.timings_path,
        run.scan_model_path,
        run.history_path,
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="a run directory whose clustering stage has finished")
    ap.add_argument("dest", type=Path, help="the copy to self-label (replaced if it exists)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--data", default="fashion-mnist")
    args = ap.parse_args()

    source = RunDir(args.source)
    if not source.scan_model_path.exists():
        sys.exit(f"{args.source}: no scan.pt, the clustering stage has not finished there")
    base = load_config(args.source)
    try:  # a bad key or value fails here, before anything is copied
        overrides = {**base.overrides(), **parse_overrides(args.overrides)}
        cfg = RunConfig.from_preset(base.preset, base.num_clusters_asked, overrides)
        if base.num_clusters_chosen is not None:
            cfg = cfg.with_chosen_k(base.num_clusters_chosen)
    except ValueError as e:  # pydantic's ValidationError included
        sys.exit(f"--set: {e}")
    if args.dest.exists():
        shutil.rmtree(args.dest)
    dest = prepare_run(args.dest, cfg)
    for path in _inputs(source):
        if path.exists():
            shutil.copy2(path, dest.path / path.name)

    train = load_source(args.data, split="train", cache_dir=Path(".cache/scan"))
    test = load_source(args.data, split="test", cache_dir=Path(".cache/scan"))
    t0 = time.perf_counter()
    run_stage("selflabel", args.dest, train, progress=_epoch_printer)
    print(f"selflabel: {time.perf_counter() - t0:.0f}s")
    images, labels = np.asarray(test.images), np.asarray(test.labels)
    for model in ("scan", "final"):
        m = cluster_metrics(Predictor.load(args.dest, model=model).predict(images), labels)
        print(f"{model:<6} test ACC {m['acc']:.4f} NMI {m['nmi']:.4f} ARI {m['ari']:.4f}", flush=True)


def _epoch_printer(p) -> None:
    if p.epoch_end:
        acc = p.metrics.get("acc")
        acc = f" train ACC {acc:.4f}" if acc is not None else ""
        print(f"epoch {p.epoch}/{p.epochs} confident {p.metrics.get('confident')}{acc}", flush=True)


if __name__ == "__main__":
    main()
