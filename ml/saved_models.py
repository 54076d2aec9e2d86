"""Saved models: a state dict plus the few facts needed to rebuild the module around it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ml.networks import ClusteringModel, ContrastiveModel, build_backbone
from ml.rundir import save_torch


def model_meta(arch: str, channels: int, size: int, mean, std, **extra: Any) -> dict[str, Any]:
    return {"arch": arch, "channels": channels, "image_size": size, "mean": list(mean), "std": list(std), **extra}


def save_contrastive(path: Path, model: ContrastiveModel, meta: dict[str, Any]) -> None:
    save_torch(path, {"meta": meta, "state_dict": cpu_state(model)})


def load_contrastive(path: Path, device: str | torch.device = "cpu") -> tuple[ContrastiveModel, dict[str, Any]]:
    blob = torch.load(path, map_location="cpu", weights_only=False)
    meta = blob["meta"]
    backbone = _backbone(meta)
    model = ContrastiveModel(backbone, hidden_dim=meta["hidden_dim"], feature_dim=meta["feature_dim"])
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval(), meta


def save_clustering(path: Path, model: ClusteringModel, meta: dict[str, Any]) -> None:
    save_torch(path, {"meta": meta, "state_dict": cpu_state(model)})


def load_clustering(path: Path, device: str | torch.device = "cpu") -> tuple[ClusteringModel, dict[str, Any]]:
    blob = torch.load(path, map_location="cpu", weights_only=False)
    meta = blob["meta"]
    backbone = _backbone(meta)
    model = ClusteringModel(backbone, meta["num_clusters"], num_heads=meta["num_heads"])
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval(), meta


def _backbone(meta: dict[str, Any]):
    # Models saved before a field existed have its default (width 32, no canonicalisation).
    return build_backbone(
        meta["arch"],
        meta["channels"],
        meta["mean"],
        meta["std"],
        meta.get("width", 32),
        canonicalise=meta.get("canonicalise", False),
    )


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a module's state dict (for saving, or keeping the best weights)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
