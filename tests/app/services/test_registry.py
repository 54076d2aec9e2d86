"""The registry's pure parts: references, cluster maps (merges as a mapping) and named predictions."""

from __future__ import annotations

import numpy as np
import pytest

from app.core.errors import Invalid
from app.services.registry import check_text, cluster_map, parse_reference
from app.serving.model_versions import named_predictions
from app.tables import VersionCluster


def rows(**named) -> list[VersionCluster]:
    """Five clusters; 1 and 3 merged into 0 ("zero"), 4 named "four"."""
    out = [VersionCluster(index=i, name=None, description=None, merged_into=None) for i in range(5)]
    out[0].name, out[0].description = "zero", "round ones"
    out[1].merged_into = out[3].merged_into = 0
    out[3].name = "three (kept for an unmerge)"
    out[4].name = "four"
    return out


def test_references_name_alias_and_version():
    assert parse_reference("digits") == ("digits", None, None)
    assert parse_reference("digits@production") == ("digits", "production", None)
    assert parse_reference("digits/versions/12") == ("digits", None, 12)
    for bad in (
        "",
        "@prod",
        "digits@",
        "digits@a@b",
        "digits/versions/x",
        "digits/v/1",
        "digits/versions/0",
        "digits/versions/9999999999",
        "-x",
        "a b",
        "x" * 65,
    ):
        with pytest.raises(Invalid):
            parse_reference(bad)


def test_cluster_map_serves_merged_clusters_as_their_target():
    m = cluster_map(rows())
    assert m.target == (0, 0, 2, 0, 4)
    assert m.served == [0, 2, 4]
    assert m.names == ("zero", "zero", None, "zero", "four")
    assert m.descriptions[1] == "round ones"
    assert m.apply(np.array([3, 2, 1, 4, 0])).tolist() == [0, 2, 0, 4, 0]
    probs = np.array([[0.1, 0.2, 0.3, 0.15, 0.25], [0.0, 0.0, 0.0, 0.0, 1.0]], dtype=np.float32)
    grouped, served = m.merge_probs(probs)
    assert served == [0, 2, 4]
    np.testing.assert_allclose(grouped, [[0.45, 0.3, 0.25], [0.0, 0.0, 1.0]], rtol=1e-6)
    np.testing.assert_allclose(grouped.sum(axis=1), 1.0, rtol=1e-6)


def test_an_unmerged_map_leaves_probabilities_alone():
    plain = cluster_map([VersionCluster(index=i, name=None, description=None, merged_into=None) for i in range(3)])
    probs = np.array([[0.2, 0.5, 0.3]], dtype=np.float32)
    grouped, served = plain.merge_probs(probs)
    assert grouped is probs and served == [0, 1, 2] and not plain.merged


def test_named_predictions_sum_a_merged_group_and_carry_its_name():
    m = cluster_map(rows())
    probs = np.array([[0.1, 0.2, 0.3, 0.15, 0.25]], dtype=np.float32)
    [p] = named_predictions([("a.png", b"")], probs, 10, m)
    assert (p["file"], p["cluster"], p["name"]) == ("a.png", 0, "zero")
    assert p["confidence"] == pytest.approx(0.45)
    assert [(t["cluster"], t["name"]) for t in p["top_k"]] == [(0, "zero"), (2, None), (4, "four")]
    assert len(named_predictions([("a.png", b"")], probs, 2, m)[0]["top_k"]) == 2


def test_cluster_text_is_printable_and_bounded():
    assert check_text("  chat noir ", "name", 100) == "chat noir"
    assert check_text("   ", "name", 100) is None
    assert check_text("two\nlines", "description", 100, multiline=True) == "two\nlines"
    for bad in ("a\x00b", "bell\x07", "two\nlines", "x" * 101):
        with pytest.raises(Invalid):
            check_text(bad, "name", 100)
