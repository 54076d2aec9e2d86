"""Tiny uploads must not allocate gigabytes, and a dataset's files never outlive its row. Each hostile
file is built at test time; each case asserts the 4xx, its message, and that nothing is left under
the var dir or in the database."""

from __future__ import annotations

import gzip
import io
import zipfile

import httpx
import numpy as np

from tests.stack import MAX_DATASET, db_session


def _npz(compressed: bool = False, **arrays) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def _leftovers(stack, dataset_id: str | None = None) -> list[str]:
    from sqlalchemy import select

    from app.tables import Dataset

    var = stack.settings.artifacts
    found = [str(p) for d in ("uploads", "cache") if (var / d).exists() for p in (var / d).iterdir()]
    if dataset_id:
        found += [str(p) for p in [var / "datasets" / dataset_id] if p.exists()]
        with db_session() as session:
            found += [f"row {i}" for i in session.scalars(select(Dataset.id).where(Dataset.id == dataset_id))]
    return [f for f in found if "digits" not in f and "fashion" not in f]


def _upload(client: httpx.Client, name: str, data: bytes) -> httpx.Response:
    return client.post("/v1/datasets", files={"file": (name, data)})


def test_sparse_labels_become_dense_classes_not_ten_million(client: httpx.Client, stack) -> None:
    images = np.zeros((4, 8, 8), np.uint8)
    r = _upload(client, "sparse.npz", _npz(images=images, labels=np.array([0, 1, 2, 10_000_000])))
    assert r.status_code == 201, r.text
    assert r.json()["class_names"] == ["0", "1", "2", "10000000"]
    assert len(r.content) < 2000
    assert client.delete(f"/v1/datasets/{r.json()['id']}").status_code == 204


def test_too_many_classes_are_refused(client: httpx.Client, stack) -> None:
    n = 10_001
    r = _upload(client, "classes.npz", _npz(images=np.zeros((n, 8, 8), np.uint8), labels=np.arange(n) * 1000 + 10_000))
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == "classes.npz: 10,001 classes; at most 10,000 are accepted"
    assert _leftovers(stack) == []


def test_a_compressed_npz_declaring_more_than_the_limit_is_refused_from_its_header(client, stack) -> None:
    side = 1024
    n = MAX_DATASET // (side * side) + 1  # one image over the limit, all zeros: compresses to ~100 KB
    bomb = _npz(compressed=True, images=np.zeros((n, side, side), np.uint8))
    assert len(bomb) < 1_000_000
    r = _upload(client, "bomb.npz", bomb)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail.startswith(f"bomb.npz: decodes to {n * side * side:,} bytes") and "SCAN_MAX_DATASET_BYTES" in detail
    assert _leftovers(stack) == []


