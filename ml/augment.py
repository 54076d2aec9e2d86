"""Batched image augmentations: the SimCLR view, SCAN's strong view and the weak view.

Every transform takes a whole batch ``x`` (N, C, H, W), uint8 or float in [0, 1], C in {1, 3}, on
any device, plus an optional ``torch.Generator`` on that device, and returns float32 in [0, 1].
Each sample gets its own random draw; all draws come from the generator, so a seeded generator
makes the output reproducible. The work is whole-batch tensor ops (affine grids for geometry,
broadcast per-sample factors for colour), so the data can stay on the GPU as uint8 (airbench style).

    aug = StrongAugment(size=32)
    g = torch.Generator(device=x.device).manual_seed(0)
    views = aug(x_uint8, generator=g)          # (N, C, 32, 32) float32

Single strong ops can be applied for inspection and tests with ``apply_op(x, "rotate", 15.0)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor

__all__ = [
    "SimCLRAugment",
    "StrongAugment",
    "WeakAugment",
    "to_float",
    "apply_op",
    "cutout",
    "STRONG_OPS",
    "OP_RANGES",
    "CUTOUT_FILL",
    "INVARIANCES",
]

# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def to_float(x: Tensor) -> Tensor:
    """uint8 -> float32 in [0, 1]; float tensors are returned as float32 (no copy if already)."""
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    if not x.is_floating_point():
        raise TypeError(f"expected uint8 or float images, got {x.dtype}")
    return x.to(torch.float32)


def _check(x: Tensor) -> None:
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, C, H, W) with C in (1, 3), got {tuple(x.shape)}")


def _rand(shape, generator, device) -> Tensor:
    return torch.rand(shape, generator=generator, device=device)


def _uniform(n: int, low: float, high: float, generator, device) -> Tensor:
    return low + (high - low) * _rand(n, generator, device)


def _per_sample(v: Tensor) -> Tensor:
    """(N,) factor -> (N, 1, 1, 1) so it broadcasts over an image batch."""
    return v.view(-1, 1, 1, 1)


def _blend(x: Tensor, degenerate: Tensor, factor: Tensor) -> Tensor:
    """PIL ImageEnhance semantics: factor 0 gives ``degenerate``, 1 the image, >1 extrapolates."""
    f = _per_sample(factor)
    return (degenerate + f * (x - degenerate)).clamp_(0.0, 1.0)


def _grayscale(x: Tensor) -> Tensor:
    """(N, 1, H, W) luma with the ITU-R 601 weights PIL and torchvision use."""
    return x if x.shape[1] == 1 else TF.rgb_to_grayscale(x, num_output_channels=1)


def _warp(x: Tensor, theta: Tensor, size: tuple[int, int], mode: str, padding_mode: str) -> Tensor:
    """Resample every image through its own (2, 3) affine map (output -> input, normalised coords)."""
    grid = F.affine_grid(theta, [x.shape[0], x.shape[1], *size], align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=False)


def _pixel_affine_to_theta(a: Tensor, t: Tensor, height: int, width: int) -> Tensor:
    """Pixel-space maps (centred coordinates, output -> input) to affine_grid's normalised theta.

    a: (N, 2, 2) linear part, t: (N, 2) translation in pixels (x, y). Working in pixels keeps rotation
    and shear angle-true on non-square images; theta = S^-1 [a | t] S with S = diag(W/2, H/2).
    """
    s = torch.tensor([width / 2.0, height / 2.0], device=a.device, dtype=a.dtype)
    lin = a * s.view(1, 1, 2) / s.view(1, 2, 1)
    return torch.cat([lin, (t / s).unsqueeze(-1)], dim=-1)


def _hflip_where(x: Tensor, flip: Tensor) -> Tensor:
    return torch.where(_per_sample(flip), x.flip(-1), x)


# ---------------------------------------------------------------------------------------------
# Colour ops with per-sample factors (torchvision's kernels take one factor per call)
# ---------------------------------------------------------------------------------------------


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, torch.zeros_like(x), factor)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    # Degenerate image: the mean luma of each sample (torchvision/PIL definition).
    mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean.expand_as(x), factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    if x.shape[1] == 1:  # a gray image has no saturation to change
        return x
    return _blend(x, _grayscale(x).expand_as(x), factor)


def adjust_sharpness(x: Tensor, factor: Tensor) -> Tensor:
    # torchvision's kernel with factor 0 is exactly PIL's "smooth" degenerate image (3x3 kernel
    # [[1,1,1],[1,5,1],[1,1,1]]/13, border kept); blending per sample gives per-sample factors.
    return _blend(x, TF.adjust_sharpness(x, 0.0), factor)


def _rgb_to_hsv(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    maxc = x.amax(1)
    minc = x.amin(1)
    delta = maxc - minc
    sat = delta / maxc.clamp_min(1e-12)
    safe = delta.clamp_min(1e-12)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(delta > 0, (hue / 6.0) % 1.0, torch.zeros_like(hue))
    return torch.stack([hue, sat, maxc], dim=1)


def _hsv_to_rgb(hsv: Tensor) -> Tensor:
    # Branch-free form: channel n (R=5, G=3, B=1) is v - v*s*clamp(min(k, 4-k), 0, 1), k=(n+6h) mod 6.
    h, s, v = hsv.unbind(1)
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (n + 6.0 * h) % 6.0
        channels.append(v - v * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(channels, dim=1)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of each sample by ``shift`` (fraction of a turn, [-0.5, 0.5])."""
    if x.shape[1] == 1:
        return x
    hsv = _rgb_to_hsv(x)
    hue = (hsv[:, 0] + shift.view(-1, 1, 1)) % 1.0
    out = _hsv_to_rgb(torch.stack([hue, hsv[:, 1], hsv[:, 2]], dim=1)).clamp_(0.0, 1.0)
    # A zero shift must leave the pixels untouched (the HSV round trip is only exact to ~1e-7).
    return torch.where(_per_sample(shift == 0), x, out)


