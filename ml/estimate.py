"""What a run will cost before it is queued: seconds per stage, peak memory, and a recipe cut to a
time budget. Pure arithmetic on a RunConfig (no torch), so the API can answer it in the request.

The cost model (docs/service.md, "Duration and memory estimates"):

- A device is described by its measured training throughput per arch: images per second through
  one forward + backward step at REF_SIZE px (convnet at width REF_WIDTH), measured at worker start
  by `ml/calibrate.py`. Convolution cost grows with the pixel count and, for the convnet, with the
  square of its width, so throughput at another size is scaled by (REF_SIZE / size)^2 (and
  (REF_WIDTH / width)^2). A forward pass alone (mining, evaluation, pseudo-labels) is counted as
  1 / EVAL_SPEEDUP of a training step.
- Each stage's work is counted in such training-image passes: pretext epochs x n x 2 views,
  clustering epochs x n x 2 (anchor and neighbour) plus its per-epoch loss over the dataset, self-
  labeling epochs x n (strong view) plus the weak view and the confident count. Self-labeling stops
  early on a plateau, so its figure is an upper bound. With `num_clusters` "auto" or a range the
  clustering stage first sweeps K (ml/num_clusters.py): a fixed number of steps of linear heads on
  the features, counted by its multiply-adds against one training image's (MACS_AT_REF). With
  `seeds: N` both of those stages run N times, pretext and mining once (and the sweep once). With
  `devices: N` on GPUs, pretext and self-labeling take 1/N of the time (data-parallel); on a CPU
  the N processes share its cores and gain nothing.
- Memory: parameters x 16 bytes (weights, gradients, two Adam moments) + batch x views x the
  activations one image leaves for the backward pass x 4 bytes + (on a CPU) the dataset resident at
  training size + a fixed framework overhead. The activation and parameter counts per arch are
  counted from the models themselves (tests/ml/test_estimate.py recounts them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ml.config import SWEEP_BATCH, SWEEP_HEADS_PER_K, RunConfig, candidate_ks

REF_SIZE = 32
REF_WIDTH = 32
EVAL_SPEEDUP = 3.0
FLOAT_BYTES = 4
PARAM_STATE_BYTES = 16  # fp32 weights + gradients + Adam's two moments (SGD with momentum needs less)
FRAMEWORK_BYTES = 1 << 30  # torch, its kernels and the CUDA context: about 1 GiB either way
# A warning is added to the estimate past this many seconds.
LONG_RUN_S = 3600.0

# Per arch, at REF_SIZE px, 3 channels (convnet at REF_WIDTH): (activation values one image keeps for
# the backward pass = the outputs of every leaf module, parameters of the backbone). Counted by
# ml.calibrate.count_arch; tests/ml/test_estimate.py checks the table against the models.
ARCH_COUNTS: dict[str, tuple[int, int]] = {
    "convnet": (202_240, 388_896),
    "resnet18_cifar": (1_855_488, 11_168_832),
    "resnet18_stl": (740_416, 11_168_832),
    "resnet18": (156_672, 11_176_512),
    "resnet50": (660_992, 23_508_032),
}


@dataclass(frozen=True)
class Device:
    """What a worker advertises: its kind, name, usable memory and measured throughput."""

    kind: str  # "cpu" | "cuda"
    name: str
    memory_bytes: int
    # arch -> training images/s at REF_SIZE px (convnet at REF_WIDTH)
    train_images_per_s: dict[str, float] = field(default_factory=dict)

    def images_per_s(self, arch: str, size: int, width: int) -> float:
        base = self.train_images_per_s.get(arch) or REFERENCE_DEVICE.train_images_per_s[arch]
        scale = (REF_SIZE / size) ** 2
        if arch == "convnet":
            scale *= (REF_WIDTH / width) ** 2
        return base * scale


# Multiply-adds of one image's forward pass at REF_SIZE px (convnet at REF_WIDTH), counted from the
# models; the K sweep's cost is converted to training-image passes with them.
MACS_AT_REF: dict[str, float] = {
    "convnet": 16e6,
    "resnet18_cifar": 556e6,
    "resnet18_stl": 140e6,
    "resnet18": 37e6,
    "resnet50": 84e6,
}
# Output width of each backbone (the features the sweep's heads read); the convnet's is 8 x width.
BACKBONE_DIM = {"resnet18_cifar": 512, "resnet18_stl": 512, "resnet18": 512, "resnet50": 2048}


# Used when no worker has reported yet: this project's 2-core CPU when idle. The convnet figure is
# ml/device.py's measurement (1024 views at 14 px in 0.93 s, scaled to 32 px); the others follow
# from it by their multiply-adds at 32 px (convnet 16 M, resnet18_cifar 556 M, resnet18_stl 140 M,
# resnet18 37 M, resnet50 84 M). A loaded machine is several times slower: an estimate made with
# these figures is a floor, and says it is not from a reporting worker.
REFERENCE_DEVICE = Device(
    kind="cpu",
    name="reference: the project's idle 2-core CPU (no worker has reported its device)",
    memory_bytes=8 << 30,
    train_images_per_s={
        "convnet": 210.0,
        "resnet18_cifar": 6.0,
        "resnet18_stl": 24.0,
        "resnet18": 90.0,
        "resnet50": 40.0,
    },
)


def usable_memory(kind: str, total_bytes: int) -> int:
    """What a run may plan to use of a device: 90% of a GPU, 80% of a machine's RAM (the rest is
    the OS, the worker's other processes and the page cache the dataset is read through)."""
    return int(total_bytes * (0.9 if kind == "cuda" else 0.8))