def test_a_gzipped_idx_declaring_more_than_the_limit_is_refused_from_its_header(client, stack) -> None:
    n, side = MAX_DATASET // (28 * 28) + 1, 28
    header = bytes([0, 0, 0x08, 3]) + b"".join(int(d).to_bytes(4, "big") for d in (n, side, side))
    stream = io.BytesIO()
    with gzip.GzipFile(fileobj=stream, mode="wb") as gz:
        gz.write(header)
        chunk = bytes(1 << 20)
        for _ in range(n * side * side // len(chunk) + 1):
            gz.write(chunk)
    assert len(stream.getvalue()) < 1_000_000
    r = _upload(client, "train-images-idx3-ubyte.gz", stream.getvalue())
    assert r.status_code == 422, r.text
    assert "SCAN_MAX_DATASET_BYTES" in r.json()["detail"]
    assert _leftovers(stack) == []


def test_pickles_and_zip_members_outside_the_npz_are_refused(client, stack) -> None:
    buf = io.BytesIO()
    np.save(buf, np.array([object()], dtype=object), allow_pickle=True)
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as zf:
        zf.writestr("images.npy", buf.getvalue())
    r = _upload(client, "pickle.npz", zbuf.getvalue())
    assert r.status_code == 422 and r.json()["detail"].startswith("pickle.npz: ")
    assert _leftovers(stack) == []


def test_an_upload_is_decoded_once_and_delete_removes_everything(client: httpx.Client, stack) -> None:
    images = np.random.default_rng(0).integers(0, 256, (20, 8, 8), dtype=np.uint8)
    r = _upload(client, "once.npz", _npz(images=images))
    assert r.status_code == 201, r.text
    dataset_id = r.json()["id"]
    var = stack.settings.artifacts
    # One decoded copy: datasets/<id>, no second one under cache/ and no upload left over.
    assert (var / "datasets" / dataset_id / "images.npy").is_file()
    assert _leftovers(stack) == []
    assert client.delete(f"/v1/datasets/{dataset_id}").status_code == 204
    assert _leftovers(stack, dataset_id) == []


def test_delete_during_ingest_leaves_nothing(client: httpx.Client, stack, monkeypatch) -> None:
    """The ingest runs in this process so that the DELETE can land exactly while it decodes."""
    import ml.data
    from app.services import datasets as service
    from app.services.auth import get_or_create_tenant
    from app.tables import Dataset, DatasetState

    settings = stack.settings
    with db_session() as session:
        tenant = get_or_create_tenant(session, "tenant-a")
        upload = settings.uploads_dir / "racing" / "race.npz"
        upload.parent.mkdir(parents=True, exist_ok=True)
        upload.write_bytes(_npz(images=np.zeros((5, 8, 8), np.uint8)))
        row = Dataset(
            id="racing",
            tenant_id=tenant.id,
            name="race.npz",
            source="race.npz",
            state=DatasetState.PENDING,
            upload_path=str(upload),
        )
        session.add(row)
        session.commit()
    real = ml.data.load_source

    def load_then_delete(*args, **kwargs):
        data = real(*args, **kwargs)
        with db_session() as other:  # what DELETE /v1/datasets/racing does to the row meanwhile
            other.delete(other.get(Dataset, "racing"))
            other.commit()
        return data

    monkeypatch.setattr(ml.data, "load_source", load_then_delete)
    with db_session() as session:
        service.ingest(session, settings, "racing")
    assert _leftovers(stack, "racing") == []


def test_a_name_with_control_characters_is_refused_and_leaves_nothing(client: httpx.Client, stack) -> None:
    """PostgreSQL cannot store NUL (Schemathesis found the 500); no control character belongs in a name."""
    from sqlalchemy import func, select

    from app.tables import Dataset

    with db_session() as session:
        rows = session.scalar(select(func.count()).select_from(Dataset))
    images = _npz(images=np.zeros((4, 8, 8), np.uint8))
    answers = [
        client.post("/v1/datasets", files={"file": ("ok.npz", images)}, data={"name": "a\x00b"}),
        client.post("/v1/datasets/import", json={"source": "digits", "name": "x\x00"}),
        client.post("/v1/datasets/import", json={"source": "digits", "name": "two\nlines"}),
        client.post("/v1/datasets/import", json={"source": "digits", "name": "\x1b[2Jcleared"}),
        # A lone surrogate: valid JSON, not encodable as UTF-8 by any database driver.
        client.post(
            "/v1/datasets/import",
            content=b'{"source": "digits", "name": "x\\ud800"}',
            headers={"Content-Type": "application/json"},
        ),
    ]
    for r in answers:
        assert r.status_code == 422, r.text
        assert "control characters" in r.json()["detail"]
    assert _leftovers(stack) == []
    with db_session() as session:
        assert session.scalar(select(func.count()).select_from(Dataset)) == rows


def test_a_delete_during_a_real_ingest_stops_the_decode_and_leaves_nothing(client: httpx.Client, stack) -> None:
    """The real cpu worker decodes; DELETE answers 204 while it does, and the ingest stops at its
    next batch (it once ran to the end and wrote 2 x 2 GiB that no row pointed to)."""
    import re
    import time

    from PIL import Image

    n, side = 80, 5000  # 25 Mpx of zeros: ~25 KB as PNG, many seconds to decode all of them
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        png = io.BytesIO()
        Image.new("L", (side, side)).save(png, format="PNG")
        for i in range(n):
            zf.writestr(f"big/{i}.png", png.getvalue())
    assert len(buf.getvalue()) < 4_000_000
    r = client.post("/v1/datasets", params={"wait": "false"}, files={"file": ("big.zip", buf.getvalue())})
    assert r.status_code == 202, r.text
    dataset_id = r.json()["id"]
    state, deadline = r.json()["state"], time.monotonic() + 300  # bounds a stall, not the decode's speed
    while state == "PENDING" and time.monotonic() < deadline:
        time.sleep(0.05)
        state = client.get(f"/v1/datasets/{dataset_id}").json()["state"]
    assert state == "INGESTING", f"the ingest finished ({state}) before the DELETE could interrupt it"
    assert client.delete(f"/v1/datasets/{dataset_id}").status_code == 204
    worker_log = stack.var_dir / "worker-cpu.log"
    stopped = None
    while stopped is None and time.monotonic() < deadline:
        time.sleep(0.2)
        stopped = re.search(
            rf"ingest of dataset {dataset_id} stopped: deleted during its ingest \(stopped on request \((.*?)\)\)",
            worker_log.read_text(errors="replace"),
        )
    assert stopped, "the ingest was not stopped"
    # It stopped part way: while reading headers, or with fewer than all images decoded.
    progress = stopped.group(1)
    assert progress.startswith("read the headers") or not progress.startswith(f"decoded {n} of"), progress
    assert re.fullmatch(rf"(read the headers of|decoded) \d+ of {n} images", progress), progress
    assert _leftovers(stack, dataset_id) == []
    assert client.get(f"/v1/datasets/{dataset_id}").status_code == 404
