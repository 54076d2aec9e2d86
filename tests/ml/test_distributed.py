"""Data-parallel training (ml/distributed.py): two gloo processes on the CPU train the pretext and
self-label stages exactly as one process does on the same global batch.

What is compared: the loss of every optimiser step, as the stage reports it, from
``run_stage(..., devices=2)`` (two ranks, each holding half of every batch) against
``run_stage(..., devices=1)`` (one process, the whole batch), same seed and data. BatchNorm: torch's
SyncBatchNorm refuses CPU tensors in torch 2.14 ("expected input tensor to be on GPU"), so the CPU
ranks normalise with ml.distributed.GlobalBatchNorm, which all-reduces the batch sums; the
reference is therefore a plain single process, not one that splits its batch per rank.

Tolerance: the ranks reorder float32 sums (BatchNorm statistics, the gradient all-reduce), so the
first step agrees to a few float32 ulps of the loss (4.8e-7 at a loss of 4.0) and later steps drift
as SGD at lr 0.3 amplifies those differences: at most 1.8e-5 over 8 SimCLR steps, 3.3e-6 for MoCo,
4.8e-7 for self-labeling (measured here). 1e-4 leaves that room and is far below what a
mismatch costs: BatchNorm statistics per rank instead of global moved the first SimCLR loss by 0.077,
and the previous attempt's per-rank negatives by 6.7e-4.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal

import numpy as np
import pytest
import torch

from ml.config import RunConfig
from ml.data import ImageSet, load_source
from ml.device import cpu_cores, select_runtime
from ml.distributed import world_size
from ml.pipeline import Canceled, prepare_run, run_stage
from ml.saved_models import load_clustering, load_contrastive
from ml.stages.common import predict_all

# Each test starts two processes that import torch (tens of seconds on a busy 2-core machine).
slow = pytest.mark.slow

TOLERANCE = 1e-4
FIRST_STEP_TOLERANCE = 1e-5

# 256 digits, batches of 64: 4 steps an epoch, 2 epochs; a few seconds of training per process.
TINY = {
    "seed": 0,
    "pretext.epochs": 2,
    "pretext.batch_size": 64,
    "pretext.moco_queue": 128,
    "clustering.epochs": 2,
    "clustering.batch_size": 64,
    "selflabel.epochs": 2,
    "selflabel.batch_size": 64,
}


@pytest.fixture(scope="module")
def digits():
    d = load_source("digits")
    return ImageSet(d.images[:256], d.labels[:256], d.class_names, "digits")


def _train(stage, run_dir, data, devices, overrides=None, should_cancel=None):
    cfg = RunConfig.from_preset("small", 10, {**TINY, **(overrides or {}), "devices": devices})
    prepare_run(run_dir, cfg)
    events = []
    summary = run_stage(stage, run_dir, data, progress=events.append, should_cancel=should_cancel, cfg=cfg)
    steps = [p.loss for p in events if p.loss is not None and not p.epoch_end]
    return np.array(steps), summary, events


def _same_trajectory(one, two, steps=8):
    assert len(one) == len(two) == steps, (one, two)
    assert abs(one[0] - two[0]) < FIRST_STEP_TOLERANCE, (one, two)
    np.testing.assert_allclose(two, one, rtol=0, atol=TOLERANCE)


@slow
@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_two_processes_train_the_pretext_as_one_does(digits, tmp_path, method):
    one, _, _ = _train("pretext", tmp_path / "one", digits, 1, {"pretext.method": method})
    two, summary, _ = _train("pretext", tmp_path / "two", digits, 2, {"pretext.method": method})
    _same_trajectory(one, two)
    assert summary["devices"] == 2 and summary["device"] == "cpu x2"

    # Rank 0's checkpoint is a usable model: loaded alone, it gives the features the stage wrote.
    model, meta = load_contrastive(tmp_path / "two" / "pretext.pt")
    rt = select_runtime("cpu", "fp32", False)
    images = torch.from_numpy(digits.images)
    features = torch.nn.functional.normalize(predict_all(model.features, images, rt), dim=1).numpy()
    written = np.load(tmp_path / "two" / "features.npy")
    np.testing.assert_allclose(features, written, atol=1e-5)
    # ... and they are the one-process run's features, up to the rounding the trajectory allows.
    np.testing.assert_allclose(written, np.load(tmp_path / "one" / "features.npy"), atol=5e-3)


@slow
@pytest.mark.parametrize(
    "seeds, extra",
    [(1, {}), (2, {}), (1, {"selflabel.contrastive_weight": 1.0, "selflabel.contrastive_images": 32})],
    ids=["one-seed", "two-seeds", "contrastive"],
)
def test_two_processes_train_the_selflabel_stage_as_one_does(digits, tmp_path, seeds, extra):
    """With `seeds: 2` the stage self-labels each seed's SCAN model in turn, every seed on both ranks.
    With the SimCLR term each rank embeds its half of the views and the loss sees all of them."""
    base = tmp_path / "base"
    for stage in ("pretext", "mining", "clustering"):
        _train(stage, base, digits, 1, {"seeds": seeds})
    shutil.copytree(base, tmp_path / "two")
    shutil.copytree(base, tmp_path / "one")
    one, _, one_events = _train("selflabel", tmp_path / "one", digits, 1, {"seeds": seeds, **extra})
    two, summary, two_events = _train("selflabel", tmp_path / "two", digits, 2, {"seeds": seeds, **extra})
    _same_trajectory(one, two, steps=8 * seeds)

    # The per-epoch confident count and ACC are computed by both ranks over their halves of the set.
    def epochs(events):
        return [p.metrics for p in events if p.epoch_end and "confident" in p.metrics]

    assert len(epochs(two_events)) == 2 * seeds and epochs(two_events) == epochs(one_events)

    model, meta = load_clustering(tmp_path / "two" / "model.pt")
    rt = select_runtime("cpu", "fp32", False)
    probs = predict_all(lambda x: model(x)[0].softmax(-1), torch.from_numpy(digits.images), rt)
    stored = np.load(tmp_path / "two" / "assignments.npz")
    np.testing.assert_array_equal(probs.argmax(1).numpy(), stored["cluster"])


@slow
def test_a_canceled_two_device_stage_resumes_from_its_checkpoint_on_one(digits, tmp_path):
    """A cancel seen at the first epoch's end stops both ranks there (rank 0 waits for the launcher
    at each epoch's end, as one process waits for its callback); the epoch's checkpoint, written by
    rank 0, holds no trace of the world size: one process resumes it into the trajectory of an
    uninterrupted run."""
    whole, _, _ = _train("pretext", tmp_path / "whole", digits, 1)
    cfg = RunConfig.from_preset("small", 10, {**TINY, "devices": 2})
    prepare_run(tmp_path / "split", cfg)
    events = []
    with pytest.raises(Canceled):
        run_stage(
            "pretext",
            tmp_path / "split",
            digits,
            progress=events.append,
            should_cancel=lambda: any(p.epoch_end for p in events),
            cfg=cfg,
        )
    assert torch.load(tmp_path / "split" / "checkpoints" / "pretext.pt", weights_only=False)["epoch"] == 0
    assert not (tmp_path / "split" / "pretext.pt").exists()
    first = [p.loss for p in events if p.loss is not None and not p.epoch_end]
    assert len(first) == 4

    rest, _, _ = _train("pretext", tmp_path / "split", digits, 1)
    assert len(rest) == 4  # the second epoch only
    np.testing.assert_allclose(np.concatenate([first, rest]), whole, rtol=0, atol=TOLERANCE)


@slow
def test_a_rank_that_dies_fails_the_stage(digits, tmp_path):
    """Rank 1 killed by SIGKILL mid-stage (as the OOM killer would): the stage raises, naming it,
    and rank 0 is not left waiting in a collective."""
    killed = []

    def progress(p):
        if not killed:
            ranks = sorted(multiprocessing.active_children(), key=lambda c: c.name)
            os.kill(ranks[-1].pid, signal.SIGKILL)
            killed.append(ranks[-1].pid)

    cfg = RunConfig.from_preset("small", 10, {**TINY, "devices": 2, "pretext.epochs": 20})
    prepare_run(tmp_path, cfg)
    with pytest.raises(RuntimeError, match="SIGKILL"):
        run_stage("pretext", tmp_path, digits, progress=progress, cfg=cfg)
    assert killed
    assert not multiprocessing.active_children()


def test_a_batch_that_does_not_split_over_the_devices_is_refused():
    with pytest.raises(ValueError, match="does not split evenly over devices=3"):
        RunConfig.from_preset("small", 10, {"devices": 3})
    assert RunConfig.from_preset("small", 10, {"devices": 4}).devices == 4


def test_world_size_splits_the_batch_evenly_and_never_exceeds_the_ask():
    cpu = torch.device("cpu")
    cores = cpu_cores()
    assert world_size(2, cpu, 64) == min(2, cores)
    assert world_size(64, cpu, 64) <= cores  # one process per core at most: never 64 on a small worker
    if cores >= 3:
        assert world_size(4, cpu, 6) == 3  # a small set's batch (6 images): 3 ranks of 2
    assert world_size(2, cpu, 7) == 1
    assert world_size(1, cpu, 64) == 1


def test_a_rank_killed_by_a_signal_is_named_before_the_errors_it_caused():
    """The race the test above can lose: rank 1 SIGKILLed, rank 0 then fails in a collective and
    reports first. The killed rank is the cause; SIGTERM (sent by torch's join to the ranks still
    running) never is; without a kill the rank's own exception comes back as it was raised."""
    from types import SimpleNamespace

    from ml.launch import _killed, _rank_error

    gloo = [0, None, "RuntimeError: Connection reset by peer"]
    procs = [SimpleNamespace(exitcode=-signal.SIGTERM), SimpleNamespace(exitcode=-signal.SIGKILL)]
    err = _rank_error("pretext", gloo, RuntimeError("join"), _killed(procs))
    assert str(err).startswith("pretext: rank 1 was killed by SIGKILL") and "Connection reset" in str(err)
    assert _killed([SimpleNamespace(exitcode=-signal.SIGTERM), SimpleNamespace(exitcode=None)]) == []
    assert "rank 0 failed" in str(_rank_error("pretext", gloo, RuntimeError("join"), []))
