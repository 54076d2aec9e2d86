"""Stage 4: self-labeling (SCAN section 2.3). Confident predictions (max probability above 0.99)
on a weakly augmented view become pseudo-labels for the strongly augmented view; cross-entropy is
weighted against class imbalance. Training stops once the number of confident samples plateaus
(the paper's Fig. 4), which is also what the history records each epoch; the weights with the most
confident samples are the ones kept."""
from __future__ import annotations

import copy
from typing import Any

import torch

from ml.artifacts import cpu_state, load_clustering, save_clustering
from ml.augment import StrongAugment, WeakAugment
from ml.losses import selflabel_loss
from ml.stages.common import (
    StageContext,
    batches,
    make_optimizer,
    predict_all,
    resident_images,
    resume,
    run_epochs,
    save_checkpoint,
    set_lr,
    take,
)
from ml.stages.results import write_results


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
            write_results(ctx, rt.model(model), images, data, "scan", final=True)
        return {"skipped": True}

    n, size = images.shape[0], images.shape[-1]
    model = rt.model(model)
    ema = copy.deepcopy(model).requires_grad_(False) if sl.ema else None
    opt = make_optimizer(model.parameters(), sl.optim)
    strong = StrongAugment(size, cutout=cfg.clustering.cutout, flip=cfg.pretext.flip)
    weak = WeakAugment(size, flip=cfg.pretext.flip)
    g = ctx.generator(3)

    start, history, ck = resume(ctx, model, opt, g)
    if ck and ema is not None:
        ema.load_state_dict(ck["ema"])

    steps = max(-(-n // sl.batch_size), 1)
    total_steps = max(sl.epochs * steps, 1)
    skipped = [0]

    def train_epoch(epoch: int):
        model.train()
        for i, idx in enumerate(batches(n, sl.batch_size, g, drop_last=False)):
            set_lr(opt, sl.optim, (epoch * steps + i) / total_steps)
            x = take(images, idx, rt)
            xw, xs = rt.prepare(weak(x, g)), rt.prepare(strong(x, g))
            with torch.no_grad(), rt.autocast():
                weak_logits = model(xw)[0].float()
            with rt.autocast():
                strong_logits = model(xs)[0].float()
            loss, confident = selflabel_loss(weak_logits, strong_logits, sl.threshold, sl.class_balance)
            if confident == 0:
                skipped[0] += 1  # nothing to learn from in this batch; not an error
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                _ema_update(ema, model, sl.ema)
            yield loss.item(), x.shape[0]

    def current() -> torch.nn.Module:
        return ema if ema is not None else model

    def count_confident() -> int:
        net = current().eval()
        probs = predict_all(lambda x: net(x)[0].float().softmax(-1), images, rt)
        return int((probs.max(1).values > sl.threshold).sum())

    # The weights with the most confident samples are kept (the paper's Fig. 4 criterion, no labels
    # involved), starting from the SCAN model itself: where self-labeling only loses confidence
    # (seen on 14 px Fashion-MNIST), the SCAN model stays the final one.
    best = ck.get("best") if ck else None
    if best is None:
        best = {"epoch": 0, "confident": count_confident(), "state": cpu_state(current())}

    def end_epoch(epoch: int, loss: float):
        nonlocal best
        confident = count_confident()
        history.append({"epoch": epoch + 1, "loss": loss, "confident": confident,
                        "confident_fraction": confident / n, "skipped_batches": skipped[0]})
        skipped[0] = 0
        if confident > best["confident"]:
            best = {"epoch": epoch + 1, "confident": confident, "state": cpu_state(current())}
        save_checkpoint(ctx, model, opt, g, epoch, history, best=best,
                        **({"ema": ema.state_dict()} if ema is not None else {}))
        return {"confident": confident, "stop": _plateaued(history, sl.patience, sl.min_gain * n)}

    run_epochs(ctx, epochs=sl.epochs, start_epoch=start, steps_per_epoch=steps,
               train_epoch=train_epoch, end_epoch=end_epoch)

    final = current()
    final.load_state_dict(best["state"])
    save_clustering(run.model_path, final, {**meta, "selflabel_epoch": best["epoch"]})
    run.update_json(run.history_path, "selflabel", history)
    run.update_json(run.history_path, "selflabel_kept",
                    {"epoch": best["epoch"], "confident": best["confident"]})
    results = write_results(ctx, final, images, data, "selflabel", final=True)
    return {"epochs": len(history), "kept_epoch": best["epoch"], "confident": best["confident"], **results}


def _plateaued(history: list[dict[str, Any]], patience: int, min_gain: float) -> bool:
    """True when the confident count has not beaten its earlier best by min_gain for `patience`
    epochs."""
    if len(history) <= patience:
        return False
    best_before = max(h["confident"] for h in history[:-patience])
    recent = max(h["confident"] for h in history[-patience:])
    return recent < best_before + max(min_gain, 1)


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    # Parameters and BatchNorm statistics both follow the EMA (the reference resets the buffers
    # each step; see notes/reference-implementation.md, "EMA quirk").
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.mul_(decay).add_(pm.detach(), alpha=1 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        if be.dtype.is_floating_point:
            be.mul_(decay).add_(bm, alpha=1 - decay)
        else:
            be.copy_(bm)
