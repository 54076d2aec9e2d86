"""Stage 4: self-labeling (SCAN section 2.3). Confident predictions (max probability above 0.99)
on a weakly augmented view become pseudo-labels for the strongly augmented view; cross-entropy is
weighted against class imbalance. Training stops once the number of confident samples plateaus
(the paper's Fig. 4), which is also what the history records each epoch; the weights with the most
confident samples are the ones kept. With ``devices`` > 1 it trains on that many ranks
(ml/distributed.py); class weights and quotas are those of the global batch.

Beyond the paper, ``selflabel.contrastive_weight`` adds the pretext's SimCLR loss (through its
frozen projection head) to every step, so the backbone keeps what the pretext taught it while the
pseudo-labels retrain it (docs/fashion.md section 12)."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ml.augment import StrongAugment, WeakAugment, to_float
from ml.evaluate import hungarian_accuracy
from ml.losses import mean_entropy, nt_xent_loss, selflabel_loss
from ml.saved_models import cpu_state, load_clustering, load_contrastive, save_clustering
from ml.stages.common import StageContext, predict_all, resident_images, simclr_augment, take
from ml.stages.loop import Trainer
from ml.stages.outputs import write_outputs


def run_selflabel(ctx: StageContext, data) -> dict[str, Any]:
    cfg, sl, rt, run = ctx.cfg, ctx.cfg.selflabel, ctx.rt, ctx.run
    if run.model_path.exists() and run.assignments_path.exists():
        return {"resumed": "done"}
    model, meta = load_clustering(run.scan_model_path)
    images = resident_images(data.images, rt, cfg.image_size)
    if not sl.enabled or sl.epochs == 0:
        # The SCAN model is the final one; clustering already wrote its results.
        save_clustering(run.model_path, model, meta)
        if not run.assignments_path.exists():
            write_outputs(ctx, rt.model(model), images, data, "scan", final=True)
        return {"skipped": True}

    n = images.shape[0]
    model = ctx.group.sync_batchnorm(rt.model(model), rt.device)
    params = model.heads.parameters() if sl.freeze_backbone else model.parameters()
    trainer = Trainer(ctx, model, params, sl.optim, epochs=sl.epochs, batch_size=sl.batch_size, n=n, stream=3)
    views = _views(cfg, images.shape[-1])
    extras = trainer.resume()
    confidence = _Confidence(model, images, data.labels, sl.threshold, rt, ctx.group)
    student = model
    if sl.contrastive_weight:
        student = _WithProjection(model, rt.model(load_contrastive(run.pretext_path)[0].head))
    net = ctx.group.wrap(student, rt.device)

    # The weights with the most confident samples are kept (the paper's Fig. 4 criterion, no labels
    # involved), starting from the SCAN model itself: where self-labeling only loses confidence
    # (seen on 14 px Fashion-MNIST), the SCAN model stays the final one.
    best = extras.get("best") or {"epoch": 0, "confident": confidence.count(), "state": cpu_state(model)}
    start = extras.get("start") or {"confident": best["confident"], "acc": confidence.acc}

    for _ in trainer.epochs():
        model.train(not sl.freeze_backbone)
        skipped = sum(
            not _step(net, sl, take(images, idx, rt), views, trainer, rt, ctx.group) for idx in trainer.batches()
        )
        confident = confidence.count()
        if confident > best["confident"]:
            best = {"epoch": trainer.epoch + 1, "confident": confident, "state": cpu_state(model)}
        stop = _plateaued([*trainer.history, {"confident": confident}], sl.patience, sl.min_gain * n)
        record = {"confident": confident, "confident_fraction": confident / n, "skipped_batches": skipped}
        if confidence.acc is not None:
            record["acc"] = confidence.acc
        trainer.end_epoch(record, stop=stop, extra={"best": best, "start": start})
    if not ctx.group.is_main:
        return {}

    model.load_state_dict(best["state"])
    save_clustering(run.model_path, model, {**meta, "selflabel_epoch": best["epoch"]})
    run.update_json(run.history_path, "selflabel", trainer.history)
    run.update_json(run.history_path, "selflabel_start", start)
    run.update_json(run.history_path, "selflabel_kept", {"epoch": best["epoch"], "confident": best["confident"]})
    results = write_outputs(ctx, model, images, data, "selflabel", final=True)
    return {"epochs": len(trainer.history), "kept_epoch": best["epoch"], "confident": best["confident"], **results}


class _Views(NamedTuple):
    weak: Any  # makes the pseudo-labels
    strong: Any  # learns them
    simclr: Any  # the pretext's views, for the contrastive term
    temperature: float


def _views(cfg, size: int) -> _Views:
    sl, pc = cfg.selflabel, cfg.pretext
    simclr = simclr_augment(size, pc)
    strong = StrongAugment(size, cutout=cfg.clustering.cutout, flip=pc.flip) if sl.augmentation == "strong" else simclr
    weak = WeakAugment(size, flip=pc.flip) if sl.weak_view == "shift" else (lambda x, g: to_float(x))
    return _Views(weak, strong, simclr, pc.temperature)


class _WithProjection(nn.Module):
    """The student and the pretext's projection head (frozen) in one module, so that one
    (data-parallel) forward gives both the self-label logits and SimCLR's embeddings."""

    def __init__(self, model: nn.Module, projection: nn.Module) -> None:
        super().__init__()
        self.model, self.projection = model, projection.requires_grad_(False)

    def forward(self, x: torch.Tensor, simclr_views: torch.Tensor | None = None):
        logits = self.model(x)
        if simclr_views is None:
            return logits
        return logits, F.normalize(self.projection(self.model.features(simclr_views)), dim=1)


