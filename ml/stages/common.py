"""What every SCAN stage shares: progress reports, cancellation, checkpoints, device-resident data,
optimisers and the epoch loop's bookkeeping."""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ml.config import OptimConfig, RunConfig
from ml.device import Runtime
from ml.rundir import RunDir, save_torch


class Canceled(Exception):
    """Raised inside a stage when `should_cancel()` said so; the checkpoint of the last finished
    epoch stays, so a rerun resumes from it."""


@dataclass
class Progress:
    stage: str
    epoch: int          # 1-based epoch in progress (0 before the first)
    epochs: int
    step: int           # 1-based step within the epoch
    steps: int
    loss: float | None = None
    images_per_s: float | None = None
    eta_s: float | None = None
    epoch_end: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)


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

    def check_cancel(self) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise Canceled(f"{self.stage} canceled")

    def report(self, p: Progress) -> None:
        if self.progress is not None:
            self.progress(p)

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
    resized once to the training size if the config asks for one."""
    x = torch.from_numpy(np.array(images))  # a private, writable copy (caches are read-only mmaps)
    if rt.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(rt.device)
        if x.numel() < free // 4:
            x = x.to(rt.device)
    if size is not None and (x.shape[-2], x.shape[-1]) != (size, size):
        x = resize_uint8(x, size)
    return x


def resize_uint8(x: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    out = torch.empty((x.shape[0], x.shape[1], size, size), dtype=torch.uint8, device=x.device)
    for i in range(0, x.shape[0], chunk):
        part = x[i:i + chunk].float()
        part = F.interpolate(part, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[i:i + chunk] = part.round().clamp(0, 255).to(torch.uint8)
    return out


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


def batches(n: int, batch_size: int, g: torch.Generator, drop_last: bool) -> list[torch.Tensor]:
    """A fresh permutation cut into batches. drop_last keeps batch statistics (BatchNorm, the
    contrastive negatives) from being computed on a stray handful of samples."""
    perm = torch.randperm(n, generator=g, device=g.device)
    size = min(batch_size, n)
    out = list(perm.split(size))
    if drop_last and len(out) > 1 and out[-1].numel() < size:
        out.pop()
    return out


@torch.no_grad()
def predict_all(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, rt: Runtime,
                batch_size: int = 1024) -> torch.Tensor:
    """forward() over every image, no augmentation, in eval batches; result on the CPU, float32."""
    outs = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].to(rt.device, non_blocking=True)
        x = rt.prepare(x.float().div_(255))
        with rt.autocast():
            y = forward(x)
        outs.append(y.float().cpu())
    return torch.cat(outs, dim=-2 if outs[0].dim() == 3 else 0)


# ---------------------------------------------------------------------------------------------
# Optimisation
# ---------------------------------------------------------------------------------------------

def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def set_lr(opt: torch.optim.Optimizer, cfg: OptimConfig, progress: float) -> float:
    """Cosine decay to lr * 0.1**3 (the schedule the paper's recipe uses), stepped per iteration
    rather than per epoch so short CPU runs decay smoothly too."""
    if cfg.schedule == "constant":
        lr = cfg.lr
    else:
        floor = cfg.lr * 0.1 ** 3
        lr = floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def save_checkpoint(ctx: StageContext, model, opt, g: torch.Generator, epoch: int,
                    history: list[dict[str, Any]], **extra: Any) -> None:
    """The training state after `epoch`; `extra` holds what only one stage has (EMA, MoCo queue)."""
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "rng": g.get_state(),
             "epoch": epoch, "history": history, **extra}
    save_torch(ctx.run.checkpoint(ctx.stage), state)


def resume(ctx: StageContext, model, opt, g: torch.Generator) -> tuple[int, list[dict[str, Any]], dict[str, Any]]:
    """Restore the last checkpoint of this stage into model, optimiser and generator. Returns the
    epoch to start from, the history so far and the raw checkpoint (for stage-specific extras)."""
    ck = load_checkpoint(ctx)
    if ck is None:
        return 0, [], {}
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optim"])
    g.set_state(ck["rng"])
    return ck["epoch"] + 1, ck["history"], ck


def load_checkpoint(ctx: StageContext) -> dict[str, Any] | None:
    path = ctx.run.checkpoint(ctx.stage)
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


class EpochTimer:
    """images/s and ETA for progress reports."""

    def __init__(self, epochs: int, start_epoch: int, steps: int):
        self.epochs, self.steps = epochs, steps
        self.start = time.perf_counter()
        self.done_steps = 0
        self.images = 0
        self.total_steps = (epochs - start_epoch) * steps

    def tick(self, images: int) -> tuple[float, float]:
        self.done_steps += 1
        self.images += images
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.images / elapsed
        eta = elapsed / self.done_steps * max(self.total_steps - self.done_steps, 0)
        return rate, eta


def run_epochs(ctx: StageContext, *, epochs: int, start_epoch: int, steps_per_epoch: int,
               train_epoch: Callable[[int], Iterator[tuple[float, int]]],
               end_epoch: Callable[[int, float], dict[str, Any] | None]) -> None:
    """The loop every trainer shares: per step a cancel check and a progress report, per epoch a
    summary (end_epoch returns metrics and may return {"stop": True}) and a checkpoint
    (end_epoch saves it)."""
    timer = EpochTimer(epochs, start_epoch, steps_per_epoch)
    for epoch in range(start_epoch, epochs):
        total, count = 0.0, 0
        for step, (loss, n_images) in enumerate(train_epoch(epoch), start=1):
            ctx.check_cancel()
            total += loss
            count += 1
            rate, eta = timer.tick(n_images)
            ctx.report(Progress(ctx.stage, epoch + 1, epochs, step, steps_per_epoch, loss, rate, eta))
        mean_loss = total / max(count, 1)
        metrics = end_epoch(epoch, mean_loss) or {}
        stop = bool(metrics.pop("stop", False))
        rate, eta = (timer.images / max(time.perf_counter() - timer.start, 1e-9), 0.0 if stop else None)
        ctx.report(Progress(ctx.stage, epoch + 1, epochs, steps_per_epoch, steps_per_epoch, mean_loss,
                            rate, eta, epoch_end=True, metrics=metrics))
        ctx.check_cancel()
        if stop:
            break