# ---------------------------------------------------------------------------------------------
# SimCLR view
# ---------------------------------------------------------------------------------------------


class SimCLRAugment:
    """SimCLR's augmentation (Chen et al. 2020, as used for SCAN's pretext step), batched.

    RandomResizedCrop(size, scale=crop_scale, ratio 3/4-4/3) and a horizontal flip p=0.5, both done
    by one per-sample affine grid (bilinear); ColorJitter(brightness, contrast, saturation, hue) with
    probability ``jitter_p`` and per-sample factors, the four jitter ops in one random order per batch;
    RandomGrayscale(p=gray_p). On one-channel images saturation, hue and grayscale do nothing.
    Output is (N, C, size, size).
    """

    # torchvision tries 10 crop boxes before falling back; we draw 10 candidates per sample at once.
    _CROP_TRIES = 10
    _LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))

    def __init__(
        self,
        size: int,
        crop_scale=(0.2, 1.0),
        flip=True,
        jitter=(0.4, 0.4, 0.4, 0.1),
        jitter_p=0.8,
        gray_p=0.2,
        invariances: dict[str, float] | None = None,
    ):
        unknown = set(invariances or {}) - set(INVARIANCES)
        if unknown:
            raise ValueError(f"unknown invariances {sorted(unknown)}; choose from {', '.join(INVARIANCES)}")
        self.invariances = {k: float(v) for k, v in (invariances or {}).items() if v > 0}
        self.size = int(size)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.flip = bool(flip)
        self.jitter = tuple(float(j) for j in jitter)
        self.jitter_p = float(jitter_p)
        self.gray_p = float(gray_p)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check(x)
        x = to_float(x)
        x = self._resized_crop(x, generator)
        x = self._color_jitter(x, generator)
        if x.shape[1] == 3 and self.gray_p > 0:
            gray = _rand(x.shape[0], generator, x.device) < self.gray_p
            x = torch.where(_per_sample(gray), _grayscale(x).expand_as(x), x)
        for name, p in self.invariances.items():
            x = INVARIANCES[name](x, _rand(x.shape[0], generator, x.device) < p, generator)
        return x

    def _resized_crop(self, x: Tensor, generator) -> Tensor:
        n, _, height, width = x.shape
        dev = x.device
        tries = (n, self._CROP_TRIES)
        area = (
            height
            * width
            * (self.crop_scale[0] + (self.crop_scale[1] - self.crop_scale[0]) * _rand(tries, generator, dev))
        )
        lo, hi = self._LOG_RATIO
        ratio = torch.exp(lo + (hi - lo) * _rand(tries, generator, dev))
        w = torch.sqrt(area * ratio)
        h = torch.sqrt(area / ratio)
        fits = (w <= width) & (h <= height)
        first = fits.float().argmax(dim=1, keepdim=True)  # first box that fits
        # When no candidate fits (possible only for scales near 1), take the whole image, as
        # torchvision's fallback does for images whose aspect ratio lies within the ratio range.
        any_fits = fits.any(dim=1)
        w = torch.where(any_fits, w.gather(1, first).squeeze(1), torch.full_like(any_fits, width, dtype=w.dtype))
        h = torch.where(any_fits, h.gather(1, first).squeeze(1), torch.full_like(any_fits, height, dtype=h.dtype))
        # Box centre uniform over the positions where the box stays inside the image.
        cx = w / 2 + (width - w) * _rand(n, generator, dev)
        cy = h / 2 + (height - h) * _rand(n, generator, dev)
        sx = w / width
        if self.flip:
            sx = torch.where(_rand(n, generator, dev) < 0.5, -sx, sx)
        zero = torch.zeros_like(sx)
        theta = torch.stack(
            [
                torch.stack([sx, zero, 2 * cx / width - 1], dim=1),
                torch.stack([zero, h / height, 2 * cy / height - 1], dim=1),
            ],
            dim=1,
        )
        out = _warp(x, theta, (self.size, self.size), mode="bilinear", padding_mode="border")
        return out.clamp_(0.0, 1.0)

    def _color_jitter(self, x: Tensor, generator) -> Tensor:
        b, c, s, hue = self.jitter
        if self.jitter_p <= 0 or not any(self.jitter):
            return x
        n, dev = x.shape[0], x.device
        apply = _rand(n, generator, dev) < self.jitter_p

        def factor(strength: float) -> Tensor:
            # Samples that skip the jitter get the identity factor 1.
            f = _uniform(n, max(0.0, 1.0 - strength), 1.0 + strength, generator, dev)
            return torch.where(apply, f, torch.ones_like(f))

        shift = _uniform(n, -hue, hue, generator, dev)
        shift = torch.where(apply, shift, torch.zeros_like(shift))
        ops = [
            (b > 0, lambda t, f=factor(b): adjust_brightness(t, f)),
            (c > 0, lambda t, f=factor(c): adjust_contrast(t, f)),
            (s > 0, lambda t, f=factor(s): adjust_saturation(t, f)),
            (hue > 0, lambda t: adjust_hue(t, shift)),
        ]
        for i in torch.randperm(4, generator=generator, device=dev).tolist():
            enabled, op = ops[i]
            if enabled:
                x = op(x)
        return x