def train_size(cfg: RunConfig, native: int) -> int:
    return cfg.image_size or native


def stage_work(cfg: RunConfig, n: int, native_size: int = REF_SIZE) -> dict[str, float]:
    """Training-image passes per stage (a forward-only pass counts 1 / EVAL_SPEEDUP)."""
    ev = 1.0 / EVAL_SPEEDUP
    pc, cc, sl = cfg.pretext, cfg.clustering, cfg.selflabel
    pretext = pc.epochs * n * 2 + n * ev  # two views per image, then the features for mining
    mining = n * ev * 2  # features for mining and the results written after the stage
    if cc.freeze_backbone and not cc.augment:
        clustering = n * ev * 2  # features once; the heads on them cost nothing next to that
    elif cc.freeze_backbone:
        clustering = cc.epochs * n * (2 * ev + ev)  # no backward through the backbone
    else:
        clustering = cc.epochs * n * (2 + ev)  # anchor + neighbour, then Eq. 2 over the dataset
    clustering += n * ev  # results
    selflabel = 0.0
    if sl.enabled and sl.epochs > 0:
        selflabel = sl.epochs * n * (1 + 2 * ev) + n * ev  # strong + weak view, confident count
        selflabel += sl.epochs * n * _contrastive_views(sl)
    # Each seed trains both stages again (ml/stages/seeds.py); its one extra evaluation pass is
    # small next to an epoch and left out.
    clustering, selflabel = cfg.seeds * clustering, cfg.seeds * selflabel
    clustering += sweep_work(cfg, n, native_size)  # K is chosen once per run, whatever the seeds
    return {"pretext": pretext, "mining": mining, "clustering": clustering, "selflabel": selflabel}


def sweep_work(cfg: RunConfig, n: int, native_size: int = REF_SIZE) -> float:
    """Training-image passes the K sweep costs (0 when num_clusters is a number): sweep_steps steps
    of (anchor + neighbour) x batch rows through every candidate K's heads, forward and backward,
    then one forward pass of every image for the criterion."""
    rng = cfg.num_clusters_range
    if rng is None or cfg.k is not None:
        return 0.0
    try:
        ks = candidate_ks(rng[0], rng[1], n)
    except ValueError:
        return 0.0
    dim = cfg.pretext.feature_dim if cfg.pretext.feature_space == "head" else _backbone_dim(cfg)
    columns = SWEEP_HEADS_PER_K * sum(ks)
    macs = cfg.clustering.sweep_steps * 3 * 2 * SWEEP_BATCH * dim * columns + n * dim * columns
    size = train_size(cfg, native_size)
    per_image = MACS_AT_REF[cfg.arch] * (size / REF_SIZE) ** 2
    if cfg.arch == "convnet":
        per_image *= (cfg.width / REF_WIDTH) ** 2
    return macs / (3 * per_image)  # one training pass = forward + backward, about 3 forward passes


def _backbone_dim(cfg: RunConfig) -> int:
    return 8 * cfg.width if cfg.arch == "convnet" else BACKBONE_DIM[cfg.arch]