def _step(model, sl, x, views: _Views, trainer: Trainer, rt, group) -> bool:
    """One batch: pseudo-labels from the weak view teach the strong view. False when the batch held
    no confident sample (nothing to learn from; not an error). ``x`` is the global batch; a
    data-parallel rank augments it all (the shared random stream) and trains on its own rows."""
    g = trainer.g
    xw, xs = rt.prepare(group.shard(views.weak(x, g))), rt.prepare(group.shard(views.strong(x, g)))
    if sl.teacher_mode == "eval":
        model.eval()  # running BatchNorm statistics, as the confident count is measured
    with torch.no_grad(), rt.autocast():
        weak_logits = group.gather(model(xw)[0].float())
    model.train(not sl.freeze_backbone)
    with rt.autocast():
        if sl.contrastive_weight:
            xc = x[: sl.contrastive_images]
            v1, v2 = rt.prepare(group.shard(views.simclr(xc, g))), rt.prepare(group.shard(views.simclr(xc, g)))
            logits, z = model(xs, torch.cat([v1, v2]))
            # rank-major [v1_r, v2_r] per rank, as the pretext gathers them
            z = group.gather(z.float()).view(group.world, 2, v1.shape[0], -1).transpose(0, 1).reshape(2, len(xc), -1)
        else:
            logits = model(xs)
        strong_logits = group.gather(logits[0].float())
    loss, confident = selflabel_loss(
        weak_logits, strong_logits, sl.threshold, sl.class_balance, cluster_quota=sl.cluster_quota
    )
    if sl.entropy_weight:
        loss = loss - sl.entropy_weight * mean_entropy(strong_logits.softmax(-1))
    if sl.contrastive_weight:
        loss = loss + sl.contrastive_weight * nt_xent_loss(z[0], z[1], views.temperature)
    if confident == 0:
        return False
    before = [p.detach().clone() for p in model.parameters()] if sl.ema else None
    trainer.step(loss, x.shape[0])
    if before is not None:
        _ema_update(model, before, sl.ema)
    return True


class _Confidence:
    """The confident count over the whole set (the stage's selection criterion) and, where labels
    exist, the ACC beside it for the history only (Fig. 4's curve); nothing selects on the ACC."""

    def __init__(self, model, images, labels, threshold: float, rt, group) -> None:
        self.model, self.images, self.threshold, self.rt, self.group = model, images, threshold, rt, group
        self.labels = np.asarray(labels) if labels is not None else None
        self.acc: float | None = None

    def count(self) -> int:
        self.model.eval()
        probs = predict_all(lambda x: self.model(x)[0].float().softmax(-1), self.images, self.rt, group=self.group)
        if self.labels is not None:
            self.acc = hungarian_accuracy(probs.argmax(1).numpy(), self.labels)
        return int((probs.max(1).values > self.threshold).sum())


def _plateaued(history: list[dict[str, Any]], patience: int, min_gain: float) -> bool:
    """True when the confident count has not beaten its earlier best by min_gain for `patience`
    epochs."""
    if len(history) <= patience:
        return False
    best_before = max(h["confident"] for h in history[:-patience])
    recent = max(h["confident"] for h in history[-patience:])
    return recent < best_before + max(min_gain, 1)


@torch.no_grad()
def _ema_update(model: torch.nn.Module, before: list[torch.Tensor], decay: float) -> None:
    """The paper's "weights updated through an exponential moving average", as the reference does
    it: after each optimiser step the model's weights are replaced by the average
    decay * old + (1 - decay) * stepped, so the averaged model itself makes the next pseudo-labels.
    BatchNorm statistics keep following the data (the reference resets them each step)."""
    for p, old in zip(model.parameters(), before):
        p.lerp_(old, decay)