# ---------------------------------------------------------------------------------------------
# Nuisance invariances: global photometric factors the pretext views vary so that the features,
# and the neighbours mined from them, stop encoding them (pretext.invariances)
# ---------------------------------------------------------------------------------------------


def _invert(x: Tensor, chosen: Tensor, generator) -> Tensor:
    """Polarity: dark-on-light <-> light-on-dark."""
    return torch.where(_per_sample(chosen), 1.0 - x, x)


def _channel_permute(x: Tensor, chosen: Tensor, generator) -> Tensor:
    """Colour identity: one of the 6 orders of R, G, B per chosen sample (identity included)."""
    if x.shape[1] != 3:
        return x
    perms = torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]], device=x.device)
    pick = perms[torch.randint(0, 6, (x.shape[0],), generator=generator, device=x.device)]
    permuted = x.gather(1, pick.view(-1, 3, 1, 1).expand_as(x))
    return torch.where(_per_sample(chosen), permuted, x)


def _hue_rotate(x: Tensor, chosen: Tensor, generator) -> Tensor:
    """Hue: a rotation by a uniform fraction of the whole turn (ColorJitter's hue stops at 0.1)."""
    shift = _rand(x.shape[0], generator, x.device) - 0.5
    return adjust_hue(x, torch.where(chosen, shift, torch.zeros_like(shift)))