def estimate(cfg: RunConfig, n: int, native_size: int, device: Device, *, reported: bool = True) -> dict[str, Any]:
    """Expected seconds per stage and in total on `device`, with a plain-words warning past an hour."""
    size = train_size(cfg, native_size)
    speed = device.images_per_s(cfg.arch, size, cfg.width)
    work = stage_work(cfg, n, native_size)
    if cfg.devices > 1 and device.kind == "cuda":
        # devices: N splits every global batch of these two stages over N GPUs (ml/launch.py); the
        # all-gathers are small next to a step. On a CPU the N processes share the same cores.
        work["pretext"] /= cfg.devices
        work["selflabel"] /= cfg.devices
    stages = {stage: round(w / speed, 1) for stage, w in work.items()}
    total = round(sum(stages.values()), 1)
    out: dict[str, Any] = {
        "stages_s": stages,
        "total_s": total,
        "device": device.name,
        "device_reported": reported,
        "images_per_s": round(speed, 1),
        "image_size": size,
        "warning": None,
    }
    if total > LONG_RUN_S:
        out["warning"] = (
            f"this run is expected to take about {_human(total)} on {device.name}; "
            "set budget_minutes to fit it to a time you choose, or lower the epochs or the image size"
        )
    return out


def _human(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} minutes"
    return f"{seconds / 3600:.1f} hours"


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


def _counts(arch: str, size: int, width: int) -> tuple[float, float]:
    acts, params = ARCH_COUNTS[arch]
    acts = acts * (size / REF_SIZE) ** 2
    if arch == "convnet":
        acts *= width / REF_WIDTH
        params *= (width / REF_WIDTH) ** 2
    return acts, params


def _contrastive_views(sl) -> float:
    """Training passes per image of a self-label batch that its SimCLR term adds (two views of
    `contrastive_images` of the batch's images)."""
    if not sl.contrastive_weight:
        return 0.0
    return 2 * min(sl.contrastive_images, sl.batch_size) / sl.batch_size


def memory_needs(cfg: RunConfig, n: int, native_size: int, channels: int, kind: str) -> list[dict[str, Any]]:
    """Peak bytes of each training stage, with the field that sets its batch."""
    size = train_size(cfg, native_size)
    acts, params = _counts(cfg.arch, size, cfg.width)
    head_params = cfg.pretext.hidden_dim * (cfg.pretext.feature_dim + 2048)  # the MLP, generously
    fixed = (params + head_params) * PARAM_STATE_BYTES + FRAMEWORK_BYTES
    if kind != "cuda":  # on a GPU the dataset stays on the host when it does not fit a quarter
        fixed += n * channels * size * size
    per_view = acts * FLOAT_BYTES
    cc = cfg.clustering
    needs = [("pretext.batch_size", cfg.pretext.batch_size, 2)]
    if not cc.freeze_backbone:
        needs.append(("clustering.batch_size", cc.batch_size, 2))
    if cfg.selflabel.enabled and cfg.selflabel.epochs > 0:
        needs.append(("selflabel.batch_size", cfg.selflabel.batch_size, 1 + _contrastive_views(cfg.selflabel)))
    return [
        {
            "field": f,
            "batch": b,
            "views": v,
            "bytes": int(fixed + b * v * per_view),
            "fixed": int(fixed),
            "per_image": int(v * per_view),
            "image_size": size,
        }
        for f, b, v in needs
    ]


