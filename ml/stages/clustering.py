"""Stage 3: SCAN clustering (SCAN section 2.2, Eq. 2). Each image and one of its mined neighbours,
both strongly augmented, are pushed to agree, while the entropy term keeps clusters from
collapsing. Several heads train at once; the head with the lowest loss over the whole dataset is kept.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ml.artifacts import load_contrastive, save_clustering
from ml.augment import StrongAugment
from ml.losses import scan_loss_per_head
from ml.models import ClusteringModel
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


def run_clustering(ctx: StageContext, data) -> dict[str, Any]:
    cfg, cc, rt, run = ctx.cfg, ctx.cfg.clustering, ctx.rt, ctx.run
    if run.scan_model_path.exists():
        return {"resumed": "done"}
    images = resident_images(data.images, rt, cfg.image_size)
    n, size = images.shape[0], images.shape[-1]
    neighbors = torch.from_numpy(np.load(run.neighbors_path)).to(rt.device)
    contrastive, meta = load_contrastive(run.pretext_path)

    torch.manual_seed(cfg.seed + 2)
    model = rt.model(ClusteringModel(contrastive.backbone, cfg.num_clusters, num_heads=cc.num_heads))
    # Frozen backbone (the paper's ImageNet setting): only the linear heads learn, BN stays fixed.
    params = model.heads.parameters() if cc.freeze_backbone else model.parameters()
    opt = make_optimizer(params, cc.optim)
    aug = StrongAugment(size, cutout=cc.cutout, flip=cfg.pretext.flip)
    g = ctx.generator(2)

    start, history, _ = resume(ctx, model, opt, g)

    steps = max(n // cc.batch_size, 1)
    total_steps = max(cc.epochs * steps, 1)

    def forward_heads(x: torch.Tensor) -> torch.Tensor:
        if not cc.freeze_backbone:
            return model(x)
        with torch.no_grad():
            feats = model.features(x)
        return torch.stack([head(feats) for head in model.heads])

    features = None
    if cc.freeze_backbone and not cc.augment:
        model.eval()
        features = predict_all(model.features, images, rt).to(rt.device)

    def logits_for(all_idx: torch.Tensor) -> torch.Tensor:
        if features is not None:
            f = features[all_idx]
            return torch.stack([head(f) for head in model.heads]).float()
        v = rt.prepare(aug(take(images, all_idx, rt), g))
        with rt.autocast():
            return forward_heads(v).float()

    def train_epoch(epoch: int):
        model.eval() if cc.freeze_backbone else model.train()
        for i, idx in enumerate(batches(n, cc.batch_size, g, drop_last=True)):
            set_lr(opt, cc.optim, (epoch * steps + i) / total_steps)
            b = idx.numel()
            # One neighbour per anchor, drawn uniformly from its K mined neighbours (self excluded).
            pick = torch.randint(neighbors.shape[1], (b,), generator=g, device=rt.device)
            nidx = neighbors[idx.to(rt.device), pick]
            logits = logits_for(torch.cat([idx.to(rt.device), nidx]))
            total, _, _ = scan_loss_per_head(logits[:, :b], logits[:, b:], cc.entropy_weight)
            loss = total.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            yield loss.item() / cc.num_heads, b

    def end_epoch(epoch: int, loss: float):
        history.append({"epoch": epoch + 1, "loss": loss})
        save_checkpoint(ctx, model, opt, g, epoch, history)
        return {}

    run_epochs(ctx, epochs=cc.epochs, start_epoch=start, steps_per_epoch=steps,
               train_epoch=train_epoch, end_epoch=end_epoch)

    model.eval()
    head_losses = _head_losses(model, images, neighbors, rt, cc.entropy_weight)
    best = int(np.argmin(head_losses))
    model.keep_head(best)
    out_meta = {**meta, "num_clusters": cfg.num_clusters, "num_heads": 1, "head": best,
                "head_losses": head_losses}
    save_clustering(run.scan_model_path, model, out_meta)
    run.update_json(run.history_path, "clustering", history)
    results = write_results(ctx, model, images, data, "scan", final=not cfg.selflabel.enabled)
    return {"epochs": len(history), "head": best, "head_losses": head_losses, **results}


@torch.no_grad()
def _head_losses(model, images, neighbors, rt, entropy_weight: float) -> list[float]:
    """Eq. 2 for every head over the whole dataset, without augmentation: every image against all
    of its mined neighbours. The lowest is the head SCAN keeps."""
    probs = predict_all(lambda x: model(x).float().softmax(-1), images, rt)  # (H, N, K)
    nb = neighbors.cpu()
    losses = []
    for p in probs:
        log_sum = 0.0
        for i in range(0, p.shape[0], 8192):  # chunks keep (N, K_neighbours, K) bounded
            dots = (p[i:i + 8192].unsqueeze(1) * p[nb[i:i + 8192]]).sum(-1).clamp_min(1e-7)
            log_sum += float(dots.log().sum())
        consistency = -log_sum / nb.numel()
        mean_p = p.mean(0).clamp_min(1e-12)
        neg_entropy = (mean_p * mean_p.log()).sum()
        losses.append(float(consistency + entropy_weight * neg_entropy))
    return losses
