"""Stage 1: the pretext task (SCAN section 2.1). Instance discrimination with SimCLR's NT-Xent, or
MoCo v2 (queue + momentum encoder) for ImageNet-scale data. Writes the trained model and the
L2-normalised features every later stage mines neighbours from."""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ml.artifacts import model_meta, save_contrastive
from ml.augment import SimCLRAugment
from ml.losses import moco_loss, nt_xent_loss
from ml.models import ContrastiveModel, build_backbone, load_backbone_weights
from ml.rundir import atomic_write
from ml.stages.common import (
    StageContext,
    batches,
    channel_stats,
    make_optimizer,
    predict_all,
    resident_images,
    resume,
    run_epochs,
    save_checkpoint,
    set_lr,
    take,
)


def run_pretext(ctx: StageContext, data) -> dict[str, Any]:
    cfg, pc, rt, run = ctx.cfg, ctx.cfg.pretext, ctx.rt, ctx.run
    if run.pretext_path.exists() and run.features_path.exists():
        return {"resumed": "done"}
    images = resident_images(data.images, rt, cfg.image_size)
    n, channels, size = images.shape[0], images.shape[1], images.shape[-1]
    mean, std = channel_stats(data.images, seed=cfg.seed)

    torch.manual_seed(cfg.seed)
    backbone = build_backbone(cfg.arch, channels, mean, std, cfg.width)
    if pc.backbone_weights:
        load_backbone_weights(backbone, Path(pc.backbone_weights))
    model = rt.model(ContrastiveModel(backbone, hidden_dim=pc.hidden_dim, feature_dim=pc.feature_dim))
    opt = make_optimizer(model.parameters(), pc.optim)
    aug = SimCLRAugment(size, crop_scale=pc.crop_scale, flip=pc.flip, jitter=pc.jitter,
                        jitter_p=pc.jitter_p, gray_p=pc.gray_p)
    g = ctx.generator(1)

    moco = pc.method == "moco"
    key_model, queue = None, None
    if moco:
        key_model = copy.deepcopy(model).requires_grad_(False)
        queue = F.normalize(torch.randn(min(pc.moco_queue, n), pc.feature_dim, generator=g,
                                        device=rt.device), dim=1)
        queue_ptr = [0]

    start, history, ck = resume(ctx, model, opt, g)
    if ck and moco:
        key_model.load_state_dict(ck["key_model"])
        queue.copy_(ck["queue"].to(rt.device))
        queue_ptr[0] = ck["queue_ptr"]

    steps = max(n // pc.batch_size, 1) if n >= pc.batch_size else 1
    total_steps = max(pc.epochs * steps, 1)

    def train_epoch(epoch: int):
        model.train()
        for i, idx in enumerate(batches(n, pc.batch_size, g, drop_last=True)):
            set_lr(opt, pc.optim, (epoch * steps + i) / total_steps)
            x = take(images, idx, rt)
            v1, v2 = rt.prepare(aug(x, g)), rt.prepare(aug(x, g))
            with rt.autocast():
                if not moco:
                    z = model(torch.cat([v1, v2])).float()
                    loss = nt_xent_loss(z[: len(idx)], z[len(idx):], pc.temperature)
                else:
                    q = model(v1).float()
                    with torch.no_grad():
                        _momentum_update(key_model, model, pc.moco_momentum)
                        k = key_model(v2).float()
                    loss = moco_loss(q, k, queue, pc.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if moco:
                _enqueue(queue, queue_ptr, k.detach())
            yield loss.item(), x.shape[0]

    def end_epoch(epoch: int, loss: float):
        history.append({"epoch": epoch + 1, "loss": loss, "lr": opt.param_groups[0]["lr"], "time": time.time()})
        extra = ({"key_model": key_model.state_dict(), "queue": queue.cpu(), "queue_ptr": queue_ptr[0]}
                 if moco else {})
        save_checkpoint(ctx, model, opt, g, epoch, history, **extra)
        return {}

    run_epochs(ctx, epochs=pc.epochs, start_epoch=start, steps_per_epoch=steps,
               train_epoch=train_epoch, end_epoch=end_epoch)

    # With imported weights and no training the MLP head is random: mine on the backbone then.
    feature_space = pc.feature_space if pc.epochs > 0 else "backbone"
    model.eval()
    forward = model if feature_space == "head" else (lambda x: F.normalize(model.features(x), dim=1))
    features = predict_all(forward, images, rt).numpy().astype(np.float32)
    atomic_write(run.features_path, lambda f: np.save(f, features))
    meta = model_meta(cfg.arch, channels, size, mean, std, width=cfg.width, hidden_dim=pc.hidden_dim,
                      feature_dim=pc.feature_dim, feature_space=feature_space)
    save_contrastive(run.pretext_path, model, meta)
    run.update_json(run.history_path, "pretext", history)
    return {"epochs": len(history), "final_loss": history[-1]["loss"] if history else None,
            "feature_dim": int(features.shape[1])}


@torch.no_grad()
def _momentum_update(key_model: torch.nn.Module, model: torch.nn.Module, m: float) -> None:
    for pk, pq in zip(key_model.parameters(), model.parameters()):
        pk.mul_(m).add_(pq.detach(), alpha=1 - m)
    for bk, bq in zip(key_model.buffers(), model.buffers()):
        bk.copy_(bq)


@torch.no_grad()
def _enqueue(queue: torch.Tensor, ptr: list[int], keys: torch.Tensor) -> None:
    q = queue.shape[0]
    keys = keys[:q]
    end = ptr[0] + keys.shape[0]
    if end <= q:
        queue[ptr[0]:end] = keys
    else:
        first = q - ptr[0]
        queue[ptr[0]:] = keys[:first]
        queue[: end - q] = keys[first:]
    ptr[0] = end % q