def _grayscale_strong(x: Tensor, chosen: Tensor, generator) -> Tensor:
    """Colour at all: grayscale with the probability given (SimCLR's own is 0.2)."""
    if x.shape[1] != 3:
        return x
    return torch.where(_per_sample(chosen), _grayscale(x).expand_as(x), x)


INVARIANCES = {
    "invert": _invert,
    "channel_permute": _channel_permute,
    "hue": _hue_rotate,
    "grayscale": _grayscale_strong,
}


# ---------------------------------------------------------------------------------------------
# Strong view (SCAN supplement, Table S2)
# ---------------------------------------------------------------------------------------------

# Magnitude interval of each op, as in SCAN's Table S2. Translations are fractions of the image
# side. Posterize draws from [4, 8) and floors, i.e. bit depths 4..7 as the reference's int(v) does
# (8 bits would be a no-op, one op in 14 of the draws wasted).
OP_RANGES: dict[str, tuple[float, float] | None] = {
    "identity": None,
    "autocontrast": None,
    "equalize": None,
    "rotate": (-30.0, 30.0),
    "solarize": (0.0, 256.0),
    "color": (0.05, 0.95),
    "contrast": (0.05, 0.95),
    "brightness": (0.05, 0.95),
    "sharpness": (0.05, 0.95),
    "shear_x": (-0.1, 0.1),
    "shear_y": (-0.1, 0.1),
    "translate_x": (-0.1, 0.1),
    "translate_y": (-0.1, 0.1),
    "posterize": (4.0, 8.0),
}
STRONG_OPS: tuple[str, ...] = tuple(OP_RANGES)
_GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")

# Cutout fills with mid gray. The reference fills 0 after Normalize, i.e. the dataset mean colour;
# our normalisation lives inside the model, so 0.5 is the data-independent stand-in for it.
CUTOUT_FILL = 0.5


def _solarize(x: Tensor, threshold: Tensor) -> Tensor:
    # PIL: a pixel value v in 0..255 is inverted when v >= threshold (threshold 256 = identity).
    level = (x * 255.0).round()
    return torch.where(level >= _per_sample(threshold), 1.0 - x, x)


def _posterize(x: Tensor, bits: Tensor) -> Tensor:
    # Keep the top `bits` bits of the 8-bit value.
    step = torch.exp2(8.0 - bits.floor().clamp(1.0, 8.0))
    level = (x * 255.0).round()
    return (torch.div(level, _per_sample(step), rounding_mode="floor") * _per_sample(step)) / 255.0


