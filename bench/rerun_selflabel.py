"""Rerun the self-labeling stage of a finished Fashion-MNIST run with other settings, on a copy, and
report test ACC of the SCAN and the self-labelled model: how docs/fashion.md sections 12-13 compare
self-label variants from one SCAN model without paying for the pretext and clustering again.

    python bench/rerun_selflabel.py bench/out/fashion-mnist bench/out/sl-e2 --set selflabel.entropy_weight=2

The source run is left as it is; the copy holds its pretext, neighbours and SCAN model, and the
overrides are applied to the copy's config.json (validated as any run's config is).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from pydantic import ValidationError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ml.cli import parse_overrides
from ml.config import RunConfig
from ml.data import load_source
from ml.evaluate import cluster_metrics
from ml.pipeline import run_stage
from ml.predictor import Predictor

# What the self-label stage reads from a finished run; its checkpoints and outputs stay behind.
INPUTS = (
    "config.json",
    "pretext.pt",
    "features.npy",
    "neighbors.npy",
    "index.faiss",
    "metrics.json",
    "timings.json",
    "scan.pt",
    "history.json",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="a run directory whose clustering stage has finished")
    ap.add_argument("dest", type=Path, help="the copy to self-label (replaced if it exists)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--data", default="fashion-mnist")
    args = ap.parse_args()

    if not (args.source / "scan.pt").exists():
        sys.exit(f"{args.source}: no scan.pt, the clustering stage has not finished there")
    config = json.loads((args.source / "config.json").read_text())
    for key, value in parse_overrides(args.overrides).items():
        *path, last = key.split(".")
        node = config
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or last not in node:
            sys.exit(f"--set {key}: {args.source / 'config.json'} has no such field")
        node[last] = value
    try:
        RunConfig.model_validate(config)  # a bad value fails here, not mid-stage
    except ValidationError as e:
        sys.exit(f"--set: {e}")
    if args.dest.exists():
        shutil.rmtree(args.dest)
    args.dest.mkdir(parents=True)
    for name in INPUTS:
        if (args.source / name).exists():
            shutil.copy2(args.source / name, args.dest / name)
    (args.dest / "config.json").write_text(json.dumps(config, indent=1))

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
