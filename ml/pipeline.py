"""Run one of SCAN's stages on a dataset (the worker's task and `scan train` both call it, stage by
stage; the worker hands it the recipe, `scan train` keeps it in the run directory's config.json). A
stage rerun after a crash resumes from its last checkpoint; a finished stage rerun returns at once."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ml.config import RunConfig
from ml.device import select_runtime
from ml.rundir import RunDir, atomic_write_text
from ml.stages import STAGES
from ml.stages.common import Canceled, CancelFn, Progress, ProgressFn, StageContext

__all__ = ["STAGES", "Canceled", "Progress", "prepare_run", "load_config", "run_stage", "missing_input"]

# What each step reads from the run directory, and which stage writes it ("finalize" is the
# service's last step: it loads the results into the database).
STAGE_INPUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "mining": (("features.npy", "pretext"),),
    "clustering": (("pretext.pt", "pretext"), ("neighbors.npy", "mining")),
    "selflabel": (("features.npy", "pretext"), ("scan.pt", "clustering")),
    "finalize": (("assignments.npz", "selflabel"), ("model.pt", "selflabel")),
}


def missing_input(run_dir: str | Path, stage: str) -> tuple[str, str] | None:
    """(file, stage that writes it) of the first input of ``stage`` missing from the run directory,
    earliest producer first, so a resumed run re-runs what is needed instead of failing."""
    missing = [
        (name, producer) for name, producer in STAGE_INPUTS.get(stage, ()) if not (Path(run_dir) / name).is_file()
    ]
    order = {s: i for i, s in enumerate(STAGES)}
    return min(missing, key=lambda m: order[m[1]]) if missing else None


def _stage_fn(stage: str, seeds: int = 1) -> Callable:
    # Imported lazily so that `import ml.pipeline` stays cheap for the API process.
    if stage == "pretext":
        from ml.stages.pretext import run_pretext as fn
    elif stage == "mining":
        from ml.stages.mining import run_mining as fn
    elif stage == "clustering" and seeds > 1:
        from ml.stages.seeds import run_clustering_seeds as fn
    elif stage == "clustering":
        from ml.stages.clustering import run_clustering as fn
    elif stage == "selflabel" and seeds > 1:
        from ml.stages.seeds import run_selflabel_seeds as fn
    elif stage == "selflabel":
        from ml.stages.selflabel import run_selflabel as fn
    else:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    return fn


def _world(ctx: StageContext, data) -> int:
    """The number of data-parallel ranks for this stage: 1 unless the run asks for more devices and
    the stage trains data-parallel (ml/distributed.py)."""
    cfg = ctx.cfg
    from ml.distributed import DATA_PARALLEL_STAGES, world_size

    trains = {"pretext": cfg.pretext.epochs > 0, "selflabel": cfg.selflabel.enabled and cfg.selflabel.epochs > 0}
    if cfg.devices == 1 or ctx.stage not in DATA_PARALLEL_STAGES or not trains[ctx.stage]:
        return 1

    batch = cfg.pretext.batch_size if ctx.stage == "pretext" else cfg.selflabel.batch_size
    world = world_size(cfg.devices, ctx.rt.device, min(batch, data.n))
    if world < cfg.devices:
        ctx.note(f"{ctx.stage} asked for {cfg.devices} devices and trains on {world} (visible devices, even batches)")
    return world


def prepare_run(run_dir: str | Path, cfg: RunConfig) -> RunDir:
    """Create the run directory and write its config (kept if already there: a rerun must not
    silently change the recipe of a half-finished run)."""
    run = RunDir(run_dir).ensure()
    if not run.config_path.exists():
        atomic_write_text(run.config_path, cfg.model_dump_json(indent=1))
    return run


def load_config(run_dir: str | Path) -> RunConfig:
    return RunConfig.model_validate(json.loads(RunDir(run_dir).config_path.read_text()))


def run_stage(
    stage: str,
    run_dir: str | Path,
    data,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    cfg: RunConfig | None = None,
) -> dict[str, Any]:
    """``cfg``: the run's recipe where its owner keeps it (the service: the database); None reads
    the run directory's ``config.json``, which ``prepare_run`` wrote (``scan train``, bench/)."""
    _stage_fn(stage)  # an unknown stage is an error before anything is read
    run = RunDir(run_dir).ensure()
    cfg = cfg if cfg is not None else load_config(run_dir)
    fn = _stage_fn(stage, cfg.seeds)
    rt = select_runtime(cfg.device, cfg.precision, cfg.channels_last)
    ctx = StageContext(stage, run, cfg, rt, progress, should_cancel)
    world = _world(ctx, data)
    t0 = time.perf_counter()
    if world > 1:
        from ml.launch import launch

        summary = launch(fn, stage, run.path, data, cfg, world, progress, should_cancel)
    else:
        summary = fn(ctx, data)
    device = str(rt.device) if world == 1 else f"{rt.device.type} x{world}"
    summary = {**summary, "seconds": time.perf_counter() - t0, "device": device, "devices": world}
    run.update_json(run.timings_path, stage, summary)
    return summary
