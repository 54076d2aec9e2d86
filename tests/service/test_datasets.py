"""Datasets over HTTP: import, upload, read, items, delete; bad uploads leave nothing behind."""

from __future__ import annotations

import io
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select

from tests.service.conftest import MAX_UPLOAD, db_session, digits_npz


def _png(value: int = 128) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _targz_with_symlink() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("cats/a.png")
        data = _png()
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("cats/evil.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    return buf.getvalue()


def test_import_digits_describes_the_dataset(client, digits_dataset):
    d = client.get(f"/v1/datasets/{digits_dataset}").json()
    assert (d["state"], d["count"], d["height"], d["width"], d["channels"]) == ("READY", 1797, 8, 8, 1)
    assert d["labelled"] is True and d["class_names"] == [str(i) for i in range(10)]


def test_item_png_is_the_stored_image(client, stack, digits_dataset):
    r = client.get(f"/v1/datasets/{digits_dataset}/items/5.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    image = np.asarray(Image.open(io.BytesIO(r.content)))
    stored = np.load(stack.settings.datasets_dir / digits_dataset / "images.npy")[5, 0]
    assert np.array_equal(image, stored)
    for bad in (1797, 100000):
        r = client.get(f"/v1/datasets/{digits_dataset}/items/{bad}.png")
        assert r.status_code == 404 and "out of range" in r.json()["detail"]
    assert client.get(f"/v1/datasets/{digits_dataset}/items/-1.png").status_code == 422  # not an index


def test_upload_npz_then_delete(client, stack):
    r = client.post("/v1/datasets", files={"file": ("d.npz", digits_npz(50))})
    assert r.status_code == 201, r.text
    d = r.json()
    assert (d["count"], d["channels"], d["labelled"], d["name"]) == (50, 1, True, "d.npz")
    folder = stack.settings.datasets_dir / d["id"]
    assert (folder / "images.npy").exists()
    assert not (stack.settings.uploads_dir / d["id"]).exists()  # the raw upload is gone once ingested
    assert client.delete(f"/v1/datasets/{d['id']}").status_code == 204
    assert client.get(f"/v1/datasets/{d['id']}").status_code == 404
    assert not folder.exists()


def test_upload_zip_of_class_folders(client):
    r = client.post(
        "/v1/datasets?wait=true",
        files={
            "file": ("shapes.zip", _zip({"dark/a.png": _png(10), "dark/b.png": _png(20), "light/c.png": _png(240)}))
        },
    )
    assert r.status_code == 201, r.text
    assert r.json()["count"] == 3 and r.json()["class_names"] == ["dark", "light"]
    client.delete(f"/v1/datasets/{r.json()['id']}")


BAD_UPLOADS = {
    "not an archive": ("notes.zip", b"this is plain text, not a zip archive" * 10, 422),
    "unknown format": ("notes.txt", b"hello", 422),
    "corrupt image": ("bad.zip", _zip({"cats/a.png": _png(), "cats/b.png": b"\x89PNG\r\n\x1a\n garbage"}), 422),
    "path traversal": ("evil.zip", _zip({"cats/a.png": _png(), "../../evil.png": _png()}), 422),
    "symlink entry": ("link.tar.gz", _targz_with_symlink(), 422),
    "over the size limit": ("big.npz", b"\0" * (MAX_UPLOAD + 1), 413),
    "empty": ("empty.zip", b"", 422),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_upload_gets_4xx_and_leaves_nothing(client, stack, case):
    filename, payload, status = BAD_UPLOADS[case]
    before = _dataset_rows()
    r = client.post("/v1/datasets", files={"file": (filename, payload)})
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and len(detail) > 10
    assert str(stack.settings.uploads_dir) not in detail  # names the user's file, not our temp path
    assert _dataset_rows() == before
    assert list(stack.settings.uploads_dir.iterdir()) == []
    ids = {p.name for p in stack.settings.datasets_dir.iterdir() if not p.name.startswith(".")}
    assert ids <= _dataset_ids()


def test_missing_file_field_is_422(client):
    r = client.post("/v1/datasets", files={"other": ("x.npz", b"abc")})
    assert r.status_code == 422 and "'file'" in r.json()["detail"]
    r = client.post("/v1/datasets", json={"file": "x"})
    assert r.status_code == 422 and "multipart/form-data" in r.json()["detail"]


def test_unknown_builtin_is_422(client):
    r = client.post("/v1/datasets/import", json={"source": "imagenet-21k"})
    assert r.status_code == 422 and "source" in r.json()["detail"]


def test_list_is_paginated(client, digits_dataset, small_dataset):
    everything = client.get("/v1/datasets").json()
    assert everything["total"] >= 2
    first = client.get("/v1/datasets", params={"limit": 1}).json()
    second = client.get("/v1/datasets", params={"limit": 1, "offset": 1}).json()
    assert len(first["items"]) == len(second["items"]) == 1
    assert first["items"][0]["id"] != second["items"][0]["id"]
    assert first["total"] == everything["total"]
    ready = client.get("/v1/datasets", params={"state": "READY"}).json()
    assert all(d["state"] == "READY" for d in ready["items"])


def _dataset_rows() -> int:
    from app.tables import Dataset

    with db_session() as session:
        return session.scalar(select(func.count()).select_from(Dataset))


def _dataset_ids() -> set[str]:
    from app.tables import Dataset

    with db_session() as session:
        return set(session.scalars(select(Dataset.id)))