def check_memory(cfg: RunConfig, n: int, native_size: int, channels: int, device: Device) -> str | None:
    """None when every stage fits the device's usable memory, else a message naming the field,
    what it needs and the limit."""
    limit = device.memory_bytes
    for need in memory_needs(cfg, n, native_size, channels, device.kind):
        if need["bytes"] <= limit:
            continue
        fits = max(0, (limit - need["fixed"]) // max(need["per_image"], 1))
        hint = (
            f"at most {fits} fits; lower {need['field']}, image_size or the arch"
            if fits >= 2
            else "no batch fits: lower image_size or choose a smaller arch"
        )
        return (
            f"{need['field']}: {need['batch']} images x {need['views']} views of {cfg.arch} at "
            f"{need['image_size']} px need about {_gib(need['bytes'])} of memory, above the "
            f"{_gib(limit)} the workers can use ({device.name}); {hint}"
        )
    return None


def _gib(b: float) -> str:
    return f"{b / (1 << 30):.1f} GiB"


# ---------------------------------------------------------------------------------------------
# Fitting a recipe to a time budget
# ---------------------------------------------------------------------------------------------

MIN_EPOCH_SCALE = 0.25  # below a quarter of the preset's epochs, a smaller image or width is better
MIN_SIZE = 16


def fit_budget(
    cfg: RunConfig, n: int, native_size: int, device: Device, budget_s: float
) -> tuple[RunConfig, list[str]]:
    """The recipe cut to `budget_s` on `device`, and what was changed (plain words).

    Levers, in order: the epochs of every stage scaled together (never above the preset's); once
    that would go below MIN_EPOCH_SCALE, the image size halves (not below MIN_SIZE), then the
    convnet's width halves (not below 8), each time with the epochs scaled again. Raises ValueError
    when even the smallest recipe (one epoch per stage, smallest size and width) does not fit."""
    size0 = train_size(cfg, native_size)
    sizes = [size0]
    while sizes[-1] // 2 >= MIN_SIZE:
        sizes.append(sizes[-1] // 2)
    widths = [cfg.width]
    if cfg.arch == "convnet":
        while widths[-1] // 2 >= 8:
            widths.append(widths[-1] // 2)
    candidates = [(s, w) for s in sizes for w in widths[:1]] + [(sizes[-1], w) for w in widths[1:]]
    best: tuple[float, RunConfig] | None = None
    for size, width in candidates:
        trial = cfg.model_copy(update={"image_size": size if size != native_size else cfg.image_size, "width": width})
        scale = _epoch_scale(trial, n, native_size, device, budget_s)
        if scale is None:
            continue
        fitted = _scaled(trial, scale)
        if scale >= MIN_EPOCH_SCALE:
            best = (scale, fitted)
            break
        if best is None or scale > best[0]:
            best = (scale, fitted)
    if best is None:
        smallest = _scaled(cfg.model_copy(update={"image_size": sizes[-1], "width": widths[-1]}), 0.0)
        need = estimate(smallest, n, native_size, device)["total_s"]
        raise ValueError(
            f"budget_minutes: {budget_s / 60:g} is too short; the smallest recipe (one epoch per stage, "
            f"{sizes[-1]} px) takes about {_human(need)} on {device.name}"
        )
    fitted = best[1]
    return fitted, _changes(cfg, fitted, native_size)


def _epoch_scale(cfg: RunConfig, n: int, native: int, device: Device, budget_s: float) -> float | None:
    """The largest factor in (0, 1] on every stage's epochs that fits the budget (None: not even
    one epoch each fits)."""
    full = estimate(cfg, n, native, device)["total_s"]
    if full <= budget_s:
        return 1.0
    lo, hi = 0.0, 1.0
    if estimate(_scaled(cfg, 0.0), n, native, device)["total_s"] > budget_s:
        return None
    for _ in range(30):  # bisection: the total is monotone in the scale
        mid = (lo + hi) / 2
        if estimate(_scaled(cfg, mid), n, native, device)["total_s"] <= budget_s:
            lo = mid
        else:
            hi = mid
    return lo


def _scaled(cfg: RunConfig, scale: float) -> RunConfig:
    def ep(e: int, floor: int) -> int:
        return e if e == 0 else max(floor, math.floor(e * scale))

    return cfg.model_copy(
        update={
            "pretext": cfg.pretext.model_copy(update={"epochs": ep(cfg.pretext.epochs, 1)}),
            "clustering": cfg.clustering.model_copy(update={"epochs": ep(cfg.clustering.epochs, 1)}),
            "selflabel": cfg.selflabel.model_copy(update={"epochs": ep(cfg.selflabel.epochs, 1)}),
        }
    )


def _changes(before: RunConfig, after: RunConfig, native: int) -> list[str]:
    out = []
    for name in ("pretext", "clustering", "selflabel"):
        a, b = getattr(before, name).epochs, getattr(after, name).epochs
        if a != b:
            out.append(f"{name}.epochs {a} -> {b}")
    if train_size(before, native) != train_size(after, native):
        out.append(f"image_size {train_size(before, native)} -> {train_size(after, native)}")
    if before.width != after.width:
        out.append(f"width {before.width} -> {after.width}")
    return out
