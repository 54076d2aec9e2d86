"""Backbones and the two models of SCAN: the pretext (contrastive) model and the clustering model.

Models take float images in [0, 1]; the per-channel normalisation is a buffer inside the backbone,
so an exported model needs only ``uint8 / 255``. A backbone is an ``nn.Sequential`` whose children
carry torchvision's ResNet names (``conv1``, ``bn1``, ``layer1`` ...), so its state dict is
torchvision-style and torchvision/MoCo/SimCLR checkpoints load with ``load_backbone_weights``.

    backbone = build_backbone("resnet18_cifar", in_channels=3, mean=(0.49, 0.48, 0.45), std=(0.25,) * 3)
    pretext = ContrastiveModel(backbone)                 # (N, 128) L2-normalised
    clusterer = ClusteringModel(backbone, num_clusters=10, num_heads=5)   # (5, N, 10) logits
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

__all__ = [
    "ARCHS",
    "Backbone",
    "Normalize",
    "CanonicalColour",
    "build_backbone",
    "load_backbone_weights",
    "fit_backbone",
    "read_backbone_file",
    "ContrastiveModel",
    "ClusteringModel",
]

ARCHS = ("resnet18_cifar", "resnet18_stl", "resnet18", "resnet50", "convnet")


class Normalize(nn.Module):
    """(x - mean) / std per channel, with mean and std saved as buffers in the state dict."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class CanonicalColour(nn.Module):
    """Each image reduced to one standardised channel whose colours and polarity no longer matter.

    Per image: the pixels are projected on their principal colour axis (the leading eigenvector of
    the image's 3x3 colour covariance; a gray image is its own axis), the projection is standardised
    to zero mean and unit variance, and its sign is chosen so that the border (the outer eighth of
    the side, at least one pixel) lies below the mean: the ground is negative, the content positive.
    (N, C, H, W) in [0, 1], C in {1, 3} -> (N, 1, H, W).

    An image drawn in two colours, ``rgb = ground + (ink - ground) * g``, becomes the standardised
    glyph ``g`` whatever the two colours are and whichever way round they are (issue #10): ink and
    ground colour, brightness, contrast and inversion are gone before the first convolution. What
    is lost with them: anything the classes differ in by colour or by how light they are.

    The eigenvector comes from repeated squaring of the covariance (C^32, rescaled each time) and
    its largest column, not from ``eigh``: a fixed number of 3x3 products, deterministic, in
    float32 whatever autocast says, and exported as plain ops to ONNX and TorchScript. Columns of
    C^32 are all the principal axis (times its component) once it dominates; the largest column is
    never the zero vector unless the image is flat. Flat images give zeros.
    """

    SQUARINGS = 5  # C^32: the second eigenvalue's share falls as (l2/l1)^32
    EPS = 1e-4  # variance floor (std 0.01 in [0, 1] units): a flat image stays flat, not noise

    def __init__(self, in_channels: int):
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        self.in_channels = int(in_channels)

    def forward(self, x: Tensor) -> Tensor:
        # The batch size is never named (-1 instead), so exports keep a dynamic batch dimension.
        h, w = x.shape[2:]
        flat = x.float().flatten(2)
        centred = flat - flat.mean(dim=2, keepdim=True)
        if self.in_channels == 3:
            # Elementwise products, not matmul: autocast leaves them in float32.
            cov = (centred.unsqueeze(2) * centred.unsqueeze(1)).mean(dim=3)  # (N, 3, 3)
            m = cov + 1e-12 * torch.eye(3, device=x.device, dtype=cov.dtype)
            for _ in range(self.SQUARINGS):
                m = (m.unsqueeze(3) * m.unsqueeze(1)).sum(dim=2)
                m = m / m.abs().amax(dim=(1, 2), keepdim=True)
            pick = m.square().sum(dim=1).argmax(dim=1)  # the largest column
            axis = m.gather(2, pick.view(-1, 1, 1).expand(-1, 3, 1))  # (N, 3, 1)
            axis = axis / axis.square().sum(dim=1, keepdim=True).sqrt()
            proj = (centred * axis).sum(dim=1)  # (N, H*W)
        else:
            proj = centred[:, 0]
        z = (proj / (proj.square().mean(dim=1, keepdim=True) + self.EPS).sqrt()).view(-1, 1, h, w)
        b = max(1, min(int(h), int(w)) // 8)  # a constant in an export, whose image size is fixed
        inner = z[:, :, b:-b]
        border = z[:, :, :b].sum((1, 2, 3)) + z[:, :, -b:].sum((1, 2, 3))
        border = border + inner[..., :b].sum((1, 2, 3)) + inner[..., -b:].sum((1, 2, 3))
        return torch.where(border.view(-1, 1, 1, 1) > 0, -z, z)


class Backbone(nn.Sequential):
    """Normalize followed by a feature extractor ending in a global pool: (N, C, H, W) -> (N, out_dim)."""

    def __init__(self, layers: OrderedDict[str, nn.Module], out_dim: int, arch: str, in_channels: int):
        super().__init__(layers)
        self.out_dim = int(out_dim)
        self.arch = arch
        self.in_channels = int(in_channels)


def _resnet_layers(arch: str, in_channels: int) -> tuple[OrderedDict[str, nn.Module], int]:
    net = torchvision.models.resnet50(weights=None) if arch == "resnet50" else torchvision.models.resnet18(weights=None)
    if arch == "resnet18_cifar":
        # CIFAR stem (SCAN's resnet_cifar): 3x3 stride-1 conv and no max-pool keep 32 px images at
        # full resolution in layer1.
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif arch == "resnet18_stl":
        # STL stem (SCAN's resnet_stl): 3x3 stride-1 conv, then a 2x2 stride-2 max-pool (padding 1),
        # so 96 px images reach layer1 at 49 px instead of the standard stem's 24.
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.MaxPool2d(kernel_size=2, stride=2, padding=1)
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    layers = OrderedDict(
        (name, getattr(net, name))
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool")
    )
    layers["flatten"] = nn.Flatten(1)
    return layers, net.fc.in_features


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def _convnet_layers(in_channels: int, width: int = 32) -> tuple[OrderedDict[str, nn.Module], int]:
    # A small VGG-style net for small images (8-32 px): one conv at full resolution, then each
    # max-pool halves the side (ceil, so 7 -> 4 and 8 px inputs still end at 1 px) before a wider
    # conv. About 12 M multiply-adds for a 28x28 image, ~45x fewer than resnet18_cifar at 32x32.
    layers = OrderedDict(
        stem=_conv_bn_relu(in_channels, width),
        pool1=nn.MaxPool2d(2, ceil_mode=True),
        block1=_conv_bn_relu(width, 2 * width),
        pool2=nn.MaxPool2d(2, ceil_mode=True),
        block2=_conv_bn_relu(2 * width, 4 * width),
        pool3=nn.MaxPool2d(2, ceil_mode=True),
        block3=_conv_bn_relu(4 * width, 8 * width),
        avgpool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(1),
    )
    return layers, 8 * width


def build_backbone(
    arch: str,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    width: int = 32,
    canonicalise: bool = False,
) -> Backbone:
    """A backbone for float images in [0, 1] with ``in_channels`` channels (1 or 3).

    arch: "resnet18_cifar" (3x3 stride-1 conv1, no max-pool; 512-d), "resnet18_stl" (3x3 stride-1
    conv1, 2x2 max-pool; 512-d), "resnet18" (standard stem;
    512-d), "resnet50" (2048-d), "convnet" (small and CPU-sized; 256-d). ``mean``/``std`` hold one
    value per channel (a single value is repeated). ``canonicalise`` puts ``CanonicalColour`` first:
    the layers then see one standardised channel, and ``mean``/``std`` are not used.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
    mean, std = list(mean), list(std)
    if len(mean) == 1:
        mean = mean * in_channels
    if len(std) == 1:
        std = std * in_channels
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean/std need {in_channels} values, got {len(mean)} and {len(std)}")
    # After CanonicalColour the image is one channel of mean 0 and variance 1: nothing to normalise.
    front = OrderedDict(canonical=CanonicalColour(in_channels)) if canonicalise else OrderedDict()
    front["normalize"] = Normalize((0.0,), (1.0,)) if canonicalise else Normalize(mean, std)
    seen = 1 if canonicalise else in_channels
    if arch == "convnet":
        layers, out_dim = _convnet_layers(seen, width)
    else:
        layers, out_dim = _resnet_layers(arch, seen)
    return Backbone(OrderedDict(**front, **layers), out_dim, arch, in_channels)


# Wrappers that checkpoints put around a backbone's keys (DataParallel, our models, MoCo).
_PREFIXES = ("module.", "backbone.", "encoder_q.", "encoder.", "model.")


def _unwrap_state_dict(obj) -> dict[str, Tensor]:
    for key in ("state_dict", "model", "backbone"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise TypeError(f"expected a state dict, got {type(obj).__name__}")
    out = {}
    for name, value in obj.items():
        if not isinstance(value, Tensor):
            continue
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if name.startswith(prefix):
                    name, changed = name[len(prefix) :], True
        out[name] = value
    return out


def load_backbone_weights(backbone: Backbone, path: Path) -> None:
    """Load a torchvision-style state dict (a bare one, or under "state_dict"/"model") into ``backbone``.

    Prefixes "module.", "backbone.", "encoder_q." are stripped; the classifier (fc.*) and any
    projection head are ignored, and so is the file's normalisation (the backbone keeps its own).
    A 3-channel first convolution is folded into a 1-channel one by summing over input channels (a gray image
    fed as three equal channels gives the same response). Raises ValueError naming the file when
    nothing matches, a parameter is missing, or a shape differs.
    """
    path = Path(path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        weights = _unwrap_state_dict(raw)
    except (OSError, RuntimeError, TypeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise ValueError(f"{path}: not a readable state dict ({exc})") from exc
    own = backbone.state_dict()
    state = dict(own)
    state.update({k: v.to(own[k].dtype) for k, v in fit_backbone(backbone, weights, str(path)).items()})
    backbone.load_state_dict(state)


def fit_backbone(backbone: Backbone, weights: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """The tensors of ``weights`` that are ``backbone``'s (normalisation excluded), conv1 folded to
    one channel if need be; ValueError when nothing matches, a shape differs or one is missing."""
    own = backbone.state_dict()
    wanted = {k for k in own if not k.startswith("normalize.")}
    matched = {k: v for k, v in weights.items() if k in wanted}
    if not matched:
        sample = ", ".join(list(weights)[:5])
        raise ValueError(f"{where}: no parameter matches a {backbone.arch} backbone (file keys start: {sample})")
    # The first convolution (ResNet's conv1, the convnet's stem.0) sees the image's channels.
    first = next((k for k, v in own.items() if k.endswith("weight") and v.ndim == 4), None)
    conv1 = matched.get(first)
    if conv1 is not None and conv1.ndim == 4 and conv1.shape[1] == 3 and own[first].shape[1] == 1:
        matched[first] = conv1.sum(dim=1, keepdim=True)
    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in matched.items() if v.shape != own[k].shape
    ]
    if mismatched:
        raise ValueError(f"{where}: shapes differ from a {backbone.arch} backbone: {'; '.join(mismatched[:5])}")
    # Old checkpoints lack BatchNorm's num_batches_tracked; nothing else may be missing.
    missing = sorted(k for k in wanted - matched.keys() if not k.endswith("num_batches_tracked"))
    if missing:
        raise ValueError(f"{where}: missing {len(missing)} backbone tensors, e.g. {', '.join(missing[:5])}")
    return matched


def read_backbone_file(path: Path, arch: str, width: int = 32, name: str = "weights") -> dict[str, Tensor]:
    """Strictly read an untrusted weights file as a backbone state dict for ``arch``: only what
    ``torch.load(weights_only=True)`` unpickles (tensors and plain containers, never code), memory-
    mapped so a file costs no more memory than its size; the state dict (bare, or under
    "state_dict"/"model"/"backbone") must hold tensors only, and its backbone tensors must fit
    ``arch`` (3 channels, or 1). Returns just those tensors, the ones a run will load; anything
    else in the file (a classifier, a projection head) is left out. ValueError names ``name``,
    never the server's path or torch's internals."""
    try:
        raw = torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # any failure to read an untrusted file is the same 422 (re-raised)
        raise ValueError(
            f"{name}: not a plain state dict (save one with torch.save(model.state_dict(), f); "
            "pickled objects other than tensors and plain containers are refused)"
        ) from exc
    state = raw
    for key in ("state_dict", "model", "backbone"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{name}: expected a state dict (a mapping of names to tensors), got {type(state).__name__}")
    strays = [
        f"{k!s:.60} ({type(v).__name__})"
        for k, v in state.items()
        if not isinstance(k, str) or not isinstance(v, Tensor)
    ]
    if strays:
        raise ValueError(f"{name}: a state dict holds tensors only; found {', '.join(strays[:3])}")
    weights = _unwrap_state_dict(state)
    errors = []
    for channels in (3, 1):
        backbone = build_backbone(arch, channels, (0.5,), (0.5,), width)
        try:
            fitted = fit_backbone(backbone, weights, name)
        except ValueError as exc:
            errors.append(str(exc))
            continue
        return {k: v.detach().clone().contiguous() for k, v in fitted.items()}
    raise ValueError(errors[0])


class ContrastiveModel(nn.Module):
    """Pretext model (SimCLR / MoCo v2): backbone + MLP head Linear-ReLU-Linear, L2-normalised output."""

    def __init__(self, backbone: Backbone, hidden_dim: int = 512, feature_dim: int = 128):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(
            nn.Linear(backbone.out_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, feature_dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.head(self.backbone(x)), dim=1)

    def features(self, x: Tensor) -> Tensor:
        return self.backbone(x)


class ClusteringModel(nn.Module):
    """SCAN clustering model: backbone + ``num_heads`` independent linear heads over K clusters.

    forward returns logits (num_heads, N, K); after the SCAN step ``keep_head(best)`` keeps one head.
    """

    def __init__(self, backbone: Backbone, num_clusters: int, num_heads: int = 1):
        super().__init__()
        if num_clusters < 1 or num_heads < 1:
            raise ValueError("num_clusters and num_heads must be positive")
        self.backbone = backbone
        self.num_clusters = int(num_clusters)
        self.heads = nn.ModuleList(nn.Linear(backbone.out_dim, num_clusters) for _ in range(num_heads))

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    def forward(self, x: Tensor) -> Tensor:
        features = self.backbone(x)
        return torch.stack([head(features) for head in self.heads])

    def features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def keep_head(self, index: int) -> None:
        if not 0 <= index < len(self.heads):
            raise IndexError(f"head {index} out of range (model has {len(self.heads)})")
        self.heads = nn.ModuleList([self.heads[index]])
