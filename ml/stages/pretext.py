"""Stage 1: the pretext task (SCAN section 2.1). Instance discrimination with SimCLR's NT-Xent, or
MoCo v2 (queue + momentum encoder) for ImageNet-scale data. Writes the trained model and the
L2-normalised features every later stage mines neighbours from. With ``devices`` > 1 it trains on
that many ranks (ml/distributed.py): NT-Xent's negatives and MoCo's queue span the global batch."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ml.losses import moco_loss, nt_xent_loss
from ml.networks import ContrastiveModel, build_backbone, load_backbone_weights
from ml.rundir import atomic_write
from ml.saved_models import model_meta, save_contrastive
from ml.stages.common import StageContext, channel_stats, predict_all, resident_images, simclr_augment, take
from ml.stages.loop import Trainer


def run_pretext(ctx: StageContext, data) -> dict[str, Any]:
    cfg, pc, rt, run, group = ctx.cfg, ctx.cfg.pretext, ctx.rt, ctx.run, ctx.group
    if run.pretext_path.exists() and run.features_path.exists():
        return {"resumed": "done"}
    images = resident_images(data.images, rt, cfg.image_size)
    n, channels, size = images.shape[0], images.shape[1], images.shape[-1]
    mean, std = channel_stats(data.images, seed=cfg.seed)

    torch.manual_seed(cfg.seed)
    backbone = build_backbone(cfg.arch, channels, mean, std, cfg.width, cfg.canonicalise)
    if pc.backbone_weights:
        load_backbone_weights(backbone, Path(pc.backbone_weights))
    model = rt.model(ContrastiveModel(backbone, hidden_dim=pc.hidden_dim, feature_dim=pc.feature_dim))
    model = group.sync_batchnorm(model, rt.device)
    aug = simclr_augment(size, pc)
    trainer = Trainer(
        ctx, model, model.parameters(), pc.optim, epochs=pc.epochs, batch_size=pc.batch_size, n=n, stream=1
    )
    moco = _Moco(model, pc, n, trainer.g, rt.device) if pc.method == "moco" else None
    extras = trainer.resume()
    if moco is not None and extras:
        moco.load(extras)
    net = group.wrap(model, rt.device)

    for _ in trainer.epochs():
        model.train()
        for idx in trainer.batches():
            # Every rank augments the global batch from the shared stream and keeps its own rows.
            x = take(images, idx, rt)
            v1, v2 = rt.prepare(group.shard(aug(x, trainer.g))), rt.prepare(group.shard(aug(x, trainer.g)))
            with rt.autocast():
                if moco is None:
                    z = group.gather(net(torch.cat([v1, v2])).float())  # rank-major: [v1_r, v2_r] per rank
                    z = z.view(group.world, 2, v1.shape[0], -1).transpose(0, 1).reshape(2, x.shape[0], -1)
                    loss = nt_xent_loss(z[0], z[1], pc.temperature)
                else:
                    loss = moco.loss(net(v1).float(), v2, group)
            trainer.step(loss, x.shape[0])
            if moco is not None:
                moco.enqueue()
        trainer.end_epoch({"lr": trainer.lr, "time": time.time()}, extra=moco.state() if moco is not None else None)

    # With imported weights and no training the MLP head is random: mine on the backbone then.
    feature_space = pc.feature_space if pc.epochs > 0 else "backbone"
    model.eval()
    forward = model if feature_space == "head" else (lambda x: F.normalize(model.features(x), dim=1))
    features = predict_all(forward, images, rt, group=group).numpy().astype(np.float32)
    if not group.is_main:
        return {}
    atomic_write(run.features_path, lambda f: np.save(f, features))
    meta = model_meta(
        cfg.arch,
        channels,
        size,
        mean,
        std,
        width=cfg.width,
        canonicalise=cfg.canonicalise,
        hidden_dim=pc.hidden_dim,
        feature_dim=pc.feature_dim,
        feature_space=feature_space,
    )
    save_contrastive(run.pretext_path, model, meta)
    history = trainer.history
    run.update_json(run.history_path, "pretext", history)
    return {
        "epochs": len(history),
        "final_loss": history[-1]["loss"] if history else None,
        "feature_dim": int(features.shape[1]),
    }


class _Moco:
    """MoCo v2's extra state: the momentum (key) encoder and the queue of negatives."""

    def __init__(self, model, pc, n: int, g: torch.Generator, device):
        self.key_model = copy.deepcopy(model).requires_grad_(False)
        self.model, self.momentum, self.temperature = model, pc.moco_momentum, pc.temperature
        self.queue = F.normalize(torch.randn(min(pc.moco_queue, n), pc.feature_dim, generator=g, device=device), dim=1)
        self.ptr = [0]
        self._keys = None

    def loss(self, q: torch.Tensor, key_view: torch.Tensor, group) -> torch.Tensor:
        """InfoNCE of the global batch: queries and keys gathered from every rank (the keys also
        go into the queue, so it stays the same on every rank)."""
        with torch.no_grad():
            _momentum_update(self.key_model, self.model, self.momentum)
            self._keys = group.gather(self.key_model(key_view).float())
        return moco_loss(group.gather(q), self._keys, self.queue, self.temperature)

    def enqueue(self) -> None:
        _enqueue(self.queue, self.ptr, self._keys.detach())

    def state(self) -> dict[str, Any]:
        return {"key_model": self.key_model.state_dict(), "queue": self.queue.cpu(), "queue_ptr": self.ptr[0]}

    def load(self, ck: dict[str, Any]) -> None:
        self.key_model.load_state_dict(ck["key_model"])
        self.queue.copy_(ck["queue"].to(self.queue.device))
        self.ptr[0] = ck["queue_ptr"]


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
        queue[ptr[0] : end] = keys
    else:
        first = q - ptr[0]
        queue[ptr[0] :] = keys[:first]
        queue[: end - q] = keys[first:]
    ptr[0] = end % q
