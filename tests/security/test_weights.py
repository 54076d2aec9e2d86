"""Backbone weights are a tenant's resource: over HTTP they name one of the tenant's own finished
runs ("run:<id>"), never a server path. Tenant B once trained on tenant A's backbone by giving its
file path, and probed the server's files through the run's error."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.stack import TINY, db_session, wait_for_run

FROZEN = {**TINY, "pretext.epochs": 0, "clustering.freeze_backbone": True}


def _submit(client: httpx.Client, dataset_id: str, weights: object) -> httpx.Response:
    return client.post(
        "/v1/runs",
        json={
            "dataset_id": dataset_id,
            "num_clusters": 10,
            "preset": "small",
            "overrides": {**FROZEN, "pretext.backbone_weights": weights},
        },
    )


def _run_count() -> int:
    from sqlalchemy import func, select

    from app.tables import Run

    with db_session() as session:
        return session.scalar(select(func.count()).select_from(Run))


@pytest.fixture(scope="module")
def b_dataset(client_b: httpx.Client) -> str:
    from tests.stack import digits_npz

    r = client_b.post("/v1/datasets", files={"file": ("b.npz", digits_npz(200))})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_paths_are_refused_and_reveal_nothing(client_b: httpx.Client, b_dataset: str, finished_run: dict) -> None:
    with db_session() as session:
        from app.tables import Run

        a_weights = str(Path(session.get(Run, finished_run["id"]).run_dir) / "pretext.pt")
    assert Path(a_weights).is_file()  # the file a thief would name really exists
    before = _run_count()
    answers = {}
    for probe in (
        a_weights,
        "/proc/self/environ",
        "/nonexistent/x.pt",
        "../../runs/x/pretext.pt",
        "file:///etc/passwd",
        "run:../" + finished_run["id"],
    ):
        r = _submit(client_b, b_dataset, probe)
        assert r.status_code == 422, (probe, r.text)
        answers[probe] = r.json()["detail"]
    for not_a_string in (12, ["run:" + finished_run["id"]]):
        assert _submit(client_b, b_dataset, not_a_string).status_code == 422
    # One answer for an existing file, a missing one and /proc: no file-system oracle.
    assert len(set(answers.values())) == 1, answers
    detail = next(iter(answers.values()))
    assert detail.startswith('pretext.backbone_weights: give "weights:<id>"')
    assert "pretext.pt" not in detail and "/" not in detail.replace("/v1/weights", "")
    assert _run_count() == before


def test_another_tenants_run_reads_as_missing(client_b: httpx.Client, b_dataset: str, finished_run: dict) -> None:
    before = _run_count()
    theirs = _submit(client_b, b_dataset, f"run:{finished_run['id']}")
    nobody = _submit(client_b, b_dataset, "run:" + "0" * 32)
    assert theirs.status_code == nobody.status_code == 422
    assert theirs.json()["detail"] == f"pretext.backbone_weights: run {finished_run['id']} not found among your runs"
    assert nobody.json()["detail"] == f"pretext.backbone_weights: run {'0' * 32} not found among your runs"
    assert _run_count() == before


def test_own_finished_run_seeds_a_new_run(client: httpx.Client, finished_run: dict) -> None:
    import torch

    r = _submit(client, finished_run["dataset_id"], f"run:{finished_run['id']}")
    assert r.status_code == 202, r.text
    run = r.json()
    assert run["config"]["pretext"]["backbone_weights"] == f"run:{finished_run['id']}"  # no server path shown
    run = wait_for_run(client, run["id"], timeout=600)
    assert run["state"] == "SUCCEEDED", run
    # The new run's backbone is the source run's, bit for bit (pretext was skipped, backbone frozen).
    from app.tables import Run

    with db_session() as session:
        src, new = (Path(session.get(Run, i).run_dir) for i in (finished_run["id"], run["id"]))
    a = torch.load(src / "pretext.pt", map_location="cpu", weights_only=False)["state_dict"]
    b = torch.load(new / "pretext.pt", map_location="cpu", weights_only=False)["state_dict"]
    backbone = [k for k in a if k.startswith("backbone.") and "normalize" not in k]
    assert backbone and all(torch.equal(a[k], b[k]) for k in backbone)
