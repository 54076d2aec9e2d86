"""Stage 3: SCAN clustering (SCAN section 2.2, Eq. 2). Each image and one of its mined neighbours,
both strongly augmented, are pushed to agree, while the entropy term keeps clusters from
collapsing. Several heads train at once; after every epoch Eq. 2 is measured for each head over the whole
dataset, and the (epoch, head) with the lowest loss is the model kept (the paper's criterion).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ml.augment import StrongAugment
from ml.losses import scan_loss_all_neighbors, scan_loss_per_head
from ml.networks import ClusteringModel
from ml.num_clusters import resolve_num_clusters
from ml.saved_models import cpu_state, load_contrastive, save_clustering
from ml.stages.common import StageContext, predict_all, resident_images, simclr_augment, take
from ml.stages.loop import Trainer
from ml.stages.outputs import write_outputs


def run_clustering(ctx: StageContext, data) -> dict[str, Any]:
    cfg, cc, rt, run = ctx.cfg, ctx.cfg.clustering, ctx.rt, ctx.run
    if run.scan_model_path.exists():
        return {"resumed": "done"}
    images = resident_images(data.images, rt, cfg.image_size)
    neighbors = _partners(run, images.shape[0], rt)
    contrastive, meta = load_contrastive(run.pretext_path)
    k = resolve_num_clusters(ctx)  # num_clusters, or the K the sweep picks for "auto" / a range

    torch.manual_seed(cfg.seed + 2)
    model = rt.model(ClusteringModel(contrastive.backbone, k, num_heads=cc.num_heads))
    # Frozen backbone (the paper's ImageNet setting): only the linear heads learn, BN stays fixed.
    params = model.heads.parameters() if cc.freeze_backbone else model.parameters()
    trainer = Trainer(
        ctx, model, params, cc.optim, epochs=cc.epochs, batch_size=cc.batch_size, n=images.shape[0], stream=2
    )
    heads = _HeadInputs(model, images, rt, cc, _augmentation(cfg, images.shape[-1]), trainer.g)
    best = _train(trainer, model, heads, neighbors, cc)
    kept, head_losses = _keep_best(model, heads, neighbors, best)

    out_meta = {**meta, "num_clusters": k, "num_heads": 1, "head": kept, "head_losses": head_losses}
    out_meta["kept_epoch"] = best["epoch"] if best else 0
    save_clustering(run.scan_model_path, model, out_meta)
    run.update_json(run.history_path, "clustering", trainer.history)
    results = write_outputs(ctx, model, images, data, "scan", final=not cfg.selflabel.enabled)
    summary = {"epochs": len(trainer.history), "head": kept, "kept_epoch": out_meta["kept_epoch"], "num_clusters": k}
    if cfg.k is None:
        summary["num_clusters_chosen"] = k  # the service records it in the run's config
    return {**summary, "head_losses": head_losses, **results}


def _partners(run, n: int, rt) -> torch.Tensor:
    """(N, K+1) partner ids: the image itself, then its K mined neighbours. The reference draws the
    partner from the K neighbours *and the anchor itself* (its faiss search returns the sample
    first): one pair in K+1 is the image against another view of itself. neighbors.npy keeps self
    out (it also serves /neighbors and the purity figure)."""
    mined = torch.from_numpy(np.load(run.neighbors_path))
    return torch.cat([torch.arange(n).unsqueeze(1), mined], dim=1).to(rt.device)


def _augmentation(cfg, size: int):
    """SCAN's strong augmentation (CIFAR/STL), or SimCLR's (the paper's ImageNet setting)."""
    cc, pc = cfg.clustering, cfg.pretext
    if cc.augmentation == "strong":
        return StrongAugment(size, cutout=cc.cutout, flip=pc.flip)
    return simclr_augment(size, pc)


def _train(trainer: Trainer, model, heads: _HeadInputs, neighbors: torch.Tensor, cc) -> dict[str, Any] | None:
    """Train every head on (anchor, partner) pairs; the best (epoch, head) so far, as the paper's
    validation criterion picks it: the lowest loss measured without augmentation over every image
    and all of its neighbours."""
    rt = heads.rt
    best = trainer.resume().get("best")
    for epoch in trainer.epochs():
        model.eval() if cc.freeze_backbone else model.train()
        for idx in trainer.batches():
            idx = idx.to(rt.device)
            # One partner per anchor, drawn uniformly from itself and its K neighbours.
            pick = torch.randint(neighbors.shape[1], (idx.numel(),), generator=trainer.g, device=rt.device)
            logits = heads.logits(torch.cat([idx, neighbors[idx, pick]]))
            total, _, _ = scan_loss_per_head(logits[:, : idx.numel()], logits[:, idx.numel() :], cc.entropy_weight)
            trainer.step(total.sum() / cc.num_heads, idx.numel())
        losses = heads.full_losses(neighbors)
        head = int(np.argmin(losses))
        if best is None or losses[head] < best["loss"]:
            best = {"epoch": epoch + 1, "head": head, "loss": losses[head], "state": cpu_state(model)}
        trainer.end_epoch({"head_losses": losses, "best_epoch": best["epoch"]}, extra={"best": best})
    return best


def _keep_best(model, heads: _HeadInputs, neighbors: torch.Tensor, best: dict[str, Any] | None) -> tuple[int, list]:
    """Load the best epoch's weights and keep its lowest-loss head only; (that head, every head's loss)."""
    if best is not None:
        model.load_state_dict(best["state"])
    head_losses = heads.full_losses(neighbors)
    kept = int(np.argmin(head_losses))
    model.keep_head(kept)
    model.eval()
    return kept, head_losses


class _HeadInputs:
    """What the heads see: strong views through the backbone, or (frozen backbone, no
    augmentation) features computed once, which costs seconds instead of a backbone pass a step."""

    def __init__(self, model, images, rt, cc, aug, g):
        self.model, self.images, self.rt, self.cc, self.aug, self.g = model, images, rt, cc, aug, g
        self.features = None
        if cc.freeze_backbone and not cc.augment:
            model.eval()
            self.features = predict_all(model.features, images, rt).to(rt.device)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        if self.features is not None:
            return self._heads(self.features[idx]).float()
        v = self.rt.prepare(self.aug(take(self.images, idx, self.rt), self.g))
        with self.rt.autocast():
            if not self.cc.freeze_backbone:
                return self.model(v).float()
            with torch.no_grad():
                feats = self.model.features(v)
            return self._heads(feats).float()

    def _heads(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(feats) for head in self.model.heads])

    @torch.no_grad()
    def full_losses(self, neighbors: torch.Tensor) -> list[float]:
        """Eq. 2 of every head over the whole dataset, unaugmented, all neighbours."""
        was_training = self.model.training
        self.model.eval()
        if self.features is not None:
            probs = self._heads(self.features).float().softmax(-1).cpu()
        else:
            probs = predict_all(lambda x: self.model(x).float().softmax(-1), self.images, self.rt)
        self.model.train(was_training)
        return [float(v) for v in scan_loss_all_neighbors(probs, neighbors.cpu(), self.cc.entropy_weight)]
