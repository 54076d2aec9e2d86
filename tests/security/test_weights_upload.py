"""POST /v1/weights: bring-your-own backbone weights are an upload the tenant owns, validated as a
plain state dict that fits the named arch, referenced by runs as "weights:<id>"; never a path, never
another tenant's, and a refused upload leaves nothing on disk or in the database."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import httpx
import pytest

from tests.stack import MAX_UPLOAD, TINY, db_session, wait_for_run

FROZEN = {**TINY, "pretext.epochs": 0, "clustering.freeze_backbone": True}


def _state(arch: str = "convnet", channels: int = 3, width: int = 32) -> dict:
    import torch

    from ml.networks import build_backbone

    torch.manual_seed(7)
    backbone = build_backbone(arch, channels, (0.5,), (0.5,), width)
    for p in backbone.parameters():  # recognisable values, not the default initialisation
        torch.nn.init.normal_(p)
    return backbone.state_dict()


def _saved(obj: object) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _upload(client: httpx.Client, body: bytes, name: str = "w.pt", **fields: str) -> httpx.Response:
    return client.post("/v1/weights", files={"file": (name, body)}, data={"arch": "convnet", **fields})


def _leftovers(stack) -> list[str]:
    from sqlalchemy import func, select

    from app.tables import Weights

    var = stack.settings.artifacts
    found = [str(p) for p in (var / "uploads").glob("*")] if (var / "uploads").exists() else []
    with db_session() as session:
        ids = set(session.scalars(select(Weights.id)))
        found += [f"{n} rows" for n in [session.scalar(select(func.count()).select_from(Weights))] if n != len(ids)]
    stored = {p.name for p in (var / "weights").glob("*")} if (var / "weights").exists() else set()
    found += [f"weights/{i} without a row" for i in stored - ids]
    return found


@pytest.fixture(scope="module")
def uploaded(client: httpx.Client) -> dict:
    r = _upload(client, _saved({"state_dict": {"module." + k: v for k, v in _state().items()}, "epoch": 3}))
    assert r.status_code == 201, r.text
    return r.json()


def test_an_upload_is_validated_stored_and_listed(client: httpx.Client, uploaded: dict, stack) -> None:
    import torch

    assert uploaded["arch"] == "convnet" and uploaded["width"] == 32 and uploaded["name"] == "w.pt"
    assert uploaded["reference"] == f"weights:{uploaded['id']}"
    assert client.get(f"/v1/weights/{uploaded['id']}").json() == uploaded
    assert uploaded["id"] in [w["id"] for w in client.get("/v1/weights").json()["items"]]
    # Stored: the backbone's tensors only (no wrapper, no "epoch"), with the uploaded values.
    stored = torch.load(stack.settings.weights_dir / uploaded["id"] / "backbone.pt", weights_only=True)
    expected = {k: v for k, v in _state().items() if not k.startswith("normalize.")}
    assert stored.keys() == expected.keys() and uploaded["tensors"] == len(expected)
    assert all(torch.equal(stored[k], expected[k]) for k in expected)
    assert _leftovers(stack) == []


@pytest.mark.parametrize(
    ("case", "status", "message"),
    [
        ("code in the pickle", 422, "not a plain state dict"),
        ("not torch at all", 422, "not a plain state dict"),
        ("an int among the tensors", 422, "a state dict holds tensors only; found epoch (int)"),
        ("a list, not a dict", 422, "expected a state dict"),
        ("resnet18 weights for convnet", 422, "no parameter matches a convnet backbone"),
        ("width 16 for width 32", 422, "shapes differ from a convnet backbone"),
        ("a missing tensor", 422, "missing 1 backbone tensors"),
        ("unknown arch", 422, "arch: 'vit' is not one of"),
        ("no arch", 422, "arch: give the backbone"),
        ("width out of bounds", 422, "width: an integer from 4 to 512"),
        ("width not ascii digits", 422, "width: an integer from 4 to 512"),
        ("a NUL in the name", 422, "the weights' name contains control characters"),
        ("too large", 413, "SCAN_MAX_WEIGHTS_BYTES"),
    ],
)
def test_hostile_uploads_are_refused_and_leave_nothing(client, stack, case: str, status: int, message: str) -> None:
    import torch

    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch /tmp/scan-pwned",))

    state = _state()
    fields: dict[str, str] = {}
    body = {
        "code in the pickle": lambda: pickle.dumps(Exploit()),
        "not torch at all": lambda: b"GIF89a" + bytes(100),
        "an int among the tensors": lambda: _saved({**state, "epoch": 3}),
        "a list, not a dict": lambda: _saved(list(state.values())),
        "resnet18 weights for convnet": lambda: _saved(dict(list(_state("resnet18_cifar").items())[:6])),
        "width 16 for width 32": lambda: _saved(_state(width=16)),
        "a missing tensor": lambda: _saved(dict(list(state.items())[:-2] + [list(state.items())[-1]])),
        "too large": lambda: _saved({"w": torch.zeros(MAX_UPLOAD // 4 + 1)}),
    }.get(case, lambda: _saved(state))()
    if case == "unknown arch":
        fields["arch"] = "vit"
    elif case == "no arch":
        fields["arch"] = ""
    elif case == "width out of bounds":
        fields["width"] = "100000000000000000000"
    elif case == "width not ascii digits":
        fields["width"] = "3²"  # str.isdigit() is true for it, int() is not
    if case == "a NUL in the name":  # built by hand: an HTTP client would escape it
        r = client.post(
            "/v1/weights",
            content=b'--b\r\nContent-Disposition: form-data; name="arch"\r\n\r\nconvnet\r\n'
            b'--b\r\nContent-Disposition: form-data; name="name"\r\n\r\nw\x00\r\n'
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="w.pt"\r\n\r\n' + body + b"\r\n--b--\r\n",
            headers={"Content-Type": "multipart/form-data; boundary=b"},
        )
    else:
        r = _upload(client, body, **fields)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"], r.text
    assert "/" not in r.json()["detail"].split("(")[0]  # names the upload, never a server path
    assert not Path("/tmp/scan-pwned").exists()
    assert _leftovers(stack) == []


def test_another_tenants_weights_read_as_missing(client_b: httpx.Client, uploaded: dict, stack) -> None:
    wid = uploaded["id"]
    assert client_b.get(f"/v1/weights/{wid}").status_code == 404
    assert client_b.delete(f"/v1/weights/{wid}").status_code == 404
    assert wid not in [w["id"] for w in client_b.get("/v1/weights").json()["items"]]
    r = client_b.post("/v1/datasets", files={"file": ("b.npz", _digits(200))})
    assert r.status_code == 201, r.text
    theirs, nobody = (
        client_b.post(
            "/v1/runs",
            json={
                "dataset_id": r.json()["id"],
                "num_clusters": 10,
                "overrides": {**FROZEN, "pretext.backbone_weights": f"weights:{i}"},
            },
        )
        for i in (wid, "0" * 32)
    )
    assert theirs.status_code == nobody.status_code == 422
    assert theirs.json()["detail"] == (
        f"pretext.backbone_weights: weights {wid} not found among your weights (GET /v1/weights)"
    )
    assert nobody.json()["detail"] == theirs.json()["detail"].replace(wid, "0" * 32)
    assert (stack.settings.weights_dir / wid / "backbone.pt").is_file()  # untouched by B


def _digits(n: int) -> bytes:
    from tests.stack import digits_npz

    return digits_npz(n)


def test_weights_for_another_arch_are_refused_at_submit(client: httpx.Client, uploaded: dict, small_dataset) -> None:
    r = client.post(
        "/v1/runs",
        json={
            "dataset_id": small_dataset,
            "num_clusters": 10,
            "overrides": {**FROZEN, "width": 16, "pretext.backbone_weights": uploaded["reference"]},
        },
    )
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == (
        f"pretext.backbone_weights: weights {uploaded['id']} are for convnet (width 32), "
        "but this run's arch is convnet (width 16)"
    )


@pytest.mark.slow
def test_uploaded_weights_seed_a_run_then_delete_removes_them(
    client: httpx.Client, small_dataset: str, gpu_worker, stack
) -> None:
    import torch

    r = _upload(client, _saved(_state()), name="mine.pt")
    assert r.status_code == 201, r.text
    weights = r.json()
    run = client.post(
        "/v1/runs",
        json={
            "dataset_id": small_dataset,
            "num_clusters": 10,
            "overrides": {**FROZEN, "pretext.backbone_weights": weights["reference"]},
        },
    )
    assert run.status_code == 202, run.text
    assert run.json()["config"]["pretext"]["backbone_weights"] == weights["reference"]  # no server path
    # While the run has not finished, its weights cannot be deleted from under it.
    deleting = client.delete(f"/v1/weights/{weights['id']}")
    run = wait_for_run(client, run.json()["id"], timeout=600)
    assert run["state"] == "SUCCEEDED", run
    if deleting.status_code != 204:
        assert deleting.status_code == 409 and "in progress" in deleting.json()["detail"]
        assert client.delete(f"/v1/weights/{weights['id']}").status_code == 204
    from app.tables import Run

    with db_session() as session:
        run_dir = Path(session.get(Run, run["id"]).run_dir)
    trained = torch.load(run_dir / "pretext.pt", map_location="cpu", weights_only=False)["state_dict"]
    # The dataset is gray: conv1 was folded to one channel; every other tensor is the upload's.
    for key, value in _state().items():
        if key.startswith("normalize.") or key.endswith("num_batches_tracked"):
            continue
        mine = value.sum(dim=1, keepdim=True) if value.ndim == 4 and trained["backbone." + key].shape[1] == 1 else value
        if not key.endswith(("running_mean", "running_var")):
            assert torch.allclose(trained["backbone." + key], mine), key
    assert client.get(f"/v1/weights/{weights['id']}").status_code == 404
    assert not (stack.settings.weights_dir / weights["id"]).exists()
