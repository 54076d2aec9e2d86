"""`canonicalise: true` (ml.networks.CanonicalColour): the model sees each image as one standardised
channel with its ground on the dark side, so ink and ground colours and inversion cannot reach the
features; and what training sees, /predict (the Predictor) and the exported ONNX / TorchScript
graphs see too (issue #10)."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import torch

from ml.config import RunConfig
from ml.data import load_source
from ml.data.imageset import ImageSet
from ml.export import export_archive
from ml.networks import CanonicalColour, build_backbone
from ml.pipeline import STAGES, prepare_run, run_stage
from ml.predictor import Predictor
from tests.ml.test_invariance import recolour


def _float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(images)).float() / 255


def test_recoloured_digits_become_the_plain_ones():
    digits = load_source("digits")
    plain = CanonicalColour(1)(_float(digits.images))
    coloured = CanonicalColour(3)(_float(recolour(digits.images)))
    assert plain.shape == coloured.shape == (digits.n, 1, 8, 8)
    # Only the rounding of the colours to uint8 differs (a standardised pixel spans about -1..3).
    assert (coloured - plain).abs().max() < 0.05
    # The polarity rule keeps the plain digits as drawn (light ink on a dark ground) but for a
    # handful whose ink touches the border: the layer changes what the model sees of plain data little.
    raw = _float(digits.images)
    same_way = ((plain * (raw - raw.mean(dim=(2, 3), keepdim=True))).mean(dim=(1, 2, 3)) > 0).float().mean()
    assert same_way > 0.99, same_way


def test_output_is_standardised_and_ignores_colour_order_gain_and_inversion():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 12, 12, generator=g)
    z = CanonicalColour(3)(x)
    assert torch.allclose(z.mean(dim=(1, 2, 3)), torch.zeros(16), atol=1e-5)
    assert torch.allclose(z.square().mean(dim=(1, 2, 3)), torch.ones(16), atol=1e-2)
    # The ground (the outer pixel ring at 12 px) is the negative side.
    ring = torch.ones(12, 12, dtype=torch.bool)
    ring[1:-1, 1:-1] = False
    assert (z[:, 0, ring].sum(dim=1) <= 0).all()
    for changed in (1 - x, x[:, [2, 0, 1]], 0.8 * x + 0.1):
        assert torch.allclose(CanonicalColour(3)(changed), z, atol=1e-2)


def test_flat_images_give_zeros_not_nan():
    flat = torch.full((3, 3, 8, 8), 0.3)
    flat[1] = 0.0
    flat[2, 1] = 1.0  # a flat colour, not gray
    for out in (CanonicalColour(3)(flat), CanonicalColour(1)(flat[:, :1])):
        assert out.shape == (3, 1, 8, 8) and out.abs().max() < 1e-4  # float rounding of the mean only


def test_a_canonicalising_backbone_takes_the_images_channels_and_sees_one():
    backbone = build_backbone("convnet", 3, (0.5,), (0.25,), width=8, canonicalise=True)
    assert backbone.in_channels == 3 and backbone.stem[0].in_channels == 1
    x = torch.rand(4, 3, 8, 8)
    backbone.eval()
    assert torch.allclose(backbone(x), backbone(1 - x), atol=1e-5)


@pytest.fixture(scope="module")
def canonical_run(tmp_path_factory):
    plain = load_source("digits")
    data = ImageSet(recolour(plain.images), plain.labels, plain.class_names, "digits-recoloured")
    run_dir = tmp_path_factory.mktemp("canonical-run")
    # Sized to what is asserted (the same numbers everywhere), not to accuracy.
    recipe = {"canonicalise": True, "pretext.epochs": 2, "clustering.epochs": 2, "selflabel.epochs": 1}
    prepare_run(run_dir, RunConfig.from_preset("small", 10, recipe))
    for stage in STAGES:
        run_stage(stage, run_dir, data)
    return run_dir, data


@pytest.mark.slow
def test_predict_and_exports_canonicalise_as_training_did(canonical_run):
    import onnxruntime as ort

    run_dir, data = canonical_run
    predictor = Predictor.load(run_dir, device="cpu")
    rgb = np.asarray(data.images[:64])
    probs = predictor.predict(rgb)
    stored = np.load(run_dir / "assignments.npz")
    assert (probs.argmax(1) == stored["cluster"][:64]).all()
    # Inverting an image (ink and ground swapped) does not move its prediction.
    np.testing.assert_allclose(predictor.predict(255 - rgb), probs, atol=1e-5)

    x = rgb.astype(np.float32) / 255  # preprocessing.json: uint8 / 255, NCHW
    with zipfile.ZipFile(export_archive(run_dir, "onnx", predictor=predictor)) as zf:
        session = ort.InferenceSession(zf.read("model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"images": x})[0], probs, atol=1e-5)
    assert session.run(None, {"images": x[:1]})[0].shape == (1, 10)  # the batch stays dynamic
    with zipfile.ZipFile(export_archive(run_dir, "torchscript", predictor=predictor)) as zf:
        scripted = torch.jit.load(io.BytesIO(zf.read("model.pt")), map_location="cpu")
    with torch.no_grad():
        np.testing.assert_allclose(scripted(torch.from_numpy(x)).numpy(), probs, atol=1e-5)
        np.testing.assert_allclose(scripted(torch.from_numpy(x[:3])).numpy(), probs[:3], atol=1e-5)
