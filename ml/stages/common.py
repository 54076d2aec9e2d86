"""What every SCAN stage shares: progress reports, cancellation, and the dataset resident on the
device. The training loop itself is ml/stages/loop.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ml.augment import SimCLRAugment
from ml.config import PretextConfig, RunConfig
from ml.data import resize_to
from ml.device import Runtime
from ml.distributed import SINGLE, Group
from ml.rundir import RunDir


def simclr_augment(size: int, pc: PretextConfig) -> SimCLRAugment:
    """SimCLR's views as the pretext is configured: the pretext trains on them, and the clustering
    (the paper's ImageNet setting) and self-label (its SimCLR term) stages reuse them."""
    return SimCLRAugment(
        size,
        crop_scale=pc.crop_scale,
        flip=pc.flip,
        jitter=pc.jitter,
        jitter_p=pc.jitter_p,
        gray_p=pc.gray_p,
        invariances=pc.invariances,
    )


class Canceled(Exception):
    """Raised inside a stage when `should_cancel()` said so; the checkpoint of the last finished
    epoch stays, so a rerun resumes from it."""


@dataclass
class Progress:
    stage: str
    epoch: int | None  # 1-based epoch in progress (0 before the first; None: a note, no progress)
    epochs: int | None
    step: int | None  # 1-based step within the epoch
    steps: int | None
    loss: float | None = None
    images_per_s: float | None = None
    eta_s: float | None = None
    epoch_end: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)
    message: str | None = None  # a plain-words note for the run's events (e.g. a shortcut warning)


ProgressFn = Callable[[Progress], None]
CancelFn = Callable[[], bool]


@dataclass
class StageContext:
    stage: str
    run: RunDir
    cfg: RunConfig
    rt: Runtime
    progress: ProgressFn | None = None
    should_cancel: CancelFn | None = None
    group: Group = SINGLE  # this process's rank among the stage's data-parallel ranks

    def check_cancel(self) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise Canceled(f"{self.stage} canceled")

    def report(self, p: Progress) -> None:
        if self.progress is not None:
            self.progress(p)

    def note(self, message: str, metrics: dict[str, Any] | None = None) -> None:
        """A plain-words event outside the epoch count (epoch/step None leave the stage's progress
        as it is)."""
        self.report(
            Progress(self.stage, None, None, None, None, epoch_end=True, metrics=metrics or {}, message=message)
        )

    def generator(self, offset: int) -> torch.Generator:
        """A generator on the stage's device, seeded from the run seed and the stage, so runs are
        repeatable and stages draw independent streams."""
        g = torch.Generator(device=self.rt.device)
        g.manual_seed(self.cfg.seed * 1000 + offset)
        return g


# ---------------------------------------------------------------------------------------------
# Data resident on the device
# ---------------------------------------------------------------------------------------------


def resident_images(images: np.ndarray, rt: Runtime, size: int | None) -> torch.Tensor:
    """The whole uint8 dataset as one tensor, on the GPU when it fits (a quarter of free memory),
    brought to the training size first if the config asks for one, by `resize_to`."""
    x = torch.from_numpy(resize_to(images, size))
    if rt.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(rt.device)
        if x.numel() < free // 4:
            x = x.to(rt.device)
    return x


def take(images: torch.Tensor, idx: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """A batch of uint8 images on the compute device."""
    batch = images[idx.to(images.device)]
    return batch.to(rt.device, non_blocking=True)


def channel_stats(images: np.ndarray, sample: int = 10_000, seed: int = 0) -> tuple[list[float], list[float]]:
    """Per-channel mean/std in [0, 1] units, from a sample; the backbone normalises with them."""
    rng = np.random.default_rng(seed)
    n = images.shape[0]
    idx = np.sort(rng.choice(n, size=min(n, sample), replace=False))
    x = np.asarray(images[idx], dtype=np.float32) / 255.0
    mean = x.mean(axis=(0, 2, 3))
    std = x.std(axis=(0, 2, 3)) + 1e-3
    return mean.tolist(), std.tolist()


@torch.no_grad()
def predict_all(
    forward: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    rt: Runtime,
    batch_size: int = 1024,
    group: Group = SINGLE,
) -> torch.Tensor:
    """forward() over every image, no augmentation, in eval batches; result on the CPU, float32.
    With a data-parallel ``group`` each rank predicts its share of the rows of a 2-D result and every
    rank gets the whole."""
    if group.active and images.shape[0] >= group.world:
        mine = predict_all(forward, images[group.split(images.shape[0])], rt, batch_size)
        return group.gather_rows(mine.to(_gather_device(rt)), images.shape[0]).cpu()
    outs = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i : i + batch_size].to(rt.device, non_blocking=True)
        x = rt.prepare(x.float().div_(255))
        with rt.autocast():
            y = forward(x)
        outs.append(y.float().cpu())
    return torch.cat(outs, dim=-2 if outs[0].dim() == 3 else 0)


def _gather_device(rt: Runtime) -> torch.device:
    # NCCL moves CUDA tensors only; gloo CPU ones.
    return rt.device if rt.device.type == "cuda" else torch.device("cpu")
