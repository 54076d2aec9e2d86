"""What each preset costs per 10k images on this machine, and how far the estimate is from a real run.

    python bench/recipe_cost.py                  # calibrate, print the table, then a real check run
    python bench/recipe_cost.py --no-check       # the table only

1. Calibrates this machine's device exactly as a worker does at start (`ml/calibrate.py`, no cache).
2. Prints, per preset at its usual image size, the estimated minutes per stage for 10,000 images
   (ml/estimate.py; self-labeling is an upper bound: it stops on a plateau).
3. Trains the `small` preset with a few epochs per stage on digits (upsampled to --image-size) and
   prints, per stage, measured seconds / estimated seconds in the same invocation: the figure that
   says how far to trust the table on this machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ml import estimate as est
from ml.calibrate import calibrate
from ml.config import RunConfig

# preset -> (image size, channels) it is meant for
PRESET_DATA = {"small": (28, 1), "cifar": (32, 3), "stl": (96, 3), "imagenet": (224, 3)}
CHECK = {"pretext.epochs": 3, "clustering.epochs": 3, "selflabel.epochs": 2, "selflabel.patience": 5, "seed": 0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--image-size", type=int, default=28)
    args = ap.parse_args()
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    t0 = time.perf_counter()
    cal = calibrate()
    print(f"calibration ({time.perf_counter() - t0:.0f} s): {cal['name']}, {cal['memory_bytes'] / 2**30:.0f} GiB")
    for arch, v in cal["train_images_per_s"].items():
        print(f"  {arch:15s} {v:8.1f} training images/s at {est.REF_SIZE} px")
    device = est.Device(
        cal["kind"], cal["name"], est.usable_memory(cal["kind"], cal["memory_bytes"]), cal["train_images_per_s"]
    )

    print("\nestimated minutes per 10k images (self-labeling: at most)")
    print(f"{'preset':9s} {'size':>5s} {'pretext':>9s} {'mining':>8s} {'cluster':>8s} {'selflabel':>9s} {'total':>9s}")
    for preset, (size, _channels) in PRESET_DATA.items():
        cfg = RunConfig.from_preset(preset, 10)
        e = est.estimate(cfg, 10_000, size, device)
        m = {k: v / 60 for k, v in e["stages_s"].items()}
        print(
            f"{preset:9s} {e['image_size']:5d} {m['pretext']:9.1f} {m['mining']:8.2f} {m['clustering']:8.1f} "
            f"{m['selflabel']:9.1f} {e['total_s'] / 60:9.1f}"
        )
    if args.no_check:
        return 0

    from ml.data import load_source
    from ml.pipeline import STAGES, prepare_run, run_stage

    data = load_source("digits")
    cfg = RunConfig.from_preset("small", 10, {**CHECK, "image_size": args.image_size})
    n, native = data.images.shape[0], data.images.shape[-1]
    want = est.estimate(cfg, n, native, device)["stages_s"]
    print(f"\ncheck run: small preset, {CHECK}, {n} digits at {args.image_size} px")
    with tempfile.TemporaryDirectory() as tmp:
        prepare_run(Path(tmp), cfg)
        total_m = total_e = 0.0
        for stage in STAGES:
            t = time.perf_counter()
            run_stage(stage, Path(tmp), data)
            took = time.perf_counter() - t
            total_m, total_e = total_m + took, total_e + want[stage]
            print(
                f"  {stage:10s} measured {took:7.1f} s  estimated {want[stage]:7.1f} s  ratio {took / want[stage]:5.2f}"
            )
    print(f"  {'total':10s} measured {total_m:7.1f} s  estimated {total_e:7.1f} s  ratio {total_m / total_e:5.2f}")
    load = os.getloadavg()
    print(f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
