"""Backbones, pretext and clustering models, and loading foreign weights."""

import io

import numpy as np
import pytest
import torch
import torchvision

from ml.networks import ClusteringModel, ContrastiveModel, build_backbone, load_backbone_weights

OUT_DIM = {"resnet18_cifar": 512, "resnet18_stl": 512, "resnet18": 512, "resnet50": 2048, "convnet": 256}


def backbone(arch="convnet", channels=3):
    return build_backbone(arch, channels, [0.5] * channels, [0.25] * channels)


def images(n=2, channels=3, size=32, seed=0):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def resnet18_state():
    """A torchvision resnet18 state dict (random init, fixed seed), fc included."""
    torch.manual_seed(1)
    return torchvision.models.resnet18(weights=None).state_dict()


# ResNets are slow to build on 2 cores (10-20 s each under load): each arch once, the other channel
# count for one of them, and only in make test; make test-fast builds the small convnet.
RESNET = pytest.mark.slow


@pytest.mark.parametrize(
    "arch,channels",
    [
        pytest.param("resnet18_cifar", 3, marks=RESNET),
        pytest.param("resnet18_stl", 3, marks=RESNET),
        pytest.param("resnet18", 1, marks=RESNET),
        pytest.param("resnet50", 3, marks=RESNET),
        ("convnet", 1),
        ("convnet", 3),
    ],
)
def test_clustering_model_shapes(arch, channels):
    torch.manual_seed(0)
    b = backbone(arch, channels)
    assert b.out_dim == OUT_DIM[arch]
    model = ClusteringModel(b, num_clusters=7, num_heads=3).eval()
    x = images(2, channels, 16)
    with torch.no_grad():
        assert model(x).shape == (3, 2, 7)
        assert model.features(x).shape == (2, OUT_DIM[arch])


def test_contrastive_model_outputs_unit_vectors():
    torch.manual_seed(0)
    model = ContrastiveModel(backbone("convnet", 3), hidden_dim=64, feature_dim=16).eval()
    x = images(4, 3, 16)
    with torch.no_grad():
        z = model(x)
        assert model.features(x).shape == (4, 256)
    assert z.shape == (4, 16)
    assert torch.allclose(z.norm(dim=1), torch.ones(4), atol=1e-5)
    assert [type(m).__name__ for m in model.head] == ["Linear", "ReLU", "Linear"]


@pytest.mark.parametrize("size", [8, 16, 28])
def test_convnet_handles_small_images(size):
    model = ClusteringModel(backbone("convnet", 1), num_clusters=10).eval()
    with torch.no_grad():
        assert model(images(3, 1, size)).shape == (1, 3, 10)


def test_stems():
    cifar = backbone("resnet18_cifar")
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, torch.nn.Identity)
    standard = backbone("resnet18", channels=1)
    assert standard.conv1.kernel_size == (7, 7) and standard.conv1.in_channels == 1
    assert isinstance(standard.maxpool, torch.nn.MaxPool2d)
    assert "fc.weight" not in standard.state_dict()


def test_normalisation_is_a_buffer_inside_the_backbone():
    b = build_backbone("convnet", 3, [0.1, 0.2, 0.3], [0.5, 0.5, 0.25])
    state = b.state_dict()
    assert state["normalize.mean"].flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])
    x = torch.ones(1, 3, 2, 2)
    assert b.normalize(x)[0, :, 0, 0].tolist() == pytest.approx([1.8, 1.6, 2.8])
    gray = build_backbone("convnet", 1, [0.5], [0.2])
    assert gray.normalize.mean.shape == (1, 1, 1, 1)
    with pytest.raises(ValueError):
        build_backbone("convnet", 3, [0.5, 0.5], [0.2])
    with pytest.raises(ValueError):
        build_backbone("vgg", 3, [0.5], [0.2])


def test_keep_head_keeps_that_head():
    torch.manual_seed(0)
    model = ClusteringModel(backbone(), num_clusters=5, num_heads=4).eval()
    x = images(3, 3, 16)
    with torch.no_grad():
        before = model(x)
        model.keep_head(2)
        after = model(x)
    assert after.shape == (1, 3, 5) and model.num_heads == 1
    assert torch.equal(after[0], before[2])
    with pytest.raises(IndexError):
        model.keep_head(1)


