"""Why the clustering step cannot separate Fashion-MNIST's upper-body garments (docs/fashion.md,
section 11). A diagnosis that uses the labels, which the pipeline never does, on a finished
`bench/accuracy.py` run with frozen-feature clustering (the CPU recipe):

    python bench/accuracy.py --out bench/out/fashion-mnist
    python bench/fashion_diagnosis.py bench/out/fashion-mnist

1. The run's clustering stage again, on a copy of the run, with neighbours chosen by label: the
   same-class images among the 50 nearest first (local and purer than mining gives), and 20
   random images of the same class (spanning the class). Test ACC of each SCAN model.
2. SCAN's loss (Eq. 2, all neighbours, no augmentation: what the stage minimises and selects by)
   of the run's SCAN head, of a supervised linear probe on the same features (its logits at the
   best of a few scales) and of the smoothed labels, on the mined and on the local neighbours.
   Lower is better; if the SCAN head is lowest, no clustering option can reach the classes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ml.data import load_source
from ml.device import select_runtime
from ml.evaluate import cluster_metrics
from ml.index import mine_neighbors, neighbor_purity
from ml.losses import scan_loss_all_neighbors
from ml.pipeline import load_config, run_stage
from ml.predictor import Predictor
from ml.rundir import RunDir
from ml.saved_models import load_clustering, load_contrastive
from ml.stages.common import predict_all, resident_images

# What the clustering stage reads; everything it and later stages write is left behind.
CLUSTERING_INPUTS = ("config.json", "pretext.pt", "features.npy", "index.faiss", "metrics.json")


def local_same_class(features: np.ndarray, labels: np.ndarray, k: int = 20, pool: int = 50) -> np.ndarray:
    """The k nearest neighbours, the same-class ones among the ``pool`` nearest moved to the front."""
    ids, _ = mine_neighbors(features, k=pool)
    same = labels[ids] == labels[:, None]
    order = np.argsort(~same, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ids, order, axis=1)


def random_same_class(labels: np.ndarray, k: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((len(labels), k), dtype=np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        out[members] = rng.choice(members, size=(len(members), k))
    return out


def recluster(run: Path, neighbors: np.ndarray, out: Path, train, test) -> float:
    """Test ACC of the clustering stage rerun on a copy of ``run`` with these neighbours."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in CLUSTERING_INPUTS:
        shutil.copy(run / name, out / name)
    np.save(out / "neighbors.npy", neighbors.astype(np.int64))
    run_stage("clustering", out, train)
    pred = Predictor.load(out, model="scan").predict(np.asarray(test.images))
    return cluster_metrics(pred, np.asarray(test.labels))["acc"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a finished bench/accuracy.py run directory")
    ap.add_argument("--data", default="fashion-mnist", help="the data the run trained on")
    args = ap.parse_args()

    run = RunDir(args.run)
    cfg = load_config(args.run)
    if not (cfg.clustering.freeze_backbone and not cfg.clustering.augment):
        sys.exit(f"{args.run}: this diagnosis is for frozen-feature clustering without augmentation (the CPU recipe)")
    train = load_source(args.data, split="train", cache_dir=Path(".cache/scan"))
    test = load_source(args.data, split="test", cache_dir=Path(".cache/scan"))
    labels = np.array(train.labels)  # a writable copy: torch.from_numpy shares it
    features = np.load(run.features_path)
    mined = np.load(run.neighbors_path)
    local = local_same_class(features, labels, k=mined.shape[1])

    scratch = args.run / "diagnosis"
    print(f"mined neighbours: purity {neighbor_purity(mined, labels):.3f}")
    for name, nb in (("local-same-class", local), ("random-same-class", random_same_class(labels, mined.shape[1]))):
        acc = recluster(args.run, nb, scratch / name, train, test)
        print(f"{name} neighbours: purity {neighbor_purity(nb, labels):.3f}, SCAN test ACC {acc:.3f}", flush=True)

    # The heads see the backbone's raw features; so does the probe.
    rt = select_runtime("cpu", cfg.precision, cfg.channels_last)
    contrastive, _ = load_contrastive(run.pretext_path)
    raw = predict_all(contrastive.features, resident_images(train.images, rt, cfg.image_size), rt)
    scan, _ = load_clustering(run.scan_model_path)
    with torch.no_grad():
        scan_probs = scan.heads[0](raw).softmax(-1)
    standardised = StandardScaler().fit_transform(raw.numpy())
    with warnings.catch_warnings():  # 300 iterations are enough to rank partitions (train ACC ~0.88)
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe = LogisticRegression(max_iter=300).fit(standardised, labels)
    logits = torch.from_numpy(probe.decision_function(standardised)).float()
    onehot = torch.nn.functional.one_hot(torch.from_numpy(labels), int(labels.max()) + 1).float()
    w = cfg.clustering.entropy_weight

    def loss(probs: torch.Tensor, nb: np.ndarray) -> float:
        return float(scan_loss_all_neighbors(probs, torch.from_numpy(nb), w)[0])

    print(f"supervised linear probe: train ACC {(logits.argmax(1).numpy() == labels).mean():.3f}")
    for name, nb in (("mined", mined), ("local-same-class", local)):
        probe_loss = min((loss((logits * s).softmax(-1), nb), s) for s in (0.5, 1, 2, 4, 8, 16))
        print(
            f"Eq. 2 on {name} neighbours: SCAN head {loss(scan_probs, nb):.3f}, "
            f"probe {probe_loss[0]:.3f} (logits x{probe_loss[1]}), "
            f"labels smoothed by 0.05 {loss(onehot * 0.95 + 0.05 / onehot.shape[1], nb):.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
