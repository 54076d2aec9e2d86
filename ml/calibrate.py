"""Measure this machine's device for the estimates of ml/estimate.py: kind, name, memory, and the
training throughput of every arch at REF_SIZE px (a few SGD steps on random images after a warm-up).

    python -m ml.calibrate [--cache FILE] [--steps 1]    # prints one JSON object

A worker runs it once at start (in a subprocess: its main process must not touch CUDA before it
forks) and advertises the result; with --cache the figures are reused while the device and the
torch version are the same, so a restart costs nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ml.estimate import REF_SIZE, REF_WIDTH
from ml.networks import ARCHS, build_backbone

# Bumped when the measurement changes, so a cached figure from an older method is measured again.
METHOD = 2


def device_info() -> dict[str, Any]:
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {"kind": "cuda", "name": props.name, "memory_bytes": int(props.total_memory)}
    return {
        "kind": "cpu",
        "name": f"cpu ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})",
        "memory_bytes": _ram_bytes(),
    }


def _ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _model(arch: str, device: torch.device) -> torch.nn.Module:
    backbone = build_backbone(arch, 3, (0.5,) * 3, (0.25,) * 3, REF_WIDTH)
    return backbone.to(device).to(memory_format=torch.channels_last)


def train_throughput(arch: str, device: torch.device, steps: int = 3, batch: int = 32) -> float:
    """Training images/s of the backbone at REF_SIZE px: forward, a stand-in loss, backward, SGD."""
    model = _model(arch, device)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.rand(batch, 3, REF_SIZE, REF_SIZE, device=device).contiguous(memory_format=torch.channels_last)
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(x).float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up: kernel selection, allocator
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def calibrate(steps: int = 1) -> dict[str, Any]:
    info = device_info()
    device = torch.device(info["kind"])
    # Small batches understate a CPU's throughput (batch 16 read 5x below a real 256-image training
    # step, bench/recipe_cost.py); 64 is near the plateau and still a few seconds on an idle CPU.
    batch = 256 if device.type == "cuda" else 64
    speeds = {arch: round(train_throughput(arch, device, steps, batch), 1) for arch in ARCHS}
    return {
        **info,
        "torch": torch.__version__,
        "method": METHOD,
        "batch": batch,
        "ref_size": REF_SIZE,
        "train_images_per_s": speeds,
    }


@torch.no_grad()
def count_arch(arch: str, size: int = REF_SIZE, width: int = REF_WIDTH, channels: int = 3) -> tuple[int, int]:
    """(activation values one image leaves for the backward pass, backbone parameters): the output
    sizes of every leaf module for one image, counted on the meta device (no memory, no compute)."""
    model = build_backbone(arch, channels, (0.5,) * channels, (0.25,) * channels, width)
    params = sum(p.numel() for p in model.parameters())
    model = model.to("meta").eval()  # shapes only; batch-1 BatchNorm needs eval mode
    total = 0

    def hook(_module, _inputs, output) -> None:
        nonlocal total
        total += output.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    model(torch.zeros(1, channels, size, size, device="meta"))
    for h in handles:
        h.remove()
    return int(total), int(params)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=1)
    args = ap.parse_args(argv)
    os.nice(10)  # background work beside a worker that may already be training
    info = device_info()
    if args.cache is not None and args.cache.is_file():
        try:
            cached = json.loads(args.cache.read_text())
            same = (cached.get("name"), cached.get("torch"), cached.get("method"))
            if same == (info["name"], torch.__version__, METHOD):
                print(json.dumps(cached))
                return 0
        except (OSError, ValueError):
            pass
    result = calibrate(args.steps)
    if args.cache is not None:
        args.cache.parent.mkdir(parents=True, exist_ok=True)
        # Several workers may calibrate at once (both halves of the suite share one cache file):
        # each writes its own temporary file, so a replace never finds another's half-written one.
        tmp = args.cache.with_name(f"{args.cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(args.cache)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