def _geometric_theta(
    ops: list[str] | tuple[str, ...], op_index: Tensor, magnitude: Tensor, height: int, width: int
) -> Tensor:
    """One (2, 3) affine per sample; op_index[i] indexes ``ops`` (the geometric op it drew)."""
    n = magnitude.shape[0]
    a = torch.eye(2, device=magnitude.device, dtype=torch.float32).repeat(n, 1, 1)
    t = torch.zeros(n, 2, device=magnitude.device, dtype=torch.float32)

    def is_(name: str) -> Tensor:
        return op_index == ops.index(name) if name in ops else torch.zeros_like(op_index, dtype=torch.bool)

    angle = torch.where(is_("rotate"), magnitude, torch.zeros_like(magnitude)) * (math.pi / 180.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    a[:, 0, 0], a[:, 0, 1], a[:, 1, 0], a[:, 1, 1] = cos, -sin, sin, cos
    a[:, 0, 1] = torch.where(is_("shear_x"), magnitude, a[:, 0, 1])
    a[:, 1, 0] = torch.where(is_("shear_y"), magnitude, a[:, 1, 0])
    # Moving the content by +d means sampling the input at x - d.
    t[:, 0] = torch.where(is_("translate_x"), -magnitude * width, t[:, 0])
    t[:, 1] = torch.where(is_("translate_y"), -magnitude * height, t[:, 1])
    return _pixel_affine_to_theta(a, t, height, width)


def _warp_geometric(x: Tensor, theta: Tensor) -> Tensor:
    # Nearest neighbour and black fill, like the PIL ops of the reference (default resample/fill).
    return _warp(x, theta, (x.shape[2], x.shape[3]), mode="nearest", padding_mode="zeros")


_PIXEL_OPS = {
    "identity": lambda x, m: x,
    "autocontrast": lambda x, m: TF.autocontrast(x),  # per sample, per channel min/max
    "equalize": lambda x, m: TF.equalize(x),  # per sample, per channel histogram
    "solarize": _solarize,
    "color": adjust_saturation,
    "contrast": adjust_contrast,
    "brightness": adjust_brightness,
    "sharpness": adjust_sharpness,
    "posterize": _posterize,
}


def apply_op(x: Tensor, name: str, magnitude: float | Tensor = 0.0) -> Tensor:
    """Apply one strong op of Table S2 to every image of the batch with the given magnitude.

    ``magnitude`` is a scalar or an (N,) tensor in the op's units (degrees, 0-256 threshold, enhance
    factor, shear factor, fraction of the side, bits). Returns float32 in [0, 1].
    """
    if name not in OP_RANGES:
        raise ValueError(f"unknown op {name!r}; choose one of {', '.join(STRONG_OPS)}")
    _check(x)
    x = to_float(x)
    m = torch.as_tensor(magnitude, dtype=torch.float32, device=x.device).expand(x.shape[0])
    if name in _GEOMETRIC:
        theta = _geometric_theta(
            _GEOMETRIC, torch.full_like(m, _GEOMETRIC.index(name), dtype=torch.long), m, x.shape[2], x.shape[3]
        )
        return _warp_geometric(x, theta)
    return _PIXEL_OPS[name](x, m).clamp(0.0, 1.0)


def cutout(x: Tensor, side: int, generator=None, fill: float = CUTOUT_FILL) -> Tensor:
    """Cutout (DeVries & Taylor 2017): one square per sample at a uniformly random centre,
    clipped at the image border, filled with ``fill``. Its side is drawn per sample from
    1..``side``, as in SCAN's recipe; always the full side erased too much of small images
    (self-labeling on Fashion-MNIST at 14 px lost accuracy with it)."""
    n, _, height, width = x.shape
    if side <= 0:
        return x
    dev = x.device
    cy = torch.randint(0, height, (n,), generator=generator, device=dev)
    cx = torch.randint(0, width, (n,), generator=generator, device=dev)
    sides = torch.randint(1, side + 1, (n,), generator=generator, device=dev)
    y0, x0 = cy - sides // 2, cx - sides // 2
    rows = torch.arange(height, device=dev).view(1, height, 1)
    cols = torch.arange(width, device=dev).view(1, 1, width)
    hole = (
        (rows >= y0.view(-1, 1, 1))
        & (rows < (y0 + sides).view(-1, 1, 1))
        & (cols >= x0.view(-1, 1, 1))
        & (cols < (x0 + sides).view(-1, 1, 1))
    )
    return torch.where(hole.unsqueeze(1), torch.full_like(x, fill), x)


class StrongAugment:
    """SCAN's strong augmentation (supplement C.2, Table S2), batched.

    Optional horizontal flip (p=0.5), then ``num_ops`` ops drawn per sample with replacement from
    the 14 of Table S2, each with a magnitude uniform in its interval (``OP_RANGES``), then Cutout of
    one hole whose side is drawn per sample from 1..``cutout`` (default: half the side, the paper's
    16 px on 32 px images), as the reference does, filled with 0.5 gray (``CUTOUT_FILL``).

    At each of the ``num_ops`` positions, the samples that drew the same op are processed together;
    all geometric ops of a position share a single grid_sample call.
    """

    def __init__(self, size: int, num_ops=4, cutout: int | None = None, flip=True):
        self.size = int(size)
        self.num_ops = int(num_ops)
        self.cutout = self.size // 2 if cutout is None else int(cutout)
        self.flip = bool(flip)
        lows, highs = zip(*[(r or (0.0, 0.0)) for r in OP_RANGES.values()])
        self._low = torch.tensor(lows)
        self._high = torch.tensor(highs)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check(x)
        x = to_float(x).clone()
        n, dev = x.shape[0], x.device
        if self.flip:
            x = _hflip_where(x, _rand(n, generator, dev) < 0.5)
        if self.num_ops > 0:
            ops = torch.randint(len(STRONG_OPS), (n, self.num_ops), generator=generator, device=dev)
            u = _rand((n, self.num_ops), generator, dev)
            low, high = self._low.to(dev), self._high.to(dev)
            magnitude = low[ops] + (high[ops] - low[ops]) * u
            ops_host = ops.cpu()  # one device sync; the masks below are then built on the host
            for pos in range(self.num_ops):
                x = self._apply_position(x, ops[:, pos], ops_host[:, pos], magnitude[:, pos])
        return cutout(x, self.cutout, generator)

    def _apply_position(self, x: Tensor, ops: Tensor, ops_host: Tensor, magnitude: Tensor) -> Tensor:
        dev = x.device
        geo_ids = [STRONG_OPS.index(name) for name in _GEOMETRIC]
        geo = torch.isin(ops_host, torch.tensor(geo_ids)).nonzero().squeeze(1)
        if geo.numel():
            idx = geo.to(dev)
            theta = _geometric_theta(STRONG_OPS, ops[idx], magnitude[idx], x.shape[2], x.shape[3])
            x[idx] = _warp_geometric(x[idx], theta)
        for name, op in _PIXEL_OPS.items():
            if name == "identity":
                continue
            chosen = (ops_host == STRONG_OPS.index(name)).nonzero().squeeze(1)
            if chosen.numel():
                idx = chosen.to(dev)
                x[idx] = op(x[idx], magnitude[idx]).clamp(0.0, 1.0)
        return x


# ---------------------------------------------------------------------------------------------
# Weak view
# ---------------------------------------------------------------------------------------------


class WeakAugment:
    """The weak view: horizontal flip (p=0.5) and a random crop of the image padded by size // 8
    (reflect), i.e. a random translation of up to size // 8 pixels, drawn per sample. Output has the
    input's shape."""

    def __init__(self, size: int, flip=True):
        self.size = int(size)
        self.pad = self.size // 8
        self.flip = bool(flip)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check(x)
        x = to_float(x)
        n, c, height, width = x.shape
        dev = x.device
        pad = min(self.pad, height - 1, width - 1)  # reflect padding must be smaller than the side
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect") if pad > 0 else x
        oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev)
        ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev)
        cols = torch.arange(width, device=dev).expand(n, width)
        if self.flip:
            flip = _rand(n, generator, dev) < 0.5
            cols = torch.where(flip.view(-1, 1), cols.flip(-1), cols)
        rows = oy.view(-1, 1) + torch.arange(height, device=dev)
        cols = ox.view(-1, 1) + cols
        # One gather for crop and flip: out[i, c, y, x] = padded[i, c, rows[i, y], cols[i, x]].
        batch = torch.arange(n, device=dev).view(-1, 1, 1, 1)
        chan = torch.arange(c, device=dev).view(1, -1, 1, 1)
        return padded[batch, chan, rows.view(n, 1, height, 1), cols.view(n, 1, 1, width)]
