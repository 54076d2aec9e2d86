"""Mean +- std over seeds, the paper's protocol: "the results are reported as the mean and standard
deviation from 10 different runs" (section 3.1), and Table 3 adds the best model.

With ``seeds: N`` (N > 1) the clustering and self-label stages run N times, on the one pretext model
and the one set of mined neighbours, each seed in its own folder ``seeds/<i>/`` of the run
directory (``ml.rundir.SeedDir``) with its own checkpoints: a worker killed between seeds, or in the
middle of one, redoes none of the finished seeds and resumes the one in progress from its last
epoch. The stage functions themselves are unchanged: each seed is ``run_clustering`` /
``run_selflabel`` with the seed's own config and folder.

Seed 0 is the run's own seed (so seed 0 of N trains what a one-seed run trains); seed i is drawn by
numpy's SeedSequence from (run seed, i). A seed sets the heads' initialisation and every random
stream of the two stages (data order, augmentations, neighbour picks).

Which seed is kept (served, exported, shown): the one whose final model has the lowest SCAN loss
(Eq. 2) measured over every image and all its mined neighbours, without augmentation. That is the
paper's validation criterion for the clustering step ("we select the best model based on the
lowest loss"), which needs no labels; every seed shares the neighbours, so the losses compare.
It is measured on the model after self-labeling, the one that would be served: self-labeling's
own criterion, the confident count, is not used across seeds, since it rewards a model for being
sure whatever it is sure of (a seed that sharpens a partition its neighbours disagree with would
win), while Eq. 2 still asks neighbours to agree and clusters to stay balanced.

metrics.json["seeds"] holds every seed's row (ACC, NMI, ARI... where labels exist, and the
label-free SCAN loss, confident count, clusters used and shortcut gains), their mean and sample
standard deviation (ddof=1), and which seed was kept; metrics.json's "scan" / "selflabel" entries,
scan.pt, model.pt, assignments.npz, clusters.json and history.json are the kept seed's.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from ml.losses import scan_loss_all_neighbors
from ml.num_clusters import resolve_num_clusters
from ml.rundir import RunDir, SeedDir, atomic_write
from ml.saved_models import load_clustering
from ml.stages.common import Progress, StageContext, predict_all, resident_images

CRITERION = "lowest SCAN loss (Eq. 2) of the final model over every image and all its mined neighbours, no augmentation"
CLUSTERING_CRITERION = "lowest SCAN loss (Eq. 2) of the SCAN model; self-labeling still to come"
# Facts of the data or the recipe, the same for every seed: not metrics to average.
NOT_METRICS = {"num_clusters", "num_classes", "num_samples"}
# What the kept seed hands to the run directory itself, before its assignments.npz (copied last:
# with model.pt, it marks the self-label stage done).
KEPT_FILES = ("scan.pt", "model.pt", "clusters.json")


def seed_of(run_seed: int, index: int) -> int:
    """The seed of seed ``index`` of a run: the run's own for index 0, else one drawn from
    (run seed, index) by numpy's SeedSequence (below 2**32, numpy's and scikit-learn's range)."""
    if index == 0:
        return run_seed
    return int(np.random.SeedSequence([run_seed, index]).generate_state(1)[0])


def seed_context(ctx: StageContext, index: int) -> StageContext:
    """The stage's context for one seed: its folder, its seed, its progress placed within the
    whole stage (epoch e of seed i reports as epoch i * epochs + e of seeds * epochs)."""
    cfg = ctx.cfg.model_copy(update={"seed": seed_of(ctx.cfg.seed, index), "seeds": 1})
    return StageContext(
        ctx.stage,
        ctx.run.seed(index).ensure(),
        cfg,
        ctx.rt,
        _seed_progress(ctx, index),
        ctx.should_cancel,
        group=ctx.group,  # a data-parallel self-label stage trains every seed on all its ranks
    )


def _seed_progress(ctx: StageContext, index: int):
    if ctx.progress is None:
        return None
    n = ctx.cfg.seeds

    def report(p: Progress) -> None:
        metrics = {**p.metrics, "seed_index": index}
        if p.epoch is None or not p.epochs:  # a note
            message = f"seed {index + 1}/{n}: {p.message}" if p.message else None
            ctx.report(replace(p, metrics=metrics, message=message))
            return
        eta = p.eta_s
        done = ((p.epoch - 1) + (p.step or 0) / max(p.steps or 1, 1)) / p.epochs
        if eta is not None and done < 1:  # this seed's remaining time, plus the seeds after it
            eta += (n - 1 - index) * eta / max(1 - done, 1e-3)
        ctx.report(replace(p, epoch=index * p.epochs + p.epoch, epochs=n * p.epochs, eta_s=eta, metrics=metrics))

    return report


