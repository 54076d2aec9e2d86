"""Batched augmentations: contract (dtype, shape, range, per-sample, seeded) and each op's meaning.

Pixel ops are checked against PIL, whose ops define the semantics of SCAN's Table S2.
"""

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageEnhance, ImageOps

from ml import augment
from ml.augment import CUTOUT_FILL, STRONG_OPS, SimCLRAugment, StrongAugment, WeakAugment, apply_op, to_float

AUGMENTS = {
    "simclr": SimCLRAugment,
    "strong": StrongAugment,
    "weak": WeakAugment,
}


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def random_images(n, c, size, seed=0, dtype=torch.uint8):
    x = torch.randint(0, 256, (n, c, size, size), generator=seeded(seed), dtype=torch.uint8)
    return x if dtype == torch.uint8 else x.float() / 255


def to_pil(img: torch.Tensor) -> Image.Image:
    arr = img.permute(1, 2, 0).numpy()
    return Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)


def from_pil(img: Image.Image, channels: int) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[..., None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255)[:channels]


def pil_batch(x: torch.Tensor, fn) -> torch.Tensor:
    return torch.stack([from_pil(fn(to_pil(img)), x.shape[1]) for img in x])


# --- contract ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", AUGMENTS)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [8, 16, 28, 32])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_output_is_float_in_unit_range_with_input_shape(name, channels, size, dtype):
    x = random_images(4, channels, size, dtype=dtype)
    y = AUGMENTS[name](size)(x, generator=seeded())
    assert y.dtype == torch.float32
    assert y.shape == x.shape
    assert y.min() >= 0 and y.max() <= 1
    assert torch.equal(x, random_images(4, channels, size, dtype=dtype))  # input untouched


@pytest.mark.parametrize("name", AUGMENTS)
def test_large_images(name):
    x = random_images(2, 3, 96)
    assert AUGMENTS[name](96)(x, generator=seeded()).shape == (2, 3, 96, 96)


@pytest.mark.parametrize("name", AUGMENTS)
@pytest.mark.parametrize("channels", [1, 3])
def test_identical_images_get_different_views(name, channels):
    x = random_images(1, channels, 16).repeat(8, 1, 1, 1)
    y = AUGMENTS[name](16)(x, generator=seeded())
    distinct = {tuple(v.flatten().tolist()) for v in y}
    assert len(distinct) >= 6  # per-sample draws; a few coincidences allowed (e.g. two identities)


