"""Losses of the three SCAN steps: pretext (SimCLR / MoCo v2), clustering (SCAN Eq. 2), self-labeling.

Each is a small pure function. They compute in float32 whatever the logits' dtype, so they are safe
to call on bf16 outputs under ``torch.autocast``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["nt_xent_loss", "moco_loss", "scan_loss", "scan_loss_per_head", "scan_loss_all_neighbors", "selflabel_loss"]

# Floor for probabilities inside a log: keeps the loss finite when softmax saturates to exact 0.
_EPS = 1e-8


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float = 0.1) -> Tensor:
    """NT-Xent of SimCLR (Chen et al. 2020, Eq. 1), symmetric over both views.

    z1, z2: (B, D) L2-normalised projections of two views of the same B images. Each of the 2B
    samples is an anchor; its positive is the other view of its image and the other 2B - 2 samples
    are negatives. Returns the mean over the 2B anchors (a scalar).

    Example: with z1 = z2 = two orthogonal unit vectors and temperature t, every anchor sees its
    positive at similarity 1 and two negatives at 0, so the loss is log(1 + 2 exp(-1/t)).
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must both be (B, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    batch = z1.shape[0]
    z = torch.cat([z1, z2]).float()
    logits = z @ z.T / temperature
    # A sample is never its own negative.
    self_mask = torch.eye(2 * batch, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    idx = torch.arange(batch, device=z.device)
    targets = torch.cat([idx + batch, idx])
    return F.cross_entropy(logits, targets)


def moco_loss(q: Tensor, k: Tensor, queue: Tensor, temperature: float = 0.2) -> Tensor:
    """InfoNCE of MoCo v2 (He et al. 2020, Eq. 1; Chen et al. 2020).

    q: (B, D) normalised queries, k: (B, D) normalised keys of the other view (momentum encoder),
    queue: (Q, D) normalised negatives. Logits are [q.k, q.queue] / temperature with the positive at
    index 0. Keys and queue get no gradient (stop-gradient, as in MoCo). Returns the batch mean.

    Example: q = k = e1, queue = [e2, -e1], temperature 1: -log(e / (e + 1 + 1/e)).
    """
    q = q.float()
    k = k.detach().float()
    queue = queue.detach().float()
    positive = (q * k).sum(dim=1, keepdim=True)
    negative = q @ queue.T
    logits = torch.cat([positive, negative], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def scan_loss_per_head(
    anchor_logits: Tensor, neighbor_logits: Tensor, entropy_weight: float = 5.0
) -> tuple[Tensor, Tensor, Tensor]:
    """SCAN loss (Van Gansbeke et al. 2020, Eq. 2) for each head separately.

    anchor_logits, neighbor_logits: (H, N, K) or (N, K) logits of N anchors and one mined neighbour
    each. With p = softmax(anchor), q = softmax(neighbour), pbar = mean_i p_i:

        consistency = -1/N sum_i log <p_i, q_i>
        entropy     = -sum_c pbar_c log pbar_c          (returned as the positive entropy)
        total       = consistency - entropy_weight * entropy

    Returns (total, consistency, entropy), each of shape (H,) (shape (1,) for (N, K) input).

    Example: anchors [0, 0] and [ln 3, 0], neighbours [ln 3, 0] and [0, ln 3] give <p, q> = 0.5 and
    0.375, pbar = [0.625, 0.375], so consistency = -(ln 0.5 + ln 0.375) / 2.
    """
    if anchor_logits.shape != neighbor_logits.shape:
        raise ValueError(
            f"anchor and neighbour logits differ: {tuple(anchor_logits.shape)} vs {tuple(neighbor_logits.shape)}"
        )
    if anchor_logits.ndim == 2:
        anchor_logits, neighbor_logits = anchor_logits.unsqueeze(0), neighbor_logits.unsqueeze(0)
    if anchor_logits.ndim != 3:
        raise ValueError(f"expected (N, K) or (H, N, K) logits, got {tuple(anchor_logits.shape)}")
    # float32 softmax: bf16 probabilities are too coarse for the log of a dot product near 1.
    p = F.softmax(anchor_logits.float(), dim=-1)
    q = F.softmax(neighbor_logits.float(), dim=-1)
    consistency = -_log_agreement(p, q).mean(dim=-1)
    entropy = mean_entropy(p)
    total = consistency - entropy_weight * entropy
    return total, consistency, entropy


def scan_loss_all_neighbors(probs: Tensor, neighbors: Tensor, entropy_weight: float = 5.0, chunk: int = 8192) -> Tensor:
    """Eq. 2 over a whole dataset without sampling: every image against every one of its mined
    neighbours (what the paper's "lowest loss" model selection evaluates, no augmentation).

    probs: (H, N, K) or (N, K) cluster probabilities of all N images; neighbors: (N, M) indices.
    Returns the per-head total loss, shape (H,). Same terms and floor as ``scan_loss_per_head``;
    anchors are processed in chunks so memory stays at (chunk, M, K).
    """
    if probs.ndim == 2:
        probs = probs.unsqueeze(0)
    probs = probs.float()
    nb = neighbors.to(probs.device)
    totals = []
    for p in probs:
        log_sum = p.new_zeros(())
        for i in range(0, p.shape[0], chunk):
            log_sum += _log_agreement(p[i : i + chunk].unsqueeze(1), p[nb[i : i + chunk]]).sum()
        consistency = -log_sum / nb.numel()
        totals.append(consistency - entropy_weight * mean_entropy(p))
    return torch.stack(totals)


def _log_agreement(p: Tensor, q: Tensor) -> Tensor:
    """log <p, q> over the last axis, floored so that disagreeing one-hot predictions stay finite."""
    return (p * q).sum(dim=-1).clamp_min(_EPS).log()


def mean_entropy(p: Tensor) -> Tensor:
    """Entropy of the mean prediction over the sample axis (-2): the term that spreads clusters."""
    mean_p = p.mean(dim=-2)
    return -(mean_p * mean_p.clamp_min(_EPS).log()).sum(dim=-1)


def scan_loss(
    anchor_logits: Tensor, neighbor_logits: Tensor, entropy_weight: float = 5.0
) -> tuple[Tensor, Tensor, Tensor]:
    """SCAN loss (Eq. 2) summed over heads: returns scalar (total, consistency, entropy).

    Accepts (N, K) or (H, N, K) logits; with several heads each term is the sum over heads (the
    heads are trained jointly, as in the reference). See ``scan_loss_per_head`` for the formula
    and for per-head values (used to pick the best head).

    Example::

        total, consistency, entropy = scan_loss(model(anchors), model(neighbours), entropy_weight=5.0)
        total.backward()
    """
    total, consistency, entropy = scan_loss_per_head(anchor_logits, neighbor_logits, entropy_weight)
    return total.sum(), consistency.sum(), entropy.sum()


def selflabel_loss(
    weak_logits: Tensor,
    strong_logits: Tensor,
    threshold: float = 0.99,
    class_balance: bool = True,
    cluster_quota: float = 0.0,
) -> tuple[Tensor, int]:
    """Self-labeling loss (SCAN Sec. 2.3 and 3.1): cross-entropy on confident pseudo-labels.

    weak_logits, strong_logits: (N, K) logits of a weak and a strong view of the same images.
    Samples whose weak-view max probability exceeds ``threshold`` get their argmax as pseudo-label
    (no gradient flows through the weak view); the loss is the cross-entropy of the strong view on
    those samples. With ``class_balance`` each class is weighted by 1 / (its count among the
    confident samples), normalised by the summed weights, so the loss is the mean over present
    classes of each class's mean cross-entropy ("weights inversely proportional to the number of
    occurrences in the batch after thresholding").

    Returns (loss, n_confident). With no confident sample the loss is ``0 * strong_logits.sum()``:
    zero, but with a grad_fn so a training step can run unchanged.

    Example: weak [[10, 0], [10, 0], [0, 10], [0, 0]] -> pseudo-labels 0, 0, 1 for the first three.
    """
    if weak_logits.shape != strong_logits.shape or weak_logits.ndim != 2:
        raise ValueError(
            f"expected two (N, K) logit tensors, got {tuple(weak_logits.shape)} and {tuple(strong_logits.shape)}"
        )
    probs = F.softmax(weak_logits.detach().float(), dim=1)
    confidence, target = probs.max(dim=1)
    mask = confidence > threshold
    if cluster_quota > 0:
        mask |= _top_of_each_cluster(confidence, target, cluster_quota)
    n_confident = int(mask.sum())
    if n_confident == 0:
        return strong_logits.sum() * 0.0, 0
    logits = strong_logits[mask].float()
    target = target[mask]
    weight = None
    if class_balance:
        counts = torch.bincount(target, minlength=logits.shape[1]).float()
        weight = 1.0 / counts.clamp_min(1.0)
    return F.cross_entropy(logits, target, weight=weight), n_confident


def _top_of_each_cluster(confidence: Tensor, target: Tensor, quota: float) -> Tensor:
    """The ceil(quota * size) most confident members of every predicted cluster in the batch."""
    keep = torch.zeros_like(confidence, dtype=torch.bool)
    for c in target.unique():
        members = (target == c).nonzero().squeeze(1)
        top = confidence[members].topk(math.ceil(quota * members.numel())).indices
        keep[members[top]] = True
    return keep
