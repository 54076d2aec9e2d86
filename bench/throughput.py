"""Pretext-stage training throughput (images/s) of this pipeline against the usual way of writing
it: per-sample PIL transforms in a DataLoader, fp32. Same model, same batch, same machine, same
process; prints the ratio.

    python bench/throughput.py                       # Fashion-MNIST 28x28, convnet, batch 512
    python bench/throughput.py --size 14 --width 16     # the Fashion-MNIST CPU recipe
    python bench/throughput.py --arch resnet18_cifar --size 32 --batch 256 --steps 10

"Ours" is the real pretext stage (ml.pipeline.run_stage) for one short epoch; its images/s is the
rate the stage itself reports. The baseline is a loop written the way most SimCLR code is: a
torchvision.transforms pipeline on PIL images in Dataset.__getitem__, DataLoader workers, .to(device).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ml.config import RunConfig
from ml.data import ImageSet, load_source
from ml.device import select_runtime
from ml.losses import nt_xent_loss
from ml.networks import ContrastiveModel, build_backbone
from ml.pipeline import prepare_run, run_stage


class TwoViews(Dataset):
    def __init__(self, images: np.ndarray, size: int):
        self.images = images
        self.tf = T.Compose(
            [
                T.RandomResizedCrop(size, scale=(0.2, 1.0)),
                T.RandomHorizontalFlip(),
                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                T.RandomGrayscale(p=0.2),
                T.ToTensor(),
            ]
        )

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        arr = self.images[i]
        img = Image.fromarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0))
        return self.tf(img), self.tf(img)


def baseline(
    images: np.ndarray, arch: str, size: int, batch: int, steps: int, workers: int, device, width: int
) -> float:
    torch.manual_seed(0)
    c = images.shape[1]
    model = ContrastiveModel(build_backbone(arch, c, [0.5] * c, [0.25] * c, width)).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(
        TwoViews(images, size),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    it = iter(loader)
    done, t0 = 0, None
    for step in range(steps + 1):
        v1, v2 = next(it)
        v1, v2 = v1.to(device), v2.to(device)
        z = model(torch.cat([v1, v2]))
        loss = nt_xent_loss(z[:batch], z[batch:], 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 0:  # the first step pays for worker start-up; don't count it
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        else:
            done += batch
    if device.type == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - t0)


def ours(data: ImageSet, arch: str, size: int, batch: int, steps: int, device: str, width: int) -> float:
    n = batch * (steps + 1)
    subset = ImageSet(images=np.ascontiguousarray(data.images[:n]), labels=None, class_names=None, source="bench")
    cfg = RunConfig.from_preset(
        "small",
        10,
        {
            "arch": arch,
            "width": width,
            "image_size": size,
            "device": device,
            "pretext.epochs": 1,
            "pretext.batch_size": batch,
            "pretext.flip": True,
            "pretext.crop_scale": [0.2, 1.0],
        },
    )
    rates = []
    with tempfile.TemporaryDirectory() as tmp:
        prepare_run(tmp, cfg)
        run_stage(
            "pretext",
            tmp,
            subset,
            progress=lambda p: rates.append((p.step, p.images_per_s)) if not p.epoch_end else None,
        )
    # Rate over the steps after the first, like the baseline.
    (s1, r1), (sn, rn) = rates[0], rates[-1]
    t1, tn = s1 * batch / r1, sn * batch / rn
    return (sn - s1) * batch / (tn - t1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--arch", default="convnet")
    ap.add_argument("--size", type=int, default=None, help="default: the data's own size")
    ap.add_argument("--width", type=int, default=32, help="convnet width")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 4))
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    data = load_source(args.data, cache_dir=Path(".cache/scan"))
    size = args.size or data.images.shape[-1]
    rt = select_runtime(args.device)
    need = args.batch * (args.steps + 1)
    images = np.ascontiguousarray(data.images[:need])
    r_ours = ours(data, args.arch, size, args.batch, args.steps, args.device, args.width)
    r_base = baseline(images, args.arch, size, args.batch, args.steps, args.workers, rt.device, args.width)
    name = torch.cuda.get_device_name() if rt.device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"pretext throughput, {args.arch} (width {args.width}) {size}px batch {args.batch}, {args.steps} steps, {name}"
    )
    print(f"  baseline (PIL transforms, DataLoader x{args.workers}, fp32): {r_base:10,.0f} img/s")
    print(f"  this pipeline (resident data, batched aug{', bf16' if rt.bf16 else ''}):  {r_ours:10,.0f} img/s")
    print(f"  ratio: {r_ours / r_base:.2f}x")


if __name__ == "__main__":
    main()