# ---------------------------------------------------------------------------------------------
# The two stages over seeds
# ---------------------------------------------------------------------------------------------


def run_clustering_seeds(ctx: StageContext, data) -> dict[str, Any]:
    from ml.stages.clustering import run_clustering

    run = ctx.run
    if run.scan_model_path.exists():
        return {"resumed": "done"}
    k = resolve_num_clusters(ctx)  # "auto" / a range: one K for the run, chosen before any seed trains
    probe = _Probe(ctx, data)
    for i in range(ctx.cfg.seeds):
        sctx = seed_context(ctx, i)
        trained = run_clustering(sctx, data).get("resumed") != "done"
        if not probe.measured(sctx.run, "scan"):
            model, _ = load_clustering(sctx.run.scan_model_path)
            probe.record(sctx.run, "scan", probe.probs(model))
        if trained:
            _note_seed(ctx, i, "SCAN", sctx.run)
    rows = _rows(run, ctx.cfg)
    kept = _lowest(rows, "scan")
    summary = _summary(ctx.cfg, rows, kept, CLUSTERING_CRITERION)
    _hand_over(run, run.seed(kept), (), steps=("scan",), history=("clustering",))
    run.update_json(run.metrics_path, "seeds", summary)
    # scan.pt last: its presence marks the stage done.
    _copy(run.seed(kept).scan_model_path, run.scan_model_path)
    out = {"seeds": ctx.cfg.seeds, "kept_seed": kept, "mean": summary["mean"]["scan"], "std": summary["std"]["scan"]}
    if ctx.cfg.k is None:
        out["num_clusters_chosen"] = k  # the service records it in the run's config
    return out


def run_selflabel_seeds(ctx: StageContext, data) -> dict[str, Any]:
    from ml.stages.selflabel import run_selflabel

    run = ctx.run
    if run.model_path.exists() and run.assignments_path.exists():
        return {"resumed": "done"}
    probe = _Probe(ctx, data)
    for i in range(ctx.cfg.seeds):
        sctx = seed_context(ctx, i)
        trained = "epochs" in run_selflabel(sctx, data)
        if not ctx.group.is_main:  # rank 0 writes; the other ranks go on to train the next seed
            continue
        final = sctx.run.read_json(sctx.run.metrics_path, {}).get("final", "selflabel")
        if not probe.measured(sctx.run, final):
            with np.load(sctx.run.assignments_path) as npz:  # what this seed would serve
                probe.record(sctx.run, final, torch.from_numpy(np.asarray(npz["probs"], dtype=np.float32)))
        if trained:
            _note_seed(ctx, i, "self-labeling", sctx.run)
    if not ctx.group.is_main:
        return {}
    rows = _rows(run, ctx.cfg)
    final = "selflabel" if all("selflabel" in r for r in rows) else "scan"
    kept = _lowest(rows, final)
    summary = _summary(ctx.cfg, rows, kept, CRITERION)
    seed = run.seed(kept)
    steps = ("scan", "selflabel") if final == "selflabel" else ("scan",)
    _hand_over(run, seed, KEPT_FILES, steps=steps, history=None)
    run.update_json(run.metrics_path, "final", final)
    run.update_json(run.metrics_path, "seeds", summary)
    _copy(seed.assignments_path, run.assignments_path)
    ctx.note(
        f"kept seed {kept + 1} of {ctx.cfg.seeds} (seed {summary['kept_seed']}): {CRITERION}",
        {"kept_seed_index": kept, "scan_loss": rows[kept][final]["scan_loss"]},
    )
    return {"seeds": ctx.cfg.seeds, "kept_seed": kept, "mean": summary["mean"][final], "std": summary["std"][final]}


def _note_seed(ctx: StageContext, index: int, what: str, seed: SeedDir) -> None:
    step = "scan" if what == "SCAN" else "selflabel"
    m = seed.read_json(seed.metrics_path, {}).get(step, {})
    text = f"seed {index + 1}/{ctx.cfg.seeds} done: {what} loss {m['scan_loss']:.4f}"
    if isinstance(m.get("acc"), (int, float)):
        text += f", ACC {m['acc']:.3f}"
    ctx.note(text, {"seed_index": index, "scan_loss": m["scan_loss"]})


