"""How many clusters? SCAN's heads trained for several K on frozen pretext features, and K picked
by a label-free criterion (docs/num_clusters.md has the measured curves that chose it).

SCAN (Eq. 2) needs K up front. With ``num_clusters: "auto"`` or a range, the clustering stage first
runs this sweep: for every candidate K, ``heads_per_k`` linear heads learn Eq. 2 on the features
the pretext stage saved (no backbone pass, no augmentation: seconds to a minute on a CPU), all K at
once as one masked matrix of heads. Each head's clusters are scored by how well they respect the
mined neighbour graph beyond what their sizes alone would give:

    agreement = share of (image, neighbour) pairs put in the same cluster
    chance    = sum_c (n_c / N)^2, the same share for clusters of these sizes drawn at random
    modularity = agreement - chance        (Newman's modularity of the partition on the k-NN graph)

criterion(K) is the mean over the K's heads, their standard deviation its noise. Merging two
classes lifts agreement a little but chance a lot (1/K grows); splitting one costs the neighbour
pairs across the cut: the curve rises to the K where clusters match the neighbourhoods, then stays
flat or falls. The smallest K within one standard deviation of the highest is chosen (the "one
standard error" rule of CART and the gap statistic). The curve also carries Eq. 2's terms of each
K's lowest-loss head and the agreement between its heads, for the user to read.

    curve, chosen = choose_num_clusters(features, neighbors, range(2, 21))
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score

from ml.config import SWEEP_BATCH, SWEEP_HEADS_PER_K, RunConfig, candidate_ks
from ml.losses import mean_entropy, scan_loss_all_neighbors
from ml.rundir import atomic_write_text

CRITERION = "neighbor_modularity"
# Probabilities (heads x images x max K) held at once to measure Eq. 2 (256 MB of float32); beyond,
# Eq. 2 is measured on a sample of anchors. The criterion itself needs only cluster ids.
PROBS_MAX = 1 << 26


def neighbor_agreement(pred: np.ndarray, neighbors: np.ndarray) -> tuple[float, float]:
    """(agreement, chance): the share of (image, neighbour) pairs in the same cluster, and that
    share for clusters of the same sizes drawn at random."""
    pred = np.asarray(pred)
    agree = float((pred[:, None] == pred[np.asarray(neighbors)]).mean())
    share = np.bincount(pred) / pred.size
    return agree, float((share**2).sum())


def neighbor_modularity(pred: np.ndarray, neighbors: np.ndarray) -> float:
    """Modularity of the clusters on the mined neighbour graph: agreement - chance (0: no better
    than clusters of these sizes drawn at random; at most 1 - 1/K)."""
    agree, chance = neighbor_agreement(pred, neighbors)
    return agree - chance


class _MaskedHeads(torch.nn.Module):
    """len(ks) x heads_per_k linear heads as one (d, sum of K) matrix (one 2-D matmul a step),
    whose outputs are laid out padded to max(ks) with -inf logits: every head is an ordinary K-way
    softmax, and all of them train together."""

    def __init__(self, dim: int, ks: Sequence[int], heads_per_k: int, generator: torch.Generator):
        super().__init__()
        self.ks = [k for k in ks for _ in range(heads_per_k)]
        kmax, m = max(ks), len(self.ks)
        self.shape = (m, kmax)
        bound = 1.0 / math.sqrt(dim)  # nn.Linear's initialisation
        total = sum(self.ks)
        self.weight = torch.nn.Parameter((torch.rand(dim, total, generator=generator) * 2 - 1) * bound)
        self.bias = torch.nn.Parameter((torch.rand(total, generator=generator) * 2 - 1) * bound)
        slots = torch.cat([torch.arange(k) + h * kmax for h, k in enumerate(self.ks)])
        self.register_buffer("slots", slots)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, d) -> (M, B, Kmax)
        padded = x.new_full((x.shape[0], self.shape[0] * self.shape[1]), float("-inf"))
        padded[:, self.slots] = torch.addmm(self.bias, x, self.weight)
        return padded.view(x.shape[0], *self.shape).transpose(0, 1)


def sweep(
    features: np.ndarray,
    neighbors: np.ndarray,
    ks: Sequence[int],
    *,
    heads_per_k: int = SWEEP_HEADS_PER_K,
    steps: int = 1000,
    batch_size: int = SWEEP_BATCH,
    lr: float = 1e-3,
    entropy_weight: float = 5.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    should_stop=None,
    keep_assignments: bool = False,
) -> list[dict[str, Any]]:
    """Train Eq. 2's heads for every K in ``ks`` on fixed features; one record per K (ascending):
    k, criterion (neighbor_modularity), neighbor_agreement, loss / consistency / entropy of the kept
    head (Eq. 2 over every image and all its neighbours, no augmentation), normalized_entropy
    (entropy / log K), head_agreement (mean ARI between the K's heads), clusters_used and the
    smallest cluster's share. ``keep_assignments`` adds each K's cluster ids (for bench/).

    features (N, d): pretext features; neighbors (N, M): mined neighbour ids (self excluded).
    ``should_stop`` is polled every 100 steps (a canceled run); it raises to stop.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 2:
        raise ValueError("every K swept must be at least 2")
    g = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    # Standardised per dimension: linear heads on unit-norm features otherwise start near uniform
    # and learn slowly; standardising costs nothing and changes no neighbour.
    x = ((x - x.mean(0)) / x.std(0).clamp_min(1e-6)).to(device)
    nb = torch.as_tensor(np.asarray(neighbors, dtype=np.int64))
    partners = torch.cat([torch.arange(nb.shape[0])[:, None], nb], dim=1).to(device)
    heads = _MaskedHeads(x.shape[1], ks, heads_per_k, g).to(device)
    opt = torch.optim.Adam(heads.parameters(), lr=lr, weight_decay=1e-4)
    n = x.shape[0]
    batch = min(batch_size, n)
    # A fixed number of steps whatever N: linear heads on fixed features converge in a few hundred
    # (docs/num_clusters.md), so the sweep costs the same on 2k images as on 60k.
    for step in range(steps):
        if should_stop is not None and step % 100 == 0:
            should_stop()
        idx = torch.randperm(n, generator=g)[:batch].to(device)
        pick = torch.randint(partners.shape[1], (batch,), generator=g).to(device)
        pair = heads(torch.cat([x[idx], x[partners[idx, pick]]]))
        p = F.softmax(pair[:, :batch], dim=-1)
        q = F.softmax(pair[:, batch:], dim=-1)
        consistency = -(p * q).sum(-1).clamp_min(1e-8).log().mean(-1)
        loss = (consistency - entropy_weight * mean_entropy(p)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        # Cluster ids of every image under every head, a chunk at a time: the criterion is exact.
        chunks = [heads(x[i : i + 8192]).argmax(-1).to(torch.int16).cpu() for i in range(0, n, 8192)]
        preds = torch.cat(chunks, dim=1).numpy()  # (M, N); K <= 10,000 fits int16
        losses, entropies = _eq2(heads, x, nb, entropy_weight, g)
    return _score(preds, losses, entropies, ks, heads_per_k, nb.numpy(), entropy_weight, keep_assignments)


def _eq2(heads: _MaskedHeads, x, nb, entropy_weight: float, g) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 2's loss and entropy of every head, unaugmented, over every image and all its
    neighbours; beyond PROBS_MAX probabilities in memory, over a random sample of anchors."""
    m, kmax = heads.shape
    n = x.shape[0]
    if m * n * kmax <= PROBS_MAX:
        probs = F.softmax(heads(x), dim=-1).cpu()  # (M, N, Kmax)
        return scan_loss_all_neighbors(probs, nb, entropy_weight).numpy(), mean_entropy(probs).numpy()
    s = max(1, PROBS_MAX // (m * kmax * (nb.shape[1] + 1)))
    anchors = torch.randperm(n, generator=g)[:s]
    rows, where = torch.unique(torch.cat([anchors, nb[anchors].flatten()]), return_inverse=True)
    p = F.softmax(heads(x[rows.to(x.device)]), dim=-1).cpu()
    pa, pn = p[:, where[:s]], p[:, where[s:]].view(m, s, nb.shape[1], kmax)
    consistency = -(pa[:, :, None, :] * pn).sum(-1).clamp_min(1e-8).log().mean((1, 2))
    entropy = mean_entropy(pa)
    return (consistency - entropy_weight * entropy).numpy(), entropy.numpy()


def _score(preds, losses, entropies, ks, heads_per_k, nb_np, entropy_weight, keep=False) -> list[dict[str, Any]]:
    curve = []
    for j, k in enumerate(ks):
        rows = range(j * heads_per_k, (j + 1) * heads_per_k)
        best = min(rows, key=lambda r: float(losses[r]))
        pred = preds[best]
        entropy = float(entropies[best])
        heads_preds = [preds[r] for r in rows]
        pairs = [(a, b) for a in range(len(heads_preds)) for b in range(a + 1, len(heads_preds))]
        ari = [adjusted_rand_score(heads_preds[a], heads_preds[b]) for a, b in pairs]
        sizes = np.bincount(pred, minlength=k)
        agree, _ = neighbor_agreement(pred, nb_np)
        # Every head of this K is a replicate: the criterion is their mean, their spread its noise.
        modularity = [neighbor_modularity(q, nb_np) for q in heads_preds]
        curve.append(
            {
                "k": k,
                "criterion": float(np.mean(modularity)),
                "criterion_sd": float(np.std(modularity, ddof=1)) if len(modularity) > 1 else 0.0,
                "neighbor_agreement": agree,
                "loss": float(losses[best]),
                "consistency": float(losses[best]) + entropy_weight * entropy,
                "entropy": entropy,
                "normalized_entropy": entropy / math.log(k),
                "head_agreement": float(np.mean(ari)) if ari else None,
                "clusters_used": int((sizes > 0).sum()),
                "smallest_share": float(sizes.min() / pred.size),
            }
        )
        if keep:
            curve[-1]["assignments"] = pred
    return curve


def pick(curve: list[dict[str, Any]]) -> int:
    """The smallest K whose criterion is within one standard deviation (over its heads) of the
    highest: the "one standard error" rule of CART and the gap statistic. Past the true K the
    curve is flat to within that noise, and the simplest K it cannot tell apart is kept."""
    best = max(curve, key=lambda r: (r["criterion"], -r["k"]))
    floor = best["criterion"] - best.get("criterion_sd", 0.0)
    return int(min(r["k"] for r in curve if r["criterion"] >= floor))


def choose_num_clusters(features, neighbors, ks: Sequence[int], **kw) -> tuple[list[dict[str, Any]], int]:
    """(curve, chosen K): ``sweep`` then ``pick``."""
    curve = sweep(features, neighbors, ks, **kw)
    return curve, pick(curve)


def resolve_num_clusters(ctx) -> int:
    """The K the clustering stage trains (``ctx``: its StageContext): ``num_clusters`` when it is a
    number; else the sweep's choice, run once and kept in metrics.json["num_clusters"] (with the
    curve), so a restarted stage trains the same K. The run directory's config.json, where there
    is one (``scan train``), records the choice too. With several seeds the choice is the run's,
    made once and kept in the run directory itself: every seed trains that K."""
    cfg = ctx.cfg
    run = getattr(ctx.run, "run", ctx.run)  # a seed's folder (ml.rundir.SeedDir): its run's
    if cfg.k is not None:
        return cfg.k
    done = (run.read_json(run.metrics_path, {}) or {}).get("num_clusters")
    if isinstance(done, dict) and isinstance(done.get("chosen"), int):
        return done["chosen"]
    lo, hi = cfg.num_clusters_range
    features, neighbors = np.load(run.features_path), np.load(run.neighbors_path)
    ks = candidate_ks(lo, hi, features.shape[0])
    t0 = time.perf_counter()
    curve, chosen = choose_num_clusters(
        features,
        neighbors,
        ks,
        steps=cfg.clustering.sweep_steps,
        entropy_weight=cfg.clustering.entropy_weight,
        seed=cfg.seed,
        device=ctx.rt.device,
        should_stop=ctx.check_cancel,
    )
    asked = cfg.num_clusters if isinstance(cfg.num_clusters, str) else cfg.num_clusters.model_dump()
    record = {
        "asked": asked,
        "range": [lo, hi],
        "criterion": CRITERION,
        "chosen": chosen,
        "curve": curve,
        "seconds": time.perf_counter() - t0,
    }
    run.update_json(run.metrics_path, "num_clusters", record)
    if run.config_path.exists():
        stored = RunConfig.model_validate_json(run.config_path.read_text())
        if stored.k is None:
            atomic_write_text(run.config_path, stored.with_chosen_k(chosen).model_dump_json(indent=1))
    best = next(r for r in curve if r["k"] == chosen)
    ctx.note(
        f"num_clusters {asked!s}: chose K={chosen} of {len(ks)} candidates in {lo}..{min(hi, ks[-1])} "
        f"(neighbour modularity {best['criterion']:.3f}, the smallest K within noise of the highest)",
        {"num_clusters_chosen": chosen},
    )
    return chosen