@pytest.mark.parametrize("arch", ["convnet", pytest.param("resnet18_cifar", marks=RESNET)])
def test_channels_last_bf16_autocast_matches_fp32(arch):
    torch.manual_seed(0)
    model = ClusteringModel(backbone(arch), num_clusters=10, num_heads=2).eval()
    pretext = ContrastiveModel(model.backbone).eval()
    x = images(2, 3, 16)
    with torch.no_grad():
        reference = model(x)
        reference_z = pretext(x)
        model = model.to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = model(x_cl)
            fast_z = pretext(x_cl)
    assert fast.dtype == torch.bfloat16 and fast.shape == reference.shape
    # bf16 keeps ~3 significant digits; compare relative to the logits' spread.
    scale = reference.abs().max()
    assert (fast.float() - reference).abs().max() < 0.05 * scale
    assert torch.nn.functional.cosine_similarity(fast_z.float(), reference_z).min() > 0.99


@pytest.mark.slow  # loading the ONNX exporter alone takes seconds
def test_trace_and_onnx_export_of_a_single_head_model():
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = ClusteringModel(backbone("convnet", 1), num_clusters=10, num_heads=3)
    model.keep_head(0)
    model.eval()
    x = images(2, 1, 16)
    traced = torch.jit.trace(model, x)
    other = images(5, 1, 16, seed=1)
    with torch.no_grad():
        expected = model(other)
    assert torch.allclose(traced(other), expected, atol=1e-5)
    buffer = io.BytesIO()
    torch.onnx.export(
        model,
        (x,),
        buffer,
        dynamo=False,
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}, "logits": {1: "batch"}},
    )
    session = onnxruntime.InferenceSession(buffer.getvalue())
    (logits,) = session.run(None, {"images": other.numpy()})
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4)


# --- load_backbone_weights ---------------------------------------------------------------------------


@RESNET
def test_load_torchvision_resnet18_state_dict(tmp_path, resnet18_state):
    source = torchvision.models.resnet18(weights=None)
    source.load_state_dict(resnet18_state)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)  # includes fc.*, which a backbone has no use for
    b = backbone("resnet18")
    assert not torch.equal(b.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    load_backbone_weights(b, path)
    assert torch.equal(b.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert torch.equal(b.bn1.running_var, source.bn1.running_var)
    assert b.normalize.mean.flatten().tolist() == [0.5, 0.5, 0.5]  # our normalisation is kept
    b.eval()
    source.eval()
    x = images(2, 3, 32)
    with torch.no_grad():
        source.fc = torch.nn.Identity()
        assert torch.allclose(b(x), source((x - 0.5) / 0.25), atol=1e-5)


def test_load_wrapped_and_prefixed_checkpoints(tmp_path, resnet18_state):
    wrapped = {"epoch": 3, "state_dict": {f"module.encoder_q.{k}": v for k, v in resnet18_state.items()}}
    path = tmp_path / "moco.pth.tar"
    torch.save(wrapped, path)
    b = backbone("resnet18")
    load_backbone_weights(b, path)
    assert torch.equal(b.layer1[0].conv1.weight, resnet18_state["layer1.0.conv1.weight"])


def test_load_our_own_pretext_checkpoint(tmp_path):
    torch.manual_seed(3)
    pretext = ContrastiveModel(backbone("convnet", 1))
    path = tmp_path / "pretext.pt"
    torch.save({"model": pretext.state_dict()}, path)
    fresh = backbone("convnet", 1)
    load_backbone_weights(fresh, path)
    assert torch.equal(fresh.block3[0].weight, pretext.backbone.block3[0].weight)


def test_three_channel_conv1_is_folded_into_one(tmp_path, resnet18_state):
    source = torch.nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
    source.weight.data.copy_(resnet18_state["conv1.weight"])
    path = tmp_path / "rgb.pth"
    torch.save(resnet18_state, path)
    gray = backbone("resnet18", channels=1)
    load_backbone_weights(gray, path)
    assert gray.conv1.weight.shape == (64, 1, 7, 7)
    assert torch.allclose(gray.conv1.weight, source.weight.sum(dim=1, keepdim=True))
    # A gray image repeated on three channels gives the RGB network's first-layer response.
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(gray.conv1(x), source(x.repeat(1, 3, 1, 1)), atol=1e-5)


def test_mismatching_files_are_reported_with_their_name(tmp_path, resnet18_state):
    path = tmp_path / "imagenet_stem.pth"
    torch.save(resnet18_state, path)
    with pytest.raises(ValueError, match="imagenet_stem.pth.*conv1.weight"):
        load_backbone_weights(backbone("resnet18_cifar"), path)  # 7x7 stem into a 3x3 stem
    target = backbone("resnet18")
    unrelated = tmp_path / "unrelated.pth"
    torch.save({"foo.weight": torch.zeros(3)}, unrelated)
    with pytest.raises(ValueError, match="unrelated.pth.*no parameter"):
        load_backbone_weights(target, unrelated)
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in resnet18_state.items() if not k.startswith("layer4")}, partial)
    with pytest.raises(ValueError, match="partial.pth.*missing"):
        load_backbone_weights(target, partial)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        load_backbone_weights(target, garbage)
