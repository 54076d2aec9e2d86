"""The Open Inference Protocol (/v2) spoken by the real Triton client (`tritonclient[http]` from
PyPI) against the API process: the same answers as /v1/runs/{id}/predict, in JSON and binary."""

from __future__ import annotations

import io
from urllib.parse import urlparse

import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from tests.service.test_predict import ITEMS, item_png

SOME = ITEMS[:8]


@pytest.fixture(scope="module")
def triton_client(api_server):
    c = triton.InferenceServerClient(urlparse(api_server).netloc, network_timeout=240, connection_timeout=60)
    yield c
    c.close()


@pytest.fixture
def auth(keys) -> dict[str, str]:
    # A fresh dict per test: tritonclient writes Inference-Header-Content-Length into the headers
    # dict it is given, so a shared one would carry a binary request's length into the next call.
    return {"Authorization": f"Bearer {keys['a']}"}


@pytest.fixture(scope="module")
def pngs(client, digits_dataset) -> list[bytes]:
    return [item_png(client, digits_dataset, i) for i in SOME]


@pytest.fixture(scope="module")
def v1_answers(client, finished_run, pngs) -> list[dict]:
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in zip(SOME, pngs)]
    r = client.post(f"/v1/runs/{finished_run['id']}/predict", files=files, params={"k": 1000})
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def v1_probabilities(answers: list[dict]) -> np.ndarray:
    k = len(answers[0]["top_k"])
    out = np.zeros((len(answers), k), np.float32)
    for row, a in zip(out, answers):
        for t in a["top_k"]:
            row[t["cluster"]] = t["probability"]
    return out


def test_health_and_server_metadata(triton_client):
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    assert "binary_tensor_data" in triton_client.get_server_metadata()["extensions"]


def test_model_metadata_and_readiness(triton_client, auth, finished_run, pngs):
    run_id = finished_run["id"]
    meta = triton_client.get_model_metadata(run_id, headers=auth)
    size = np.asarray(Image.open(io.BytesIO(pngs[0]))).shape[0]
    assert meta["name"] == run_id
    assert {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]} == {
        "IMAGE": ("UINT8", [-1, 1, size, size]),
        "IMAGE_BYTES": ("BYTES", [-1]),
    }
    assert {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]} == {
        "PROBABILITIES": ("FP32", [-1, finished_run["num_clusters"]]),
        "CLUSTER": ("INT64", [-1]),
    }
    assert triton_client.is_model_ready(run_id, headers=auth)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_encoded_images_answer_as_v1_predict(triton_client, auth, finished_run, pngs, v1_answers, binary):
    data = np.array(pngs, dtype=np.object_)
    if binary:
        inp = triton.InferInput("IMAGE_BYTES", [len(pngs)], "BYTES")
        inp.set_data_from_numpy(data, binary_data=True)
        result = triton_client.infer(finished_run["id"], [inp], headers=dict(auth))  # all outputs binary
    else:
        # Plain JSON holds no raw bytes: each element is the file in base64 (the client sends it as is).
        import base64

        b64 = np.array([base64.b64encode(p) for p in pngs], dtype=np.object_)
        inp = triton.InferInput("IMAGE_BYTES", [len(pngs)], "BYTES")
        inp.set_data_from_numpy(b64, binary_data=False)
        outputs = [triton.InferRequestedOutput(n, binary_data=False) for n in ("PROBABILITIES", "CLUSTER")]
        result = triton_client.infer(finished_run["id"], [inp], outputs=outputs, headers=dict(auth))
    assert result.as_numpy("CLUSTER").tolist() == [a["cluster"] for a in v1_answers]
    np.testing.assert_allclose(result.as_numpy("PROBABILITIES"), v1_probabilities(v1_answers), atol=1e-6)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_uint8_tensor_answers_as_v1_predict(triton_client, auth, finished_run, pngs, v1_answers, binary):
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(p)))[None] for p in pngs]).astype(np.uint8)
    inp = triton.InferInput("IMAGE", list(pixels.shape), "UINT8")
    inp.set_data_from_numpy(pixels, binary_data=binary)
    outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("CLUSTER", "PROBABILITIES")]
    result = triton_client.infer(finished_run["id"], [inp], outputs=outputs, headers=dict(auth), request_id="req-7")
    assert result.get_response()["id"] == "req-7"
    assert result.as_numpy("CLUSTER").dtype == np.int64
    assert result.as_numpy("CLUSTER").tolist() == [a["cluster"] for a in v1_answers]
    np.testing.assert_allclose(result.as_numpy("PROBABILITIES"), v1_probabilities(v1_answers), atol=1e-6)


