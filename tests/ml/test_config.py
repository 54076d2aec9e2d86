"""ml/config.py on its own: presets, overrides (dotted and nested), and the checks across fields."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ml.config import DEFAULT_PRESET, PRESETS, RunConfig, expand_dotted


def test_the_default_preset_is_one_of_the_presets():
    assert DEFAULT_PRESET in PRESETS
    assert RunConfig.from_preset(DEFAULT_PRESET, 10).preset == DEFAULT_PRESET


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_validates_and_records_its_name(preset):
    cfg = RunConfig.from_preset(preset, 10)
    assert cfg.preset == preset and cfg.num_clusters == 10


def test_dotted_and_nested_overrides_merge_into_the_preset():
    cfg = RunConfig.from_preset("small", 5, {"pretext.epochs": 3, "clustering": {"optim": {"lr": 0.01}}})
    assert cfg.pretext.epochs == 3
    assert cfg.clustering.optim.lr == 0.01
    # Untouched fields keep the preset's values, also inside a partly overridden section.
    assert cfg.clustering.optim.name == PRESETS["small"]["clustering"]["optim"]["name"]
    assert cfg.pretext.batch_size == PRESETS["small"]["pretext"]["batch_size"]


def test_expand_dotted():
    assert expand_dotted({"a.b.c": 1, "a.d": 2, "e": {"f.g": 3}}) == {
        "a": {"b": {"c": 1}, "d": 2},
        "e": {"f": {"g": 3}},
    }


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="unknown preset 'huge'.*cifar"):
        RunConfig.from_preset("huge", 10)


def test_a_typo_in_an_override_is_an_error_naming_the_field():
    with pytest.raises(ValidationError, match="epochz"):
        RunConfig.from_preset("small", 10, {"pretext.epochz": 3})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"pretext.epochs": 0}, "backbone_weights"),
        ({"clustering.augment": False, "clustering.freeze_backbone": False}, "freeze_backbone"),
        ({"pretext.crop_scale": [0.9, 0.5]}, "crop_scale"),
        ({"num_clusters": 1}, "num_clusters"),
        ({"seeds": 0}, "seeds"),
        ({"seeds": 11}, "seeds"),
        ({"seeds": 2.5}, "seeds"),
    ],
)
def test_combinations_that_cannot_train_are_refused(overrides, message):
    with pytest.raises(ValidationError, match=message):
        RunConfig.from_preset("small", 10, overrides)


def test_a_stored_config_reads_back_identical():
    cfg = RunConfig.from_preset("cifar", 20, {"seed": 3})
    assert RunConfig.model_validate_json(cfg.model_dump_json()) == cfg


@pytest.mark.parametrize(
    ("overrides", "derived"),
    [
        ({}, {}),
        (
            {"pretext.epochs": 3, "clustering": {"optim": {"lr": 0.01}}},
            {"pretext.epochs": 3, "clustering.optim.lr": 0.01},
        ),
        (
            {"seed": 7, "pretext.invariances": {"invert": 0.5}, "pretext.crop_scale": [0.3, 1.0]},
            {"seed": 7, "pretext.invariances": {"invert": 0.5}, "pretext.crop_scale": [0.3, 1.0]},
        ),
    ],
)
def test_overrides_are_derived_back_from_the_config(overrides, derived):
    # A run stores only its config; what it changed from its preset is read back from it.
    cfg = RunConfig.from_preset("small", 7, overrides)
    assert cfg.overrides() == derived
    assert RunConfig.from_preset("small", 7, cfg.overrides()) == cfg


def test_overrides_name_only_what_differs_from_the_preset():
    same = PRESETS["small"]["pretext"]["epochs"]
    assert RunConfig.from_preset("small", 4, {"pretext.epochs": same}).overrides() == {}
    assert RunConfig.from_preset("small", 4, {"pretext.epochs": same + 1}).overrides() == {"pretext.epochs": same + 1}


def test_seeds_default_to_one_and_accept_the_papers_ten():
    assert RunConfig.from_preset("small", 10).seeds == 1
    cfg = RunConfig.from_preset("small", 10, {"seeds": 10})
    assert cfg.seeds == 10 and cfg.overrides() == {"seeds": 10}


@pytest.mark.parametrize("preset", ["cifar", "stl", "imagenet"])
def test_the_papers_presets_self_label_by_the_papers_rule(preset):
    # Only `small` departs from it (docs/selflabel.md, section 7): the paper's presets take the
    # pseudo-label from the weak view in train mode, by the threshold alone, at the paper's rates.
    sl = RunConfig.from_preset(preset, 10).selflabel
    assert (sl.weak_view, sl.teacher_mode, sl.cluster_quota, sl.augmentation) == ("shift", "train", 0.0, "strong")
    assert sl.contrastive_weight == 0  # the paper's loss alone
    assert sl.threshold == 0.99
    assert sl.optim.lr == {"cifar": 1e-4, "stl": 1e-4, "imagenet": 0.03}[preset]


def test_the_small_preset_self_labels_with_a_cluster_quota_at_a_small_sets_rate():
    sl = RunConfig.from_preset("small", 10).selflabel
    assert (sl.weak_view, sl.teacher_mode, sl.cluster_quota) == ("none", "eval", 0.5)
    # A small set gives a few hundred steps, not the paper's ~10,000: Adam 1e-3, and patience
    # for the noisy rise of the confident count.
    assert sl.optim.lr == 1e-3 and sl.patience == 20


def test_the_selflabel_simclr_term_is_refused_where_it_cannot_work():
    with pytest.raises(ValueError, match="freeze_backbone=true"):
        RunConfig.from_preset("small", 10, {"selflabel.contrastive_weight": 1.0, "selflabel.freeze_backbone": True})
    with pytest.raises(ValueError, match="contrastive_images 255 does not split evenly over devices=2"):
        RunConfig.from_preset(
            "small",
            10,
            {"selflabel.contrastive_weight": 1.0, "selflabel.contrastive_images": 255, "devices": 2},
        )
    # the batch caps the views: 511 asked of a 256-image batch are 256, which two devices split
    cfg = {"selflabel.contrastive_weight": 1.0, "selflabel.contrastive_images": 511, "selflabel.batch_size": 256}
    assert RunConfig.from_preset("small", 10, {**cfg, "devices": 2}).selflabel.contrastive_images == 511
