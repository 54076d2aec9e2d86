"""clusters.json through its one typed model: what the final stage writes is what every reader gets."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from ml.clusters import ClusterSummary, matched_labels, read_clusters, write_clusters


def _summary(c: int, label: str | None = None, size: int = 3) -> ClusterSummary:
    return ClusterSummary(
        cluster=c,
        size=size,
        mean_confidence=0.9,
        prototype=c * 10 if size else None,
        top_items=[c * 10, c * 10 + 1][:size],
        matched_label=label,
        matched_class=None if label is None else c,
    )


def test_round_trip_keeps_every_field(tmp_path):
    path = tmp_path / "clusters.json"
    written = [_summary(0, "zero"), _summary(1, None, size=0), _summary(2, "two")]
    write_clusters(path, written)
    assert read_clusters(path) == written
    # The file stays the plain JSON list that earlier runs wrote.
    raw = json.loads(path.read_text())
    assert isinstance(raw, list) and raw[1] == {
        "cluster": 1,
        "size": 0,
        "mean_confidence": 0.9,
        "prototype": None,
        "top_items": [],
        "matched_label": None,
        "matched_class": None,
    }


def test_a_missing_file_reads_as_no_clusters(tmp_path):
    assert read_clusters(tmp_path / "clusters.json") == []


def test_writer_refuses_clusters_out_of_index_order(tmp_path):
    with pytest.raises(ValueError, match="index order"):
        write_clusters(tmp_path / "clusters.json", [_summary(1), _summary(0)])


def test_reader_refuses_a_shape_the_writer_never_produces(tmp_path):
    path = tmp_path / "clusters.json"
    path.write_text(json.dumps({"clusters": [{"id": 0, "top": [1]}]}))
    with pytest.raises(ValidationError):
        read_clusters(path)


def test_matched_labels_by_cluster_index_or_none_without_labels():
    assert matched_labels([_summary(0, "a"), _summary(1), _summary(2, "c")], 3) == ["a", None, "c"]
    assert matched_labels([_summary(0), _summary(1)], 2) is None
    assert matched_labels([], 4) is None
