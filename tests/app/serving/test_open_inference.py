"""Reading and writing Open Inference Protocol bodies (app/serving/open_inference.py), without a
server: every malformation is a 4xx domain error naming the field; the binary layout round-trips.
The protocol against the real Triton client: tests/service/test_open_inference.py."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from app.core.errors import BadRequest, Invalid, TooLarge
from app.serving import open_inference as oip


def binary_body(header: dict, blob: bytes) -> tuple[bytes, str]:
    head = json.dumps(header).encode()
    return head + blob, str(len(head))


def test_binary_uint8_input_and_binary_outputs_round_trip():
    pixels = np.arange(2 * 1 * 4 * 4, dtype=np.uint8).reshape(2, 1, 4, 4)
    header = {
        "id": "r1",
        "inputs": [
            {"name": "IMAGE", "datatype": "UINT8", "shape": [2, 1, 4, 4], "parameters": {"binary_data_size": 32}}
        ],
        "outputs": [{"name": "CLUSTER", "parameters": {"binary_data": True}}, {"name": "PROBABILITIES"}],
    }
    req = oip.parse_request(*binary_body(header, pixels.tobytes()), channels=1, size=4, max_images=8)
    assert req.id == "r1" and np.array_equal(req.tensor, pixels)
    probs = np.array([[0.2, 0.8], [0.9, 0.1]], np.float32)
    body, n = oip.build_response("m", req, probs)
    doc = json.loads(body[:n])
    assert doc["outputs"][0] == {
        "name": "CLUSTER",
        "datatype": "INT64",
        "shape": [2],
        "parameters": {"binary_data_size": 16},
    }
    assert np.frombuffer(body[n:], "<i8").tolist() == [1, 0]
    assert doc["outputs"][1]["data"] == pytest.approx([0.2, 0.8, 0.9, 0.1])


def test_bytes_input_binary_and_json():
    files = [b"\x89PNG-one", b"two"]
    blob = b"".join(struct.pack("<I", len(f)) + f for f in files)
    header = {
        "inputs": [
            {"name": "IMAGE_BYTES", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(blob)}}
        ]
    }
    req = oip.parse_request(*binary_body(header, blob), channels=3, size=32, max_images=8)
    assert [d for _, d in req.named] == files
    assert req.outputs == [("PROBABILITIES", False), ("CLUSTER", False)]
    import base64

    doc = {
        "inputs": [
            {
                "name": "IMAGE_BYTES",
                "datatype": "BYTES",
                "shape": [2],
                "data": [base64.b64encode(f).decode() for f in files],
            }
        ],
        "parameters": {"binary_data_output": True},
    }
    req = oip.parse_request(json.dumps(doc).encode(), None, channels=3, size=32, max_images=8)
    assert [d for _, d in req.named] == files and req.outputs == [("PROBABILITIES", True), ("CLUSTER", True)]


@pytest.mark.parametrize(
    ("body", "header_length", "error", "words"),
    [
        (b"{not json", None, BadRequest, "not valid JSON"),
        (b"[]", None, Invalid, "JSON object"),
        (b'{"inputs": []}', None, Invalid, "exactly one input"),
        (b'{"inputs": [{"name": "X", "datatype": "UINT8", "shape": [1]}]}', None, Invalid, "unknown input"),
        (b'{"inputs": [{"name": "IMAGE", "datatype": "FP32", "shape": [1, 1, 4, 4]}]}', None, Invalid, "UINT8"),
        (b'{"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [1, 3, 4, 4]}]}', None, Invalid, "[N, 1, 4, 4]"),
        (b'{"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [9, 1, 4, 4]}]}', None, TooLarge, "at most 8"),
        (
            b'{"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [1, 1, 4, 4], "data": [1, 2]}]}',
            None,
            Invalid,
            "needs 16 values",
        ),
        (
            b'{"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [1, 1, 4, 4], "data": ['
            + b"300," * 15
            + b"1]}]}",
            None,
            Invalid,
            "0..255",
        ),
        (
            b'{"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [1, 1, 4, 4]}]}xx',
            "999",
            BadRequest,
            "Inference-Header-Content-Length",
        ),
        (
            b'{"inputs": [{"name": "IMAGE_BYTES", "datatype": "BYTES", "shape": [1], "data": ["%%"]}]}',
            None,
            Invalid,
            "base64",
        ),
        (
            b'{"inputs": [{"name": "IMAGE_BYTES", "datatype": "BYTES", "shape": [1], "data": ["QQ=="]}],'
            b' "outputs": [{"name": "LOGITS"}]}',
            None,
            Invalid,
            "unknown output",
        ),
    ],
)
def test_malformed_requests_are_named(body, header_length, error, words):
    with pytest.raises(error) as err:
        oip.parse_request(body, header_length, channels=1, size=4, max_images=8)
    assert words in err.value.detail


def test_a_cut_bytes_element_is_named():
    blob = struct.pack("<I", 10) + b"abc"
    header = {
        "inputs": [{"name": "IMAGE_BYTES", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 7}}]
    }
    with pytest.raises(Invalid) as err:
        oip.parse_request(*binary_body(header, blob), channels=1, size=4, max_images=8)
    assert "says 10 bytes" in err.value.detail


def test_a_model_versions_merged_clusters_are_summed_and_named_by_their_group():
    from app.services.registry import ClusterMap

    clusters = ClusterMap(target=(0, 0, 2), names=("a", "a", "c"), descriptions=(None, None, None))
    req = oip.InferRequest(id=None, outputs=[("PROBABILITIES", False), ("CLUSTER", False)])
    probs = np.array([[0.3, 0.3, 0.4], [0.1, 0.1, 0.8]], np.float32)
    body, n = oip.build_response("m", req, probs, clusters)
    assert n is None
    out = {o["name"]: o for o in json.loads(body)["outputs"]}
    assert out["PROBABILITIES"]["shape"] == [2, 2]
    assert out["PROBABILITIES"]["data"] == pytest.approx([0.6, 0.4, 0.2, 0.8])
    assert out["CLUSTER"]["data"] == [0, 2]
