"""ml/estimate.py: the cost model's counts match the models, budgets are met, memory limits name
the field. (How close the seconds come to a real run is bench/recipe_cost.py's job, not a test's.)"""

from __future__ import annotations

import pytest
import torch

from ml import estimate as est
from ml.calibrate import count_arch, train_throughput
from ml.config import RunConfig
from ml.networks import ARCHS

DEVICE = est.Device("cpu", "test cpu", 16 << 30, {"convnet": 500.0, "resnet18_cifar": 50.0})


@pytest.mark.parametrize("arch", ARCHS)
def test_arch_table_is_what_the_models_count(arch):
    assert est.ARCH_COUNTS[arch] == count_arch(arch)


def test_activations_scale_with_pixels_and_width():
    # The estimate scales the 32 px count; check the rule against a real count at another size.
    acts, params = count_arch("convnet", size=64, width=16)
    want_acts, want_params = est._counts("convnet", 64, 16)
    assert abs(want_acts - acts) / acts < 0.05 and abs(want_params - params) / params < 0.05
    acts, _ = count_arch("resnet18", size=224)
    assert abs(est._counts("resnet18", 224, 32)[0] - acts) / acts < 0.05


def test_calibration_measures_a_positive_throughput():
    assert train_throughput("convnet", torch.device("cpu"), steps=1, batch=8) > 0


def test_estimate_grows_with_epochs_and_images_and_warns_past_an_hour():
    cfg = RunConfig.from_preset("small", 10)
    base = est.estimate(cfg, 10_000, 28, DEVICE)
    assert set(base["stages_s"]) == {"pretext", "mining", "clustering", "selflabel"}
    assert base["total_s"] == pytest.approx(sum(base["stages_s"].values()), abs=0.5)
    more = est.estimate(RunConfig.from_preset("small", 10, {"pretext.epochs": 120}), 10_000, 28, DEVICE)
    assert more["stages_s"]["pretext"] > 1.9 * base["stages_s"]["pretext"]
    assert est.estimate(cfg, 20_000, 28, DEVICE)["total_s"] > 1.9 * base["total_s"]
    assert base["warning"] is None or base["total_s"] > est.LONG_RUN_S
    long = est.estimate(RunConfig.from_preset("cifar", 10), 50_000, 32, DEVICE)
    assert long["total_s"] > est.LONG_RUN_S and "hours" in long["warning"] and "budget_minutes" in long["warning"]


def test_seeds_multiply_clustering_and_selflabel_only():
    one = est.estimate(RunConfig.from_preset("small", 10), 10_000, 28, DEVICE)["stages_s"]
    three = est.estimate(RunConfig.from_preset("small", 10, {"seeds": 3}), 10_000, 28, DEVICE)["stages_s"]
    for stage in ("pretext", "mining"):
        assert three[stage] == one[stage]
    for stage in ("clustering", "selflabel"):
        assert three[stage] == pytest.approx(3 * one[stage], abs=0.2)


def test_the_selflabel_simclr_term_adds_its_views_to_time_and_memory():
    plain = RunConfig.from_preset("small", 10, {"selflabel.batch_size": 500})
    simclr = RunConfig.from_preset(
        "small",
        10,
        {"selflabel.batch_size": 500, "selflabel.contrastive_weight": 1.0, "selflabel.contrastive_images": 250},
    )
    one, two = est.stage_work(plain, 10_000), est.stage_work(simclr, 10_000)
    # two views of half of each batch: one more training pass per image and epoch
    assert two["selflabel"] - one["selflabel"] == pytest.approx(plain.selflabel.epochs * 10_000)
    assert {k: v for k, v in two.items() if k != "selflabel"} == {k: v for k, v in one.items() if k != "selflabel"}
    need = {n["field"]: n for n in est.memory_needs(simclr, 10_000, 28, 1, "cpu")}["selflabel.batch_size"]
    assert need["views"] == 2.0


