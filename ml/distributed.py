"""Data-parallel training of the pretext and self-label stages: one process per device, joined by
``torch.distributed`` (NCCL between GPUs, gloo between CPU processes), the model wrapped in
DistributedDataParallel.

A run with ``devices: N`` trains these two stages as N ranks on the SAME global batch that one
process would train on, and reaches the same weights (up to float rounding; tests/ml/test_distributed.py):

- data order: every rank draws the stage's one permutation from the shared random stream and takes
  its contiguous slice of each batch (rank r holds rows r*B/N .. (r+1)*B/N - 1);
- augmentation: every rank augments the whole global batch from that stream and keeps its slice, so
  each image gets the same random crop, colour and cutout it gets on one device (the augmentation is
  repeated on each device: a batched tensor op, small beside the forward/backward it splits);
- batch-wide terms: each rank gathers the outputs of all ranks, with their gradients
  (``Group.gather``), and computes the loss of the global batch: NT-Xent
  negatives, MoCo's queue update, self-labeling's class weights and per-cluster quota all see the
  global batch. Every rank holds the same loss L; the gather's backward sums the N copies of dL/dz and
  DDP averages the gradients over the N ranks, so the step is exactly dL/dtheta;
- BatchNorm: statistics over the global batch. torch.nn.SyncBatchNorm on CUDA; it refuses CPU tensors
  (torch 2.14: "SyncBatchNorm expected input tensor to be on GPU"), so CPU ranks use
  ``GlobalBatchNorm`` below, which all-reduces the same sums;
- cancellation: every rank asks at the same points and they agree (any rank told to stop stops all);
  at an epoch's end rank 0 waits for the launcher to have reported the epoch, as one process waits
  for its progress callback, so a cancel seen then stops the ranks after that epoch;
- only rank 0 reports progress and writes checkpoints and outputs; a checkpoint holds the unwrapped
  model, so a stage resumes on any number of devices.

ml/launch.py sets up the process group, starts the ranks of a stage and joins them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ml.device import cpu_cores

# The stages that train data-parallel; mining (sharded faiss, ml/index.py) and clustering run in one.
DATA_PARALLEL_STAGES = ("pretext", "selflabel")


@dataclass(frozen=True)
class Group:
    """What a stage needs to know of the process group: its rank, the world size, and the few
    collectives it calls. ``Group()`` is one process, where every method is the identity."""

    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch (its rows, in rank order)."""
        if not self.active:
            return x
        n = x.shape[0]
        if n % self.world:
            raise ValueError(f"a batch of {n} does not split evenly over {self.world} devices")
        k = n // self.world
        return x[self.rank * k : (self.rank + 1) * k]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` concatenated in rank order (the global batch), differentiable: the
        backward sums the gradients that all ranks send for this rank's rows."""
        if not self.active:
            return x
        return _AllGather.apply(x)

    def gather_rows(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """Rows that ranks computed for their ``split(n)`` ranges, concatenated (no gradient)."""
        if not self.active:
            return x
        size = -(-n // self.world)
        padded = x.new_zeros((size, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([p[: hi - lo] for p, (lo, hi) in zip(parts, self.ranges(n))], dim=0)

    def ranges(self, n: int) -> list[tuple[int, int]]:
        size = -(-n // self.world)
        return [(min(r * size, n), min((r + 1) * size, n)) for r in range(self.world)]

    def split(self, n: int) -> slice:
        """This rank's share of n items for work every rank needs the whole of (predicting a set)."""
        lo, hi = self.ranges(n)[self.rank]
        return slice(lo, hi)

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any: a decision all ranks take together."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def sync_batchnorm(self, model: nn.Module, device: torch.device) -> nn.Module:
        """BatchNorm over the global batch: torch's SyncBatchNorm on CUDA, GlobalBatchNorm elsewhere.
        Same parameters and buffers (state dicts load either way). Call before the optimiser is made."""
        if not self.active:
            return model
        if device.type == "cuda":
            return nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return GlobalBatchNorm.convert(model)

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The module the training step calls: DistributedDataParallel over ``model`` (whose
        parameters it shares). Buffers are not broadcast: with global BatchNorm they are the same
        on every rank already."""
        if not self.active:
            return model
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False
        )


SINGLE = Group()


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of each rank's input is the sum of all ranks' output gradients
    (every rank's loss depends on every input)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class _AllGather(torch.autograd.Function):
    """Concatenation of every rank's rows in rank order; this rank's rows get the sum over ranks of
    the gradients sent for them. (torch.distributed.nn.functional does the same and is deprecated
    in torch 2.14; the private _functional_collectives it points to are not an API to build on.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rows = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch, by all-reduced sums, on any
    device (torch.nn.SyncBatchNorm does the same on CUDA only). Normalises with the biased variance
    and tracks the unbiased one, as F.batch_norm does; one process, or eval mode, is plain BatchNorm."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device)
        sums = _AllReduceSum.apply(torch.cat([x.sum(dims), count]))
        n = sums[-1].detach()
        mean = sums[:-1] / n
        centered = x - mean.view(shape)
        var = _AllReduceSum.apply((centered * centered).sum(dims)) / n
        y = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(var.detach() * n / (n - 1).clamp(min=1), factor)
        return y

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Every BatchNorm layer of ``module`` replaced by one of these holding the same parameters
        and buffers."""
        out = module
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
            if module.affine:
                out.weight, out.bias = module.weight, module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
        for name, child in module.named_children():
            out.add_module(name, cls.convert(child))
        return out


def world_size(devices: int, device: torch.device, batch: int) -> int:
    """How many ranks a stage asking for ``devices`` gets here: at most one per visible GPU on CUDA,
    at most one per core on a CPU (each rank is a process holding torch and a copy of the batch:
    ``devices: 64`` must not start 64 of them on a 2-core worker), and a number that splits the
    global batch evenly. The result does not depend on it (see above), so fewer ranks than asked is
    slower, never different."""
    available = torch.cuda.device_count() if device.type == "cuda" else cpu_cores()
    cap = max(1, min(devices, available))
    return next(w for w in range(cap, 0, -1) if batch % w == 0)
