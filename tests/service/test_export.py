"""GET /v1/runs/{id}/model: the exported model answers what /predict answers."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

ITEMS = list(range(3, 1797, 150))


@pytest.fixture(scope="module")
def images_and_predictions(client, finished_run, digits_dataset):
    pngs = [client.get(f"/v1/datasets/{digits_dataset}/items/{i}.png").content for i in ITEMS]
    r = client.post(
        f"/v1/runs/{finished_run['id']}/predict",
        params={"k": 10},
        files=[("files", (f"{i}.png", p, "image/png")) for i, p in zip(ITEMS, pngs)],
    )
    assert r.status_code == 200, r.text
    probs = np.zeros((len(ITEMS), 10), np.float32)
    for row, pred in zip(probs, r.json()["predictions"]):
        for t in pred["top_k"]:
            row[t["cluster"]] = t["probability"]
    # preprocessing.json's recipe: uint8 / 255, NCHW (these PNGs are already 8x8 gray)
    x = np.stack([np.asarray(Image.open(io.BytesIO(p)))[None] for p in pngs]).astype(np.float32) / 255
    return x, probs


def download(client, run_id: str, fmt: str) -> zipfile.ZipFile:
    r = client.get(f"/v1/runs/{run_id}/model", params={"format": fmt})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/zip"
    assert f"{fmt}.zip" in r.headers["content-disposition"]
    return zipfile.ZipFile(io.BytesIO(r.content))


def check_spec(zf: zipfile.ZipFile, fmt: str) -> dict:
    spec = json.loads(zf.read("preprocessing.json"))
    assert spec["format"] == fmt and spec["model_file"] in zf.namelist()
    assert spec["input"]["channels"] == 1 and spec["input"]["height"] == spec["input"]["width"] == 8
    assert spec["input"]["scale"] == "uint8 / 255" and spec["output"]["num_clusters"] == 10
    return spec


def test_onnx_export_equals_predict(client, finished_run, images_and_predictions):
    import onnxruntime as ort

    x, probs = images_and_predictions
    zf = download(client, finished_run["id"], "onnx")
    spec = check_spec(zf, "onnx")
    session = ort.InferenceSession(zf.read(spec["model_file"]), providers=["CPUExecutionProvider"])
    out = session.run(None, {spec["input"]["name"]: x})[0]
    np.testing.assert_allclose(out, probs, atol=1e-5)
    # the batch dimension is dynamic
    assert session.run(None, {"images": x[:1]})[0].shape == (1, 10)
    assert spec["cluster_labels"] is not None and len(spec["cluster_labels"]) == 10


def test_torchscript_export_equals_predict(client, finished_run, images_and_predictions):
    import torch

    x, probs = images_and_predictions
    zf = download(client, finished_run["id"], "torchscript")
    spec = check_spec(zf, "torchscript")
    model = torch.jit.load(io.BytesIO(zf.read(spec["model_file"])), map_location="cpu")
    with torch.no_grad():
        out = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, probs, atol=1e-5)


def test_export_errors(client, client_b, finished_run):
    r = client.get(f"/v1/runs/{finished_run['id']}/model", params={"format": "pickle"})
    assert r.status_code == 422 and "format" in r.json()["detail"]
    r = client_b.get(f"/v1/runs/{finished_run['id']}/model")
    assert r.status_code == 404
