"""Export a finished run's classifier (backbone + the kept SCAN head) as ONNX or TorchScript.

The exported graph takes float32 images in [0, 1], NCHW (that is `uint8 / 255`: the per-channel
normalisation is a buffer inside the backbone) and returns cluster probabilities (N, K), the same
numbers `/predict` answers. Beside the model goes `preprocessing.json`, all an app needs to feed it:

    {"format": "onnx", "model_file": "model.onnx", "input": {"name": "images", "layout": "NCHW",
     "dtype": "float32", "channels": 1, "height": 8, "width": 8, "scale": "uint8 / 255"},
     "output": {"name": "probabilities", "num_clusters": 10}, "cluster_labels": [...]}

    archive = export_archive(run_dir, "onnx")      # a zip, cached in run_dir/export/
"""

from __future__ import annotations

import json
import threading
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ml.clusters import matched_labels, read_clusters
from ml.rundir import RunDir, atomic_write

Format = Literal["onnx", "torchscript"]
FORMATS: tuple[str, ...] = ("onnx", "torchscript")
MODEL_FILES = {"onnx": "model.onnx", "torchscript": "model.pt"}
OPSET = 17  # understood by every onnxruntime since 1.12


class ProbabilityModel(nn.Module):
    """Wraps a classifier that maps [0, 1] images to logits (N, K) or (heads, N, K) and keeps one
    head's softmax: the deployable function."""

    def __init__(self, classifier: nn.Module, head: int = 0) -> None:
        super().__init__()
        self.classifier = classifier
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(images)
        if logits.dim() == 3:
            logits = logits[self.head]
        return torch.softmax(logits.float(), dim=1)


def export_model(
    classifier: nn.Module, fmt: Format, path: Path, *, channels: int, image_size: int, head: int = 0
) -> Path:
    """Write `classifier` (CPU, eval mode) to `path` in `fmt`, with a dynamic batch dimension."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    module = ProbabilityModel(classifier, head).cpu().eval()
    example = torch.rand(2, channels, image_size, image_size)
    path = Path(path)
    with torch.no_grad(), warnings.catch_warnings():
        # Both exporters below are flagged deprecated on torch >= 2.9 but are the ones that work
        # offline without extra packages (the dynamo ONNX exporter needs onnxscript).
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        # CanonicalColour's border width is computed from the image size, which an export fixes.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module="ml.networks")
        if fmt == "onnx":

            def write(f):
                torch.onnx.export(
                    module,
                    (example,),
                    f,
                    input_names=["images"],
                    output_names=["probabilities"],
                    opset_version=OPSET,
                    dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}},
                    dynamo=False,
                )
        else:
            traced = torch.jit.trace(module, example)

            def write(f):
                torch.jit.save(traced, f)

        atomic_write(path, write)
    return path


def preprocessing_spec(
    fmt: Format,
    *,
    channels: int,
    image_size: int,
    num_clusters: int,
    cluster_labels: Sequence[str | None] | None = None,
) -> dict:
    return {
        "format": fmt,
        "model_file": MODEL_FILES[fmt],
        "input": {
            "name": "images",
            "layout": "NCHW",
            "dtype": "float32",
            "channels": channels,
            "height": image_size,
            "width": image_size,
            "scale": "uint8 / 255",
            "resize": "other sizes: scale to cover height x width (PIL bicubic, antialiased), then "
            "centre-crop; gray->RGB by replication, RGB->gray by PIL's luma "
            "(ml.data.conform_images, the rule ingest used)",
        },
        "output": {
            "name": "probabilities",
            "num_clusters": num_clusters,
            "meaning": "softmax over clusters; argmax is the cluster id",
        },
        "cluster_labels": list(cluster_labels) if cluster_labels is not None else None,
    }


_export_lock = threading.Lock()


def export_archive(run_dir: str | Path, fmt: Format, *, predictor=None) -> Path:
    """Export a finished run once and return the zip (model file + preprocessing.json).

    The zip is cached under `run_dir/export/` (a run's model never changes after it succeeded).
    `predictor` (an `ml.predictor.Predictor`) may be passed to reuse an already loaded model.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    rd = RunDir(run_dir)
    out_dir = rd.path / "export"
    archive = out_dir / f"model-{fmt}.zip"
    with _export_lock:  # two concurrent first downloads must not both export
        if archive.exists():
            return archive
        if predictor is None:
            from ml.predictor import Predictor

            predictor = Predictor.load(rd.path, device="cpu")
        classifier = _cpu_copy(predictor.model)
        num_clusters = int(predictor.num_clusters)
        model_path = export_model(
            classifier, fmt, out_dir / MODEL_FILES[fmt], channels=predictor.channels, image_size=predictor.image_size
        )
        labels = matched_labels(read_clusters(rd.clusters_path), num_clusters)
        spec = preprocessing_spec(
            fmt,
            channels=predictor.channels,
            image_size=predictor.image_size,
            num_clusters=num_clusters,
            cluster_labels=labels,
        )

        def write(f):
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                zf.write(model_path, MODEL_FILES[fmt])
                zf.writestr("preprocessing.json", json.dumps(spec, indent=1))

        atomic_write(archive, write)
        model_path.unlink(missing_ok=True)
        return archive


def _cpu_copy(model: nn.Module) -> nn.Module:
    import copy

    # Export on CPU: traced graphs must not capture a CUDA device, and the served copy stays put.
    return copy.deepcopy(model).cpu().float().eval()