def test_errors_reach_the_triton_client_with_their_status(triton_client, auth, keys, finished_run):
    run_id = finished_run["id"]
    wrong = np.zeros((1, 3, 5, 5), np.uint8)
    inp = triton.InferInput("IMAGE", list(wrong.shape), "UINT8")
    inp.set_data_from_numpy(wrong)
    with pytest.raises(InferenceServerException) as err:
        triton_client.infer(run_id, [inp], headers=dict(auth))
    assert err.value.status() == "422" and "shape [N, 1," in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        triton_client.get_model_metadata(run_id)  # no key
    assert err.value.status() == "401" and "API key" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        triton_client.get_model_metadata(run_id, headers={"Authorization": f"Bearer {keys['b']}"})
    assert err.value.status() == "404" and run_id in err.value.message()
    assert not triton_client.is_model_ready("no-such-model", headers=auth)


def test_registered_models_resolve_with_aliases_versions_and_merges(triton_client, auth, client, finished_run, pngs):
    """A /v2 model name may be a registered model: `name` (its production alias), `name@alias`, or
    /versions/N in the path; merged clusters come out as their group, as /v1/models/{ref}/predict."""
    import uuid

    name = f"v2-{uuid.uuid4().hex[:8]}"
    assert client.post("/v1/models", json={"name": name}).status_code == 201
    assert client.post(f"/v1/models/{name}/versions", json={"run_id": finished_run["id"]}).status_code in (200, 201)
    assert client.put(f"/v1/models/{name}/aliases/production", json={"version": 1}).status_code == 200
    r = client.post(f"/v1/models/{name}/versions/1/clusters/merge", json={"clusters": [0, 1]})
    assert r.status_code == 200, r.text
    files = [("files", (f"{i}.png", p, "image/png")) for i, p in enumerate(pngs)]
    v1 = client.post(f"/v1/models/{name}/predict", files=files, params={"k": 1000}).json()["predictions"]

    inp = triton.InferInput("IMAGE_BYTES", [len(pngs)], "BYTES")
    inp.set_data_from_numpy(np.array(pngs, dtype=np.object_), binary_data=True)
    for model, version in ((name, ""), (f"{name}@production", ""), (name, "1")):
        result = triton_client.infer(model, [inp], model_version=version, headers=dict(auth))
        assert result.as_numpy("CLUSTER").tolist() == [p["cluster"] for p in v1], (model, version)
        probs = result.as_numpy("PROBABILITIES")
        assert probs.shape == (len(pngs), finished_run["num_clusters"] - 1)  # clusters 0 and 1 are one group
        np.testing.assert_allclose(probs.max(axis=1), [p["confidence"] for p in v1], atol=1e-5)
    meta = triton_client.get_model_metadata(name, model_version="1", headers=dict(auth))
    assert meta["versions"] == ["1"] and meta["outputs"][0]["shape"] == [-1, finished_run["num_clusters"] - 1]
    assert triton_client.is_model_ready(name, model_version="1", headers=dict(auth))
    with pytest.raises(InferenceServerException) as err:
        triton_client.infer(name, [inp], model_version="7", headers=dict(auth))
    assert err.value.status() == "404"
