"""The model cache's serving set-up on the CPU: model instances in the batcher, torch threads."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from app.serving.model_cache import ModelCache, set_torch_threads
from ml.device import cpu_cores
from ml.networks import ClusteringModel, ContrastiveModel, build_backbone
from ml.predictor import Predictor
from ml.saved_models import model_meta, save_clustering, save_contrastive


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run directory with the two models Predictor.load reads (random weights, 1x8x8 input)."""
    torch.manual_seed(0)
    mean, std = [0.5], [0.25]
    contrastive = ContrastiveModel(build_backbone("convnet", 1, mean, std))
    meta = model_meta("convnet", 1, 8, mean, std, hidden_dim=512, feature_dim=128, feature_space="head")
    save_contrastive(tmp_path / "pretext.pt", contrastive, meta)
    model = ClusteringModel(build_backbone("convnet", 1, mean, std), 5, num_heads=1)
    save_clustering(tmp_path / "model.pt", model, model_meta("convnet", 1, 8, mean, std, num_clusters=5, num_heads=1))
    return tmp_path


@pytest.fixture
def torch_threads():
    """Put the process's torch thread count back after a test that sets it."""
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def test_concurrent_batches_in_several_instances_answer_what_the_model_answers(run_dir: Path):
    """Batches running at once in two threads through one model give each caller its own rows, equal
    to the model called on them alone."""
    cache = ModelCache(capacity=1, max_batch_size=4, max_delay_ms=0, instances=2)
    served = cache.get(run_dir)
    assert served.batcher.instances == 2
    images = np.random.default_rng(0).integers(0, 256, (64, 1, 8, 8), dtype=np.uint8)

    async def main():
        return await asyncio.gather(*(served.batcher.submit(images[i : i + 2]) for i in range(0, 64, 2)))

    try:
        outs = asyncio.run(main())
    finally:
        cache.clear()
    expected = Predictor.load(run_dir, device="cpu").predict(images)
    np.testing.assert_allclose(np.concatenate(outs), expected, rtol=1e-5, atol=1e-6)


def test_torch_threads_left_alone_with_one_instance_and_divided_among_several(torch_threads):
    cores = cpu_cores()
    assert set_torch_threads(0, 1) == torch_threads
    assert set_torch_threads(0, 2) == max(1, cores // 2)
    assert set_torch_threads(0, 4 * cores) == 1  # never below one
    assert set_torch_threads(3, 2) == 3  # an explicit count wins
