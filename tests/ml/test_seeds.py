"""`seeds: N`, the paper's protocol: N clustering + self-label seeds on one pretext and one mining,
mean +- std of every metric, the lowest-SCAN-loss seed kept and served (ml/stages/seeds.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ml.config import RunConfig
from ml.data import load_source
from ml.losses import scan_loss_all_neighbors
from ml.pipeline import STAGES, Canceled, prepare_run, run_stage
from ml.predictor import Predictor
from ml.stages.seeds import seed_of

# Sized to the assertions (seeds differ, the summary is their mean +- std, the kept one is served,
# a kill between seeds redoes none), not to accuracy.
TINY = {
    "seed": 7,
    "seeds": 3,
    "pretext.epochs": 2,
    "clustering.epochs": 2,
    "clustering.batch_size": 256,
    "selflabel.epochs": 1,
    "selflabel.batch_size": 512,
}


@pytest.fixture(scope="module")
def digits():
    return load_source("digits")


@pytest.fixture(scope="module")
def seeds_run(digits, tmp_path_factory):
    """A three-seed run whose clustering stage is killed (canceled) once the first seed is done,
    then resumed, then carried to the end; the events of the resumed clustering stage."""
    run_dir = tmp_path_factory.mktemp("seeds-run")
    prepare_run(run_dir, RunConfig.from_preset("small", 10, TINY))
    for stage in STAGES[:2]:
        run_stage(stage, run_dir, digits)

    started_second = []

    def progress(p):
        if p.metrics.get("seed_index") == 1:
            started_second.append(p)

    with pytest.raises(Canceled):
        run_stage("clustering", run_dir, digits, progress=progress, should_cancel=lambda: bool(started_second))
    first_seed = (run_dir / "seeds/0/scan.pt").stat().st_mtime_ns
    resumed = []
    run_stage("clustering", run_dir, digits, progress=resumed.append)
    run_stage("selflabel", run_dir, digits)
    return run_dir, first_seed, resumed


def _probs(path):
    with np.load(path) as npz:
        return npz["probs"], npz["cluster"]


@pytest.mark.slow  # trains: in make test, not in make test-fast
def test_each_seed_is_its_own_reproducible_run(seeds_run):
    run_dir, _, _ = seeds_run
    summary = json.loads((run_dir / "metrics.json").read_text())["seeds"]
    assert [r["seed"] for r in summary["runs"]] == [7, seed_of(7, 1), seed_of(7, 2)]
    assert len({r["seed"] for r in summary["runs"]}) == 3
    assert seed_of(7, 2) == seed_of(7, 2) != seed_of(8, 2)
    # Different head initialisations and data orders: three different models and results.
    clusters = [_probs(run_dir / f"seeds/{i}/assignments.npz")[0] for i in range(3)]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not np.allclose(clusters[i], clusters[j]), (i, j)
    losses = [r["selflabel"]["scan_loss"] for r in summary["runs"]]
    assert len(set(losses)) == 3, losses


@pytest.mark.slow
def test_summary_is_the_mean_and_std_of_the_seeds(seeds_run):
    run_dir, _, _ = seeds_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    summary = metrics["seeds"]
    assert summary["n"] == 3 and len(summary["runs"]) == 3
    for step in ("scan", "selflabel"):
        for key in ("acc", "nmi", "ari", "scan_loss", "confident"):
            values = [r[step][key] for r in summary["runs"]]
            assert summary["mean"][step][key] == pytest.approx(np.mean(values), abs=1e-12)
            assert summary["std"][step][key] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
    # Each row is that seed's own metrics file.
    for r in summary["runs"]:
        own = json.loads((run_dir / f"seeds/{r['index']}/metrics.json").read_text())
        assert r["selflabel"]["acc"] == own["selflabel"]["acc"]


@pytest.mark.slow
def test_the_lowest_scan_loss_seed_is_kept_and_served(seeds_run, digits):
    run_dir, _, _ = seeds_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    summary = metrics["seeds"]
    mined = torch.from_numpy(np.load(run_dir / "neighbors.npy"))
    partners = torch.cat([torch.arange(mined.shape[0]).unsqueeze(1), mined], dim=1)
    losses = [
        float(scan_loss_all_neighbors(torch.from_numpy(_probs(run_dir / f"seeds/{i}/assignments.npz")[0]), partners)[0])
        for i in range(3)
    ]
    kept = summary["kept"]
    assert kept == int(np.argmin(losses))
    assert summary["runs"][kept]["selflabel"]["scan_loss"] == pytest.approx(losses[kept], rel=1e-5)
    # The run's own results are the kept seed's...
    assert metrics["selflabel"] == json.loads((run_dir / f"seeds/{kept}/metrics.json").read_text())["selflabel"]
    kept_probs, kept_cluster = _probs(run_dir / f"seeds/{kept}/assignments.npz")
    served_probs, served_cluster = _probs(run_dir / "assignments.npz")
    np.testing.assert_array_equal(served_cluster, kept_cluster)
    # ...and so is the saved model: its predictions are that seed's assignments.
    predicted = Predictor.load(run_dir).predict(np.asarray(digits.images))
    np.testing.assert_array_equal(predicted.argmax(1), kept_cluster)
    np.testing.assert_allclose(predicted, kept_probs, atol=1e-4)


@pytest.mark.slow
def test_a_stage_killed_between_seeds_redoes_none_of_the_finished_ones(seeds_run):
    run_dir, first_seed, resumed = seeds_run
    assert (run_dir / "seeds/0/scan.pt").stat().st_mtime_ns == first_seed
    trained = {p.metrics.get("seed_index") for p in resumed if p.epoch is not None}
    assert trained == {1, 2}
    # Progress runs across the seeds: seed 2's last epoch is the stage's last.
    epochs = TINY["clustering.epochs"]
    last = [p for p in resumed if p.epoch_end and p.epoch is not None][-1]
    assert (last.epoch, last.epochs) == (3 * epochs, 3 * epochs)


def test_the_cli_refuses_seeds_out_of_range(tmp_path):
    from typer.testing import CliRunner

    from ml.cli import app

    out = CliRunner().invoke(app, ["train", "digits", "-k", "10", "--out", str(tmp_path / "r"), "--seeds", "11"])
    assert out.exit_code == 2 and "seeds" in out.output
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_the_cli_prints_every_seed_and_the_mean_and_std(seeds_run):
    from typer.testing import CliRunner

    from ml.cli import app

    run_dir, _, _ = seeds_run
    out = CliRunner().invoke(app, ["evaluate", str(run_dir)], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    summary = json.loads((run_dir / "metrics.json").read_text())["seeds"]
    assert "3 seeds after self-labeling" in out.output and "mean +- std" in out.output
    assert f"{summary['mean']['selflabel']['acc']:.4g}" in out.output
    assert f"{summary['kept'] + 1}: {summary['runs'][summary['kept']]['seed']} (kept)" in out.output
