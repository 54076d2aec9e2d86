"""A finished run, loaded for inference: cluster probabilities for new images and embeddings in
the space of the run's faiss index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ml.data import resize_to
from ml.device import select_runtime
from ml.rundir import RunDir
from ml.saved_models import load_clustering, load_contrastive


class Predictor:
    def __init__(self, model, meta: dict, embedder, embed_meta: dict, runtime, class_names=None):
        self.model, self.meta = model, meta
        self.embedder, self.embed_meta = embedder, embed_meta
        self.rt = runtime
        self.class_names = class_names

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "auto", model: str = "final") -> Predictor:
        """model: "final" (after self-labeling) or "scan" (the SCAN-stage model, for Table 1)."""
        run = RunDir(run_dir)
        path = run.model_path if model == "final" else run.scan_model_path
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: the run has not finished")
        rt = select_runtime(device, "fp32", False)
        model, meta = load_clustering(path, rt.device)
        embedder, embed_meta = load_contrastive(run.pretext_path, rt.device)
        return cls(model, meta, embedder, embed_meta, rt)

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def channels(self) -> int:
        return int(self.meta["channels"])

    @property
    def num_clusters(self) -> int:
        return int(self.meta["num_clusters"])

    def _batch(self, images: np.ndarray) -> torch.Tensor:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != self.channels:
            raise ValueError(f"expected uint8 images (N, {self.channels}, H, W), got {images.shape} {images.dtype}")
        # Other sizes are resized by the rule training used, so the pixels match exactly.
        x = torch.from_numpy(resize_to(images, self.image_size))
        return x.to(self.rt.device).float().div_(255)

    @torch.inference_mode()
    def predict(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """(N, K) cluster probabilities."""
        out = [
            self.model(self._batch(images[i : i + batch_size]))[0].float().softmax(-1).cpu()
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(out).numpy() if out else np.zeros((0, self.num_clusters), np.float32)

    @torch.inference_mode()
    def embed(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """(N, D) L2-normalised features in the space the run's neighbours were mined in."""
        head = self.embed_meta.get("feature_space", "head") == "head"
        out = []
        for i in range(0, len(images), batch_size):
            x = self._batch(images[i : i + batch_size])
            z = self.embedder(x) if head else F.normalize(self.embedder.features(x), dim=1)
            out.append(z.float().cpu())
        return torch.cat(out).numpy()
