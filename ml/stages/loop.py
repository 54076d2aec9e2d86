"""The one training loop every stage runs: epochs of full batches from a fresh permutation, the
learning-rate schedule, optimiser steps, progress reports, cancellation, and a checkpoint after
every epoch that a rerun resumes from. A stage reads as a recipe over it:

    trainer = Trainer(ctx, model, model.parameters(), cfg.optim, epochs=..., batch_size=..., n=n, stream=1)
    extras = trainer.resume()
    for epoch in trainer.epochs():
        model.train()
        for idx in trainer.batches():
            loss = ...                     # the stage's own step
            trainer.step(loss, idx.numel())
        trainer.end_epoch(metrics={...}, stop=False, extra={...})  # checkpoint + report
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import torch

from ml.config import OptimConfig
from ml.rundir import save_torch
from ml.stages.common import Progress, StageContext


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
        floor = cfg.lr * 0.1**3
        lr = floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


def full_batches(n: int, batch_size: int, g: torch.Generator) -> list[torch.Tensor]:
    """A fresh permutation cut into batches of exactly min(batch_size, n) indices. The remainder
    is dropped (it is a different random handful every epoch): a stray small batch gives
    BatchNorm and the contrastive negatives statistics of a few samples, and a batch of one image
    makes BatchNorm in train mode raise."""
    perm = torch.randperm(n, generator=g, device=g.device)
    size = min(batch_size, n)
    return list(perm[: (n // size) * size].split(size))


def load_checkpoint(ctx: StageContext) -> dict[str, Any] | None:
    path = ctx.run.checkpoint(ctx.stage)
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


class Trainer:
    """Owns the optimiser, the stage's random stream, the history and the checkpoint of one stage."""

    def __init__(
        self,
        ctx: StageContext,
        model: torch.nn.Module,
        params,
        optim: OptimConfig,
        *,
        epochs: int,
        batch_size: int,
        n: int,
        stream: int,
    ):
        self.ctx, self.model, self.optim = ctx, model, optim
        self.opt = make_optimizer(params, optim)
        self.g = ctx.generator(stream)
        self.n, self.batch_size, self.num_epochs = n, batch_size, epochs
        self.steps = max(n // min(batch_size, n), 1)
        self.total_steps = max(epochs * self.steps, 1)
        self.history: list[dict[str, Any]] = []
        self.start = 0
        self.epoch = 0
        self._stopped = False

    def resume(self) -> dict[str, Any]:
        """Restore model, optimiser, random stream and history from the stage's checkpoint.
        Returns the checkpoint's stage-specific extras ({} on a fresh start)."""
        ck = load_checkpoint(self.ctx)
        if ck is None:
            return {}
        self.model.load_state_dict(ck.pop("model"))
        self.opt.load_state_dict(ck.pop("optim"))
        self.g.set_state(ck.pop("rng"))
        self.start = ck.pop("epoch") + 1
        self.history = ck.pop("history")
        return ck

    def epochs(self) -> Iterator[int]:
        self._timer_start = time.perf_counter()
        self._images_total = 0
        self._steps_total = 0
        for epoch in range(self.start, self.num_epochs):
            if self._stopped:
                return
            self.epoch = epoch
            self._losses: list[float] = []
            yield epoch

    def batches(self) -> Iterator[torch.Tensor]:
        """This epoch's batches of indices, each preceded by a cancel check and the lr for it."""
        for i, idx in enumerate(full_batches(self.n, self.batch_size, self.g)):
            self.ctx.check_cancel()
            set_lr(self.opt, self.optim, (self.epoch * self.steps + i) / self.total_steps)
            yield idx

    def step(self, loss: torch.Tensor, images: int) -> None:
        """One optimiser step on `loss`, then a progress report."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.record(loss.item(), images)

    def record(self, loss: float, images: int) -> None:
        self._losses.append(loss)
        self._images_total += images
        self._steps_total += 1
        elapsed = max(time.perf_counter() - self._timer_start, 1e-9)
        remaining = (self.num_epochs - self.start) * self.steps - self._steps_total
        self.ctx.report(
            Progress(
                self.ctx.stage,
                self.epoch + 1,
                self.num_epochs,
                len(self._losses),
                self.steps,
                loss,
                self._images_total / elapsed,
                elapsed / self._steps_total * max(remaining, 0),
            )
        )

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def end_epoch(
        self, metrics: dict[str, Any] | None = None, stop: bool = False, extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Append the epoch to the history (mean loss plus `metrics`), checkpoint it with the
        stage's `extra` state, report it, and end the loop after this epoch if `stop`."""
        mean_loss = sum(self._losses) / max(len(self._losses), 1)
        record = {"epoch": self.epoch + 1, "loss": mean_loss, **(metrics or {})}
        self.history.append(record)
        state = {
            "model": self.model.state_dict(),
            "optim": self.opt.state_dict(),
            "rng": self.g.get_state(),
            "epoch": self.epoch,
            "history": self.history,
            **(extra or {}),
        }
        if self.ctx.group.is_main:  # data-parallel ranks hold the same state; one writes it
            save_torch(self.ctx.run.checkpoint(self.ctx.stage), state)
        elapsed = max(time.perf_counter() - self._timer_start, 1e-9)
        self.ctx.report(
            Progress(
                self.ctx.stage,
                self.epoch + 1,
                self.num_epochs,
                self.steps,
                self.steps,
                mean_loss,
                self._images_total / elapsed,
                0.0 if stop else None,
                epoch_end=True,
                metrics=_scalars(metrics or {}),
            )
        )
        self.ctx.check_cancel()
        self._stopped = stop
        return record


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    """What a progress event carries: the numbers of the epoch's record (lists stay in history)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "time"}