class _Probe:
    """The label-free measures of a seed's model: Eq. 2 over every image and its neighbours (the
    clustering stage's own selection loss), and how many images it is confident about."""

    def __init__(self, ctx: StageContext, data):
        self.ctx, self.data = ctx, data
        self._images: torch.Tensor | None = None
        mined = torch.from_numpy(np.load(ctx.run.neighbors_path))
        n = mined.shape[0]
        # The anchor with its K neighbours, as clustering pairs and measures them (_partners).
        self.partners = torch.cat([torch.arange(n).unsqueeze(1), mined], dim=1)

    def probs(self, model) -> torch.Tensor:
        if self._images is None:
            self._images = resident_images(self.data.images, self.ctx.rt, self.ctx.cfg.image_size)
        model = self.ctx.rt.model(model).eval()
        return predict_all(lambda x: model(x)[0].float().softmax(-1), self._images, self.ctx.rt)

    @staticmethod
    def measured(seed: RunDir, step: str) -> bool:
        """Already measured (a stage resumed after this seed): a rerun of the seed's stage rewrites
        its metrics, and with them this mark."""
        return "scan_loss" in seed.read_json(seed.metrics_path, {}).get(step, {})

    def record(self, seed: RunDir, step: str, probs: torch.Tensor) -> None:
        cfg = self.ctx.cfg
        loss = float(scan_loss_all_neighbors(probs, self.partners, cfg.clustering.entropy_weight)[0])
        confident = int((probs.max(1).values > cfg.selflabel.threshold).sum())
        measures = {
            **seed.read_json(seed.metrics_path, {}).get(step, {}),
            "scan_loss": loss,
            "confident": confident,
            "confident_fraction": confident / probs.shape[0],
            "clusters_used": int(np.unique(probs.argmax(1).numpy()).size),
        }
        seed.update_json(seed.metrics_path, step, measures)


# ---------------------------------------------------------------------------------------------
# Rows, mean +- std, the kept seed
# ---------------------------------------------------------------------------------------------


def seed_row(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of one step of one seed: every scalar metric, and the shortcut check's gains."""
    row = {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in NOT_METRICS
    }
    shortcuts = metrics.get("shortcuts")
    if isinstance(shortcuts, dict):
        for k in ("trivial_gain", "feature_gain"):
            if isinstance(shortcuts.get(k), (int, float)):
                row[f"shortcut_{k}"] = float(shortcuts[k])
    return row


def _rows(run: RunDir, cfg) -> list[dict[str, Any]]:
    rows = []
    for i in range(cfg.seeds):
        m = run.seed(i).read_json(run.seed(i).metrics_path, {})
        row: dict[str, Any] = {"index": i, "seed": seed_of(cfg.seed, i)}
        for step in ("scan", "selflabel"):
            if isinstance(m.get(step), dict):
                row[step] = seed_row(m[step])
        rows.append(row)
    return rows


def _lowest(rows: list[dict[str, Any]], step: str) -> int:
    """The seed with the lowest SCAN loss at `step` (the first of equals)."""
    return int(np.argmin([r[step]["scan_loss"] for r in rows]))


def mean_std(rows: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and sample standard deviation (ddof=1) of every key all rows have."""
    keys = sorted(set.intersection(*(set(r) for r in rows))) if rows else []
    values = {k: np.array([r[k] for r in rows], dtype=np.float64) for k in keys}
    ddof = 1 if len(rows) > 1 else 0
    return (
        {k: float(v.mean()) for k, v in values.items()},
        {k: float(v.std(ddof=ddof)) for k, v in values.items()},
    )


def _summary(cfg, rows: list[dict[str, Any]], kept: int, criterion: str) -> dict[str, Any]:
    mean, std = {}, {}
    for step in ("scan", "selflabel"):
        if all(step in r for r in rows):
            mean[step], std[step] = mean_std([r[step] for r in rows])
    return {
        "n": cfg.seeds,
        "kept": kept,
        "kept_seed": rows[kept]["seed"],
        "criterion": criterion,
        "std_ddof": 1,
        "runs": rows,
        "mean": mean,
        "std": std,
    }


def _hand_over(
    run: RunDir, seed: SeedDir, files: tuple[str, ...], steps: tuple[str, ...], history: tuple[str, ...] | None
) -> None:
    """Copy the kept seed's files, its metrics of `steps` and its history (`history` keys; None:
    all) into the run directory itself, where the service, the exports and the UI read them."""
    for name in files:
        _copy(seed.path / name, run.path / name)
    metrics = seed.read_json(seed.metrics_path, {})
    for step in steps:
        if step in metrics:
            run.update_json(run.metrics_path, step, metrics[step])
    for key, value in seed.read_json(seed.history_path, {}).items():
        if history is None or key in history:
            run.update_json(run.history_path, key, value)


def _copy(src, dst) -> None:
    with open(src, "rb") as f:
        atomic_write(dst, lambda out: shutil.copyfileobj(f, out))
