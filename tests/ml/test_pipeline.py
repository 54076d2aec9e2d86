"""The whole SCAN pipeline on real data (scikit-learn's digits), on the CPU, with a fixed seed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ml.config import RunConfig
from ml.data import load_source
from ml.pipeline import STAGES, Canceled, prepare_run, run_stage
from ml.predictor import Predictor
from ml.saved_models import load_clustering

ROOT = Path(__file__).resolve().parents[2]

# Sized to what these tests assert (every stage runs, writes every artifact, resumes, serves the same
# answers), not to accuracy: a busy 2-core machine must finish it well inside the suite's hang guard.
# The accuracy recipe (60 pretext epochs, ACC >= 0.85) is checked by `python bench/digits.py`.
DIGITS = {
    "seed": 0,
    "pretext.epochs": 4,
    "clustering.epochs": 3,
    "clustering.batch_size": 128,
    "selflabel.epochs": 2,
    "selflabel.batch_size": 256,
}


@pytest.fixture(scope="module")
def digits():
    return load_source("digits")


@pytest.fixture(scope="module")
def digits_run(digits, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("digits-run")
    cfg = RunConfig.from_preset("small", 10, DIGITS)
    events = []
    prepare_run(run_dir, cfg)
    for stage in STAGES:
        run_stage(stage, run_dir, digits, progress=events.append)
    return run_dir, events


@pytest.mark.slow
def test_digits_all_stages_finish_with_metrics(digits_run):
    run_dir, _ = digits_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["final"] == "selflabel"
    for stage in ("scan", "selflabel"):
        assert 0 <= metrics[stage]["acc"] <= 1, metrics[stage]
    # Even 4 pretext epochs put mostly same-digit images side by side (chance is 0.1).
    assert metrics["mining"]["neighbor_purity"] > 0.3, metrics["mining"]


@pytest.mark.slow
def test_run_directory_holds_every_artifact(digits_run, digits):
    run_dir, events = digits_run
    for name in (
        "config.json",
        "pretext.pt",
        "scan.pt",
        "model.pt",
        "features.npy",
        "neighbors.npy",
        "index.faiss",
        "assignments.npz",
        "clusters.json",
        "metrics.json",
        "history.json",
    ):
        assert (run_dir / name).exists(), name
    n = digits.images.shape[0]
    neighbors = np.load(run_dir / "neighbors.npy")
    assert neighbors.shape == (n, 20)
    assert not (neighbors == np.arange(n)[:, None]).any(), "an image must not be its own neighbour"
    assignments = np.load(run_dir / "assignments.npz")
    clusters = json.loads((run_dir / "clusters.json").read_text())
    assert sum(c["size"] for c in clusters) == n
    assert np.allclose(assignments["probs"].sum(1), 1, atol=1e-4)
    history = json.loads((run_dir / "history.json").read_text())
    assert [h["epoch"] for h in history["pretext"]] == list(range(1, DIGITS["pretext.epochs"] + 1))
    assert all("confident" in h for h in history["selflabel"])
    # The kept self-label weights are those with the most confident samples, the SCAN model included.
    kept = history["selflabel_kept"]
    assert kept["confident"] >= max(h["confident"] for h in history["selflabel"])
    assert 0 <= kept["epoch"] <= len(history["selflabel"])
    # Clustering keeps the (epoch, head) with the lowest Eq. 2 loss over all images and neighbours.
    import torch

    scan_meta = torch.load(run_dir / "scan.pt", weights_only=False)["meta"]
    lowest = [min(h["head_losses"]) for h in history["clustering"]]
    assert scan_meta["kept_epoch"] == int(np.argmin(lowest)) + 1
    assert min(scan_meta["head_losses"]) == pytest.approx(min(lowest), rel=1e-5)
    # Progress reached the caller from every stage, with losses and throughput.
    assert {e.stage for e in events} == set(STAGES)
    assert any(e.loss is not None and e.images_per_s for e in events if e.stage == "pretext")


@pytest.mark.slow
def test_predictor_agrees_with_stored_assignments(digits_run, digits):
    run_dir, _ = digits_run
    predictor = Predictor.load(run_dir, device="cpu")
    probs = predictor.predict(np.asarray(digits.images[:200]))
    stored = np.load(run_dir / "assignments.npz")
    assert (probs.argmax(1) == stored["cluster"][:200]).mean() == 1.0
    feats = predictor.embed(np.asarray(digits.images[:50]))
    assert np.allclose(feats, np.load(run_dir / "features.npy")[:50], atol=1e-4)


@pytest.mark.slow
def test_rerunning_a_finished_stage_is_a_no_op(digits_run, digits):
    run_dir, _ = digits_run
    before = (run_dir / "model.pt").stat().st_mtime_ns
    summary = run_stage("selflabel", run_dir, digits)
    assert summary["resumed"] == "done"
    assert (run_dir / "model.pt").stat().st_mtime_ns == before


@pytest.mark.slow  # trains: in make test, not in make test-fast
def test_cancel_stops_at_the_next_step_and_keeps_the_last_checkpoint(digits, tmp_path):
    cfg = RunConfig.from_preset("small", 10, {"pretext.epochs": 3, "pretext.batch_size": 128})
    prepare_run(tmp_path, cfg)
    seen = []

    def should_cancel():
        return len(seen) >= 20  # a little into the second epoch (14 steps an epoch)

    with pytest.raises(Canceled):
        run_stage("pretext", tmp_path, digits, progress=seen.append, should_cancel=should_cancel)
    assert (tmp_path / "checkpoints" / "pretext.pt").exists()
    assert not (tmp_path / "pretext.pt").exists()
    # Rerun resumes from the checkpoint of epoch 1: the first report is from epoch 2.
    resumed = []
    run_stage("pretext", tmp_path, digits, progress=resumed.append)
    assert resumed[0].epoch == 2
    assert (tmp_path / "pretext.pt").exists()


@pytest.mark.slow  # trains: in make test, not in make test-fast
def test_killed_training_process_resumes_from_checkpoint(tmp_path):
    """SIGKILL the CLI mid-pretext, run the same command again: it continues from the last epoch."""
    run_dir = tmp_path / "run"
    epochs = 12
    cmd = [
        sys.executable,
        "-m",
        "ml.cli",
        "train",
        "digits",
        "--clusters",
        "10",
        "--out",
        str(run_dir),
        "--preset",
        "small",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--set",
        f"pretext.epochs={epochs}",
        "--set",
        "clustering.epochs=1",
        "--set",
        "selflabel.epochs=1",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    ckpt = run_dir / "checkpoints" / "pretext.pt"
    # No wall-clock limit on a busy machine's start-up: poll until the first checkpoint or an exit.
    while not ckpt.exists() and proc.poll() is None:
        time.sleep(0.05)
    assert ckpt.exists(), "no checkpoint appeared"
    # Killed as soon as the first epoch is saved, so even a fast machine is mid-run (12 epochs).
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    import torch

    epoch_at_kill = torch.load(ckpt, weights_only=False)["epoch"]
    assert epoch_at_kill < epochs - 1, "the run finished before it could be killed; make it longer"

    restarted_at = time.time()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)  # pytest's timeout guards
    assert done.returncode == 0, done.stderr[-2000:]
    history = json.loads((run_dir / "history.json").read_text())["pretext"]
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    # Epochs finished before the kill kept their original timestamps: they were not trained again.
    assert all(h["time"] < restarted_at for h in history[: epoch_at_kill + 1])
    assert all(h["time"] > restarted_at for h in history[epoch_at_kill + 1 :])
    assert (run_dir / "model.pt").exists()


@pytest.mark.slow  # trains: in make test, not in make test-fast
def test_moco_pretext_and_ema_selflabel_train_and_resume(digits, tmp_path):
    """The ImageNet-style options: MoCo v2 (queue + momentum encoder, checkpointed with its extra
    state) and self-labeling with EMA, each resumed."""
    cfg = RunConfig.from_preset(
        "small",
        10,
        {
            "pretext.method": "moco",
            "pretext.epochs": 2,
            "pretext.batch_size": 256,
            "pretext.moco_queue": 512,
            "pretext.temperature": 0.2,
            "clustering.epochs": 1,
            "selflabel.epochs": 2,
            "selflabel.ema": 0.99,
            "selflabel.threshold": 0.5,
        },
    )
    prepare_run(tmp_path, cfg)
    run_stage("pretext", tmp_path, digits)
    ck = __import__("torch").load(tmp_path / "checkpoints" / "pretext.pt", weights_only=False)
    assert ck["queue"].shape == (512, 128) and 0 <= ck["queue_ptr"] < 512
    assert "key_model" in ck
    for stage in ("mining", "clustering"):
        run_stage(stage, tmp_path, digits)
    # Stop self-labeling after its first epoch, then resume from its checkpoint.
    seen = []
    with pytest.raises(Canceled):
        run_stage(
            "selflabel", tmp_path, digits, progress=seen.append, should_cancel=lambda: any(p.epoch_end for p in seen)
        )
    assert (tmp_path / "checkpoints" / "selflabel.pt").exists()
    resumed = []
    run_stage("selflabel", tmp_path, digits, progress=resumed.append)
    assert resumed[0].epoch == 2
    history = json.loads((tmp_path / "history.json").read_text())["selflabel"]
    assert [h["epoch"] for h in history] == [1, 2]


@pytest.mark.slow  # trains every stage: in make test, not in make test-fast
def test_a_batch_size_leaving_one_image_over_trains_every_stage(digits, tmp_path):
    """1797 digits in batches of 449 leave one image over; a batch of one through BatchNorm in
    train mode raised 'Expected more than 1 value per channel'. Remainders are now dropped."""
    cfg = RunConfig.from_preset(
        "small",
        10,
        {
            "pretext.epochs": 1,
            "pretext.batch_size": 449,
            "clustering.epochs": 1,
            "clustering.batch_size": 449,
            "selflabel.epochs": 1,
            "selflabel.batch_size": 449,
            "selflabel.threshold": 0.5,
        },
    )
    seen = []
    prepare_run(tmp_path, cfg)
    for stage in STAGES:
        run_stage(stage, tmp_path, digits, progress=seen.append)
    assert (tmp_path / "model.pt").exists()
    # Four full batches an epoch in every stage, never a fifth holding the leftover image.
    for stage in ("pretext", "clustering", "selflabel"):
        steps = {p.steps for p in seen if p.stage == stage}
        assert steps == {4}, (stage, steps)


def test_full_batches_are_all_full_and_disjoint():
    import torch

    from ml.stages.loop import full_batches

    g = torch.Generator().manual_seed(0)
    parts = full_batches(1797, 449, g)
    assert [p.numel() for p in parts] == [449] * 4
    assert torch.cat(parts).unique().numel() == 4 * 449
    assert [p.numel() for p in full_batches(10, 64, g)] == [10]  # fewer images than a batch: one batch


def test_ema_moves_the_weights_a_fraction_of_each_step():
    """EMA as the paper and reference mean it: the model's own weights become
    decay * old + (1 - decay) * stepped, so the averaged model makes the next pseudo-labels."""
    import torch

    from ml.stages.selflabel import _ema_update

    model = torch.nn.Linear(2, 1)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # a stand-in optimiser step of +1 on every weight
    _ema_update(model, before, 0.9)
    for p, old in zip(model.parameters(), before):
        assert torch.allclose(p, old + 0.1)


def test_missing_input_names_the_earliest_stage_that_writes_it(tmp_path):
    from ml.pipeline import missing_input

    assert missing_input(tmp_path, "pretext") is None
    assert missing_input(tmp_path, "clustering") == ("pretext.pt", "pretext")
    for name in ("pretext.pt", "features.npy"):
        (tmp_path / name).write_bytes(b"x")
    assert missing_input(tmp_path, "clustering") == ("neighbors.npy", "mining")
    assert missing_input(tmp_path, "mining") is None
    assert missing_input(tmp_path, "finalize") == ("assignments.npz", "selflabel")


@pytest.mark.slow  # trains: in make test, not in make test-fast
def test_selflabel_simclr_term_is_added_with_its_weight(digits, tmp_path):
    """`selflabel.contrastive_weight`: the first step's loss is the paper's self-label loss plus
    the weight times one SimCLR loss (the same views whatever the weight: they are drawn after the
    weak and strong ones), and the model it writes is the plain clustering model."""
    base = {**DIGITS, "pretext.epochs": 1, "clustering.epochs": 1, "selflabel.epochs": 1}
    prepare_run(tmp_path / "base", RunConfig.from_preset("small", 10, base))
    for stage in ("pretext", "mining", "clustering"):
        run_stage(stage, tmp_path / "base", digits)
    first = {}
    for weight in (0.0, 1.0, 2.0):
        run_dir = tmp_path / f"w{weight}"
        shutil.copytree(tmp_path / "base", run_dir)
        cfg = RunConfig.from_preset(
            "small", 10, {**base, "selflabel.contrastive_weight": weight, "selflabel.contrastive_images": 64}
        )
        seen = []
        run_stage("selflabel", run_dir, digits, progress=seen.append, cfg=cfg)
        first[weight] = next(p.loss for p in seen if p.loss is not None and not p.epoch_end)
        model, _ = load_clustering(run_dir / "model.pt")
        assert all(k.startswith(("backbone.", "heads.")) for k in model.state_dict())
    simclr = first[1.0] - first[0.0]
    assert simclr > 1.0  # an NT-Xent loss over 128 views, not a rounding difference
    assert first[2.0] - first[0.0] == pytest.approx(2 * simclr, abs=1e-4)