@pytest.mark.parametrize("name", AUGMENTS)
def test_seeded_generator_is_deterministic(name):
    x = random_images(6, 3, 16)
    aug = AUGMENTS[name](16)
    a = aug(x, generator=seeded(1))
    b = aug(x, generator=seeded(1))
    c = aug(x, generator=seeded(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_to_float():
    x = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    assert to_float(x).tolist() == [[[[0.0, 1.0]]]]
    f = torch.rand(1, 1, 2, 2, dtype=torch.float64)
    assert to_float(f).dtype == torch.float32
    with pytest.raises(TypeError):
        to_float(torch.zeros(1, 1, 2, 2, dtype=torch.int64))


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError):
        StrongAugment(8)(torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError):
        WeakAugment(8)(torch.zeros(3, 8, 8))


# --- SimCLR view -------------------------------------------------------------------------------------


def test_simclr_full_scale_crop_without_jitter_is_identity_or_mirror():
    x = random_images(6, 3, 16, dtype=torch.float32)
    plain = SimCLRAugment(16, crop_scale=(1.0, 1.0), flip=False, jitter_p=0.0, gray_p=0.0)
    assert torch.allclose(plain(x, seeded()), x, atol=1e-5)
    flipping = SimCLRAugment(16, crop_scale=(1.0, 1.0), flip=True, jitter_p=0.0, gray_p=0.0)
    y = flipping(x, seeded())
    same = (y - x).abs().amax(dim=(1, 2, 3)) < 1e-5
    mirrored = (y - x.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert (same | mirrored).all() and same.any() and mirrored.any()


def test_simclr_crops_zoom_in():
    # A small crop scale magnifies: a 1-pixel checkerboard turns into smooth, lower-contrast patches.
    checker = ((torch.arange(32).view(-1, 1) + torch.arange(32)) % 2).float().expand(4, 3, 32, 32)
    y = SimCLRAugment(32, crop_scale=(0.2, 0.3), flip=False, jitter_p=0.0, gray_p=0.0)(checker, seeded())
    assert (y[..., 1:] - y[..., :-1]).abs().mean() < 0.9 * (checker[..., 1:] - checker[..., :-1]).abs().mean()


def test_simclr_grayscale_probability_one_gives_gray_images():
    x = random_images(4, 3, 16)
    y = SimCLRAugment(16, jitter_p=0.0, gray_p=1.0)(x, seeded())
    assert torch.allclose(y[:, 0], y[:, 1]) and torch.allclose(y[:, 1], y[:, 2])


def test_simclr_one_channel_runs_jitter():
    x = random_images(4, 1, 16)
    crop_only = SimCLRAugment(16, jitter_p=0.0, gray_p=0.0)(x, seeded())
    jittered = SimCLRAugment(16, jitter_p=1.0, gray_p=0.0)(x, seeded())
    assert crop_only.shape == jittered.shape == (4, 1, 16, 16)
    assert not torch.allclose(crop_only, jittered)


def test_per_sample_color_factors_match_torchvision_per_image():
    x = random_images(3, 3, 8, dtype=torch.float32)
    factors = [0.3, 1.0, 1.4]
    shifts = [-0.1, 0.05, 0.3]
    for name in ("brightness", "contrast", "saturation", "sharpness"):
        ours = getattr(augment, f"adjust_{name}")(x, torch.tensor(factors))
        for i, f in enumerate(factors):
            ref = getattr(TF, f"adjust_{name}")(x[i : i + 1], f)
            assert torch.allclose(ours[i : i + 1], ref, atol=1e-5), name
    ours = augment.adjust_hue(x, torch.tensor(shifts))
    for i, s in enumerate(shifts):
        assert torch.allclose(ours[i : i + 1], TF.adjust_hue(x[i : i + 1], s), atol=1e-5)
    assert torch.equal(augment.adjust_hue(x, torch.zeros(3)), x)


# --- strong ops, one at a time ------------------------------------------------------------------------

PIL_OPS = {
    # name: (magnitude, PIL reference)
    "autocontrast": (0.0, ImageOps.autocontrast),
    "equalize": (0.0, ImageOps.equalize),
    "solarize": (128.0, lambda im: ImageOps.solarize(im, 128)),
    "posterize": (4.0, lambda im: ImageOps.posterize(im, 4)),
    "brightness": (0.3, lambda im: ImageEnhance.Brightness(im).enhance(0.3)),
    "color": (0.3, lambda im: ImageEnhance.Color(im).enhance(0.3)),
    "contrast": (0.3, lambda im: ImageEnhance.Contrast(im).enhance(0.3)),
    "sharpness": (0.3, lambda im: ImageEnhance.Sharpness(im).enhance(0.3)),
}


@pytest.mark.parametrize("name", PIL_OPS)
@pytest.mark.parametrize("channels", [1, 3])
def test_pixel_ops_match_pil(name, channels):
    # Smooth-ish images with a narrow value range, so autocontrast/equalize have work to do.
    base = torch.randint(60, 180, (3, channels, 4, 4), generator=seeded(), dtype=torch.uint8)
    x = TF.resize(base, [16, 16], antialias=True)
    magnitude, reference = PIL_OPS[name]
    ours = apply_op(x, name, magnitude)
    expected = pil_batch(x, reference)
    # PIL works in 8-bit integers (rounded luma, rounded means), so allow two gray levels.
    assert (ours - expected).abs().max() <= 2.5 / 255, name
    if not (name == "color" and channels == 1):  # a gray image has no colour to reduce
        assert not torch.allclose(ours, to_float(x)), f"{name} did nothing"


def test_identity_and_color_on_gray_are_no_ops():
    x = random_images(2, 1, 8)
    assert torch.equal(apply_op(x, "identity"), to_float(x))
    assert torch.equal(apply_op(x, "color", 0.1), to_float(x))


def test_autocontrast_stretches_each_channel_of_each_sample():
    x = random_images(3, 3, 8, dtype=torch.float32) * 0.4 + 0.3
    y = apply_op(x, "autocontrast")
    assert torch.allclose(y.amin(dim=(2, 3)), torch.zeros(3, 3), atol=1e-6)
    assert torch.allclose(y.amax(dim=(2, 3)), torch.ones(3, 3), atol=1e-6)


def test_solarize_extremes():
    x = random_images(2, 3, 8)
    assert torch.allclose(apply_op(x, "solarize", 256.0), to_float(x))
    assert torch.allclose(apply_op(x, "solarize", 0.0), 1 - to_float(x))


def test_translate_moves_content_by_a_fraction_of_the_side():
    x = random_images(2, 1, 8, dtype=torch.float32)
    y = apply_op(x, "translate_x", 0.25)  # 2 px right, zero fill
    assert torch.equal(y[..., 2:], x[..., :-2]) and (y[..., :2] == 0).all()
    y = apply_op(x, "translate_y", -0.25)  # 2 px up
    assert torch.equal(y[..., :-2, :], x[..., 2:, :]) and (y[..., -2:, :] == 0).all()


def test_rotate_by_a_quarter_turn_on_a_square_image():
    x = random_images(2, 3, 8, dtype=torch.float32)
    y = apply_op(x, "rotate", 90.0)
    assert torch.equal(y, torch.rot90(x, 1, dims=(2, 3)))  # counter-clockwise, as PIL


def test_rotate_matches_pil_nearest():
    x = random_images(2, 3, 32)
    ours = apply_op(x, "rotate", 20.0)
    expected = pil_batch(x, lambda im: im.rotate(20.0, resample=Image.NEAREST))
    # Nearest-neighbour lookups may round differently on a few pixels.
    assert ((ours - expected).abs() > 1e-6).float().mean() < 0.03


def test_shear_slants_a_line_around_the_centre():
    size = 32
    x = torch.zeros(1, 1, size, size)
    x[..., :, size // 2] = 1.0  # vertical line
    y = apply_op(x, "shear_x", 0.1)[0, 0]
    column = y.argmax(dim=1).float()
    assert column[size // 2] == size // 2  # centre row stays
    assert abs(column[0] - column[-1]) == pytest.approx(0.1 * size, abs=1.0)  # +-1.6 px at the ends
    x = x.transpose(2, 3)  # horizontal line
    y = apply_op(x, "shear_y", -0.1)[0, 0]
    row = y.argmax(dim=0).float()
    assert abs(row[0] - row[-1]) == pytest.approx(0.1 * size, abs=1.0)


def test_posterize_keeps_top_bits():
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    y = (apply_op(x, "posterize", 4.0) * 255).round().to(torch.uint8)
    assert torch.equal(y, x & 0xF0)
    assert torch.equal((apply_op(x, "posterize", 8.0) * 255).round().to(torch.uint8), x)


def test_apply_op_accepts_per_sample_magnitudes_and_rejects_unknown_names():
    x = random_images(2, 3, 8, dtype=torch.float32)
    y = apply_op(x, "brightness", torch.tensor([0.0, 1.0]))
    assert (y[0] == 0).all() and torch.allclose(y[1], x[1])
    with pytest.raises(ValueError):
        apply_op(x, "invert")


def test_every_table_s2_op_is_exposed():
    assert len(STRONG_OPS) == 14
    for name in STRONG_OPS:
        y = apply_op(random_images(2, 3, 8), name, 0.5 if name != "posterize" else 5.0)
        assert y.dtype == torch.float32 and y.shape == (2, 3, 8, 8)


# --- strong augmentation: composition and Cutout ------------------------------------------------------


def test_cutout_leaves_one_square_hole():
    x = random_images(64, 3, 16, dtype=torch.float32)  # k/255 is never exactly 0.5
    y = StrongAugment(16, num_ops=0, cutout=4, flip=False)(x, seeded())
    hole = (y == CUTOUT_FILL).all(dim=1)  # (N, H, W)
    sides = set()
    for mask in hole:
        rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
        height, width = len(rows), len(cols)
        assert 1 <= height <= 4 and 1 <= width <= 4  # side drawn from 1..4, maybe clipped
        assert mask.sum() == height * width  # a filled rectangle
        if 0 < rows.min() and rows.max() < 15 and 0 < cols.min() and cols.max() < 15:
            assert height == width  # a square where not clipped
            sides.add(height)
    assert len(sides) >= 3  # the side varies per sample
    assert torch.equal(y[~hole.unsqueeze(1).expand_as(y)], x[~hole.unsqueeze(1).expand_as(x)])


def test_strong_default_cutout_is_half_the_side():
    assert StrongAugment(32).cutout == 16
    assert StrongAugment(96, cutout=32).cutout == 32


def test_strong_without_ops_and_cutout_is_flip_only():
    x = random_images(8, 3, 8, dtype=torch.float32)
    y = StrongAugment(8, num_ops=0, cutout=0, flip=True)(x, seeded())
    same = (y == x).flatten(1).all(1)
    mirrored = (y == x.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and mirrored.any()


# --- weak view -----------------------------------------------------------------------------------------


def test_weak_view_is_a_shifted_and_maybe_mirrored_crop_of_the_reflect_padded_image():
    size, pad = 16, 2
    x = random_images(6, 3, size, dtype=torch.float32)
    y = WeakAugment(size)(x, seeded())
    padded = torch.nn.functional.pad(x, (pad,) * 4, mode="reflect")
    shifts = set()
    for i in range(6):
        found = None
        for oy in range(2 * pad + 1):
            for ox in range(2 * pad + 1):
                crop = padded[i, :, oy : oy + size, ox : ox + size]
                for flipped in (False, True):
                    if torch.equal(y[i], crop.flip(-1) if flipped else crop):
                        found = (oy, ox, flipped)
        assert found is not None, f"sample {i} is not a padded crop"
        shifts.add(found)
    assert len(shifts) > 1


def test_strong_posterize_draws_4_to_7_bits_never_the_no_op_8():
    from ml.augment import OP_RANGES

    low, high = OP_RANGES["posterize"]
    draws = (low + (high - low) * torch.rand(10_000, generator=torch.Generator().manual_seed(0))).floor()
    assert set(draws.unique().tolist()) == {4.0, 5.0, 6.0, 7.0}


def test_invariances_invert_permute_hue_and_gray_each_sample_independently():
    x = random_images(64, 3, 8)

    def always(name):
        return SimCLRAugment(8, crop_scale=(1.0, 1.0), flip=False, jitter_p=0.0, gray_p=0.0, invariances={name: 1.0})(
            x, seeded()
        )

    plain = SimCLRAugment(8, crop_scale=(1.0, 1.0), flip=False, jitter_p=0.0, gray_p=0.0)(x, seeded())
    assert torch.allclose(always("invert"), 1.0 - plain, atol=1e-6)
    permuted = always("channel_permute")
    # Every sample keeps its three channel planes, in some order.
    assert torch.allclose(permuted.sort(dim=1).values, plain.sort(dim=1).values, atol=1e-6)
    assert not torch.allclose(permuted, plain)
    gray = always("grayscale")
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    assert not torch.allclose(always("hue"), plain, atol=1e-3)
    half = SimCLRAugment(8, crop_scale=(1.0, 1.0), flip=False, jitter_p=0.0, gray_p=0.0, invariances={"invert": 0.5})(
        x, seeded()
    )
    inverted = torch.isclose(half, 1.0 - plain, atol=1e-6).flatten(1).all(1)
    assert 10 < int(inverted.sum()) < 54
    with pytest.raises(ValueError, match="unknown invariances"):
        SimCLRAugment(8, invariances={"sepia": 1.0})