def test_devices_divide_the_data_parallel_stages_on_gpus_only():
    gpu = est.Device(kind="cuda", name="gpu", memory_bytes=80 << 30, train_images_per_s={"resnet18_cifar": 5000.0})
    cfg = RunConfig.from_preset("cifar", 10, {"pretext.batch_size": 512, "selflabel.batch_size": 1000})
    one = est.estimate(cfg, 50_000, 32, gpu)["stages_s"]
    four = est.estimate(cfg.model_copy(update={"devices": 4}), 50_000, 32, gpu)["stages_s"]
    for stage in ("pretext", "selflabel"):
        assert four[stage] == pytest.approx(one[stage] / 4, abs=0.2)
    for stage in ("mining", "clustering"):  # one device
        assert four[stage] == one[stage]
    cpu = est.estimate(cfg.model_copy(update={"devices": 4}), 50_000, 32, DEVICE)["stages_s"]
    assert cpu == est.estimate(cfg, 50_000, 32, DEVICE)["stages_s"]  # the processes share the cores


def test_a_budget_is_met_by_cutting_epochs_first_then_size():
    cfg = RunConfig.from_preset("cifar", 10)
    full = est.estimate(cfg, 10_000, 32, DEVICE)["total_s"]
    fitted, changes = est.fit_budget(cfg, 10_000, 32, DEVICE, full / 2)
    assert est.estimate(fitted, 10_000, 32, DEVICE)["total_s"] <= full / 2
    assert fitted.image_size in (None, 32) and fitted.pretext.epochs < cfg.pretext.epochs
    assert any(c.startswith("pretext.epochs") for c in changes)
    # Far below a quarter of the epochs: the image gets smaller rather than the epochs vanishing.
    tight, changes = est.fit_budget(cfg, 10_000, 32, DEVICE, full / 20)
    assert est.estimate(tight, 10_000, 32, DEVICE)["total_s"] <= full / 20
    assert tight.image_size == 16 and "image_size 32 -> 16" in changes
    # A recipe that already fits is left alone (a budget never adds epochs).
    same, changes = est.fit_budget(cfg, 10_000, 32, DEVICE, full * 2)
    assert same == cfg and changes == []
    with pytest.raises(ValueError, match="budget_minutes"):
        est.fit_budget(cfg, 10_000_000, 32, DEVICE, 60)


def test_memory_beyond_the_device_names_the_field_and_the_limit():
    ok = RunConfig.from_preset("small", 10)
    assert est.check_memory(ok, 10_000, 28, 1, DEVICE) is None
    big = RunConfig.from_preset("cifar", 10, {"arch": "resnet50", "image_size": 512, "pretext.batch_size": 512})
    msg = est.check_memory(big, 10_000, 32, 3, DEVICE)
    assert msg is not None and msg.startswith("pretext.batch_size: 512") and "16.0 GiB" in msg
    # The batch it proposes does fit.
    fits = int(msg.split("at most ")[1].split(" ")[0]) if "at most" in msg else 0
    if fits >= 2:
        smaller = big.model_copy(update={"pretext": big.pretext.model_copy(update={"batch_size": fits})})
        assert not any(n["bytes"] > DEVICE.memory_bytes for n in est.memory_needs(smaller, 10_000, 32, 3, "cpu")[:1])


def test_choosing_k_adds_the_sweep_once_whatever_the_seeds():
    fixed = est.estimate(RunConfig.from_preset("small", 10), 10_000, 28, DEVICE)["stages_s"]
    auto = est.estimate(RunConfig.from_preset("small", "auto"), 10_000, 28, DEVICE)["stages_s"]
    wide = est.estimate(RunConfig.from_preset("small", {"min": 2, "max": 200}), 10_000, 28, DEVICE)["stages_s"]
    assert auto["clustering"] > fixed["clustering"] and wide["clustering"] > auto["clustering"]
    assert {s: auto[s] for s in ("pretext", "mining", "selflabel")} == {
        s: fixed[s] for s in ("pretext", "mining", "selflabel")
    }
    sweep = auto["clustering"] - fixed["clustering"]
    seeds = est.estimate(RunConfig.from_preset("small", "auto", {"seeds": 3}), 10_000, 28, DEVICE)["stages_s"]
    assert seeds["clustering"] == pytest.approx(3 * fixed["clustering"] + sweep, abs=0.3)
    # Once K is chosen (a resumed run), there is nothing left to sweep.
    chosen = RunConfig.from_preset("small", "auto").with_chosen_k(10)
    assert est.estimate(chosen, 10_000, 28, DEVICE)["stages_s"]["clustering"] == pytest.approx(fixed["clustering"])
