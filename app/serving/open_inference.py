"""The Open Inference Protocol (KServe v2 / Triton HTTP) for a served run: its metadata, reading an
inference request (JSON, or JSON plus the binary-tensor extension) and writing the response.

A model name is a registered model of the tenant (`name`, `name@alias`, or `name` with
`/versions/N` in the path), resolved at request time like /v1/models/{ref}/predict (its merges and
names apply: PROBABILITIES has one column per served cluster, CLUSTER names the served cluster), or
one of the tenant's SUCCEEDED run ids. Each has one input among two and two outputs:

    IMAGE          UINT8 [-1, C, H, W]  raw pixels at the run's channels and size (no decoding)
    IMAGE_BYTES    BYTES [-1]           encoded image files (PNG, JPEG, ...), conformed like /predict
    PROBABILITIES  FP32  [-1, K]        cluster probabilities
    CLUSTER        INT64 [-1]           the most probable cluster

The binary extension: the header `Inference-Header-Content-Length: n` says the body starts with n
bytes of JSON, followed by the raw bytes of each input whose `parameters.binary_data_size` is set,
in input order; a BYTES element is a 4-byte little-endian length and its bytes. Outputs come back
the same way when asked (`parameters.binary_data` per output, or `binary_data_output` for all). In
plain JSON an IMAGE_BYTES element is a base64 string (JSON holds no raw bytes).

Nothing here knows HTTP: the route (app/routes/open_inference.py) passes bytes and headers in.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.core.errors import BadRequest, Invalid, NotFound, TooLarge

IMAGE, IMAGE_BYTES = "IMAGE", "IMAGE_BYTES"
PROBABILITIES, CLUSTER = "PROBABILITIES", "CLUSTER"
OUTPUTS = (PROBABILITIES, CLUSTER)


def model_metadata(name: str, channels: int, size: int, clusters: int) -> dict[str, Any]:
    return {
        "name": name,
        "platform": "pytorch_scan",
        "inputs": [
            {"name": IMAGE, "datatype": "UINT8", "shape": [-1, channels, size, size]},
            {"name": IMAGE_BYTES, "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [
            {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, clusters]},
            {"name": CLUSTER, "datatype": "INT64", "shape": [-1]},
        ],
    }


@dataclass
class InferRequest:
    id: str | None
    tensor: np.ndarray | None = None  # (N, C, H, W) uint8, from IMAGE
    named: list[tuple[str, bytes]] | None = None  # encoded files, from IMAGE_BYTES
    outputs: list[tuple[str, bool]] = field(default_factory=list)  # (name, binary)

    @property
    def count(self) -> int:
        return len(self.tensor) if self.tensor is not None else len(self.named or [])


def _header(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    if header_length is not None:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise BadRequest(
                f"Inference-Header-Content-Length {header_length!r} is not a byte count within the body "
                f"({len(body)} bytes)"
            )
        n = int(header_length)
        head, rest = body[:n], body[n:]
    else:
        head, rest = body, b""
    try:
        doc = json.loads(head)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the inference request header is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise Invalid('the inference request must be a JSON object {"inputs": [...]}')
    return doc, rest


def _shape(spec: dict, name: str) -> list[int]:
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise Invalid(f"input {name}: `shape` must be a list of integers")
    if any(d < 0 for d in shape):
        raise Invalid(f"input {name}: `shape` {shape} has a negative dimension")
    return shape


def _binary_size(spec: dict, name: str) -> int | None:
    params = spec.get("parameters") or {}
    if not isinstance(params, dict):
        raise Invalid(f"input {name}: `parameters` must be an object")
    size = params.get("binary_data_size")
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise Invalid(f"input {name}: `parameters.binary_data_size` must be a byte count")
    return size


def _split_bytes(raw: bytes, name: str) -> list[bytes]:
    out, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise Invalid(f"input {name}: a BYTES element's 4-byte length is cut short")
        (n,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + n > len(raw):
            raise Invalid(f"input {name}: a BYTES element says {n} bytes but fewer follow")
        out.append(raw[at : at + n])
        at += n
    return out


def parse_request(body: bytes, header_length: str | None, channels: int, size: int, max_images: int) -> InferRequest:
    """The request's one input as pixels or encoded files, and the outputs it asks for; every
    malformation is a 400/422 naming the field, more than `max_images` images a 413."""
    doc, rest = _header(body, header_length)
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise Invalid("`id` must be a string")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise Invalid(f"`inputs` must hold exactly one input: {IMAGE} (UINT8 NCHW) or {IMAGE_BYTES} (BYTES)")
    spec = inputs[0]
    name, datatype = spec.get("name"), spec.get("datatype")
    shape = _shape(spec, str(name))
    binary = _binary_size(spec, str(name))
    if binary is not None and binary != len(rest):
        raise Invalid(f"input {name}: binary_data_size {binary} but {len(rest)} bytes follow the header")
    if binary is None and rest:
        raise Invalid("bytes follow the JSON header but no input declares `parameters.binary_data_size`")
    req = InferRequest(id=request_id)
    if name == IMAGE:
        expected = [channels, size, size]
        if datatype != "UINT8" or len(shape) != 4 or shape[1:] != expected:
            raise Invalid(
                f"input {IMAGE} must be UINT8 with shape [N, {channels}, {size}, {size}]; got {datatype} {shape}"
            )
        _check_count(shape[0], max_images)
        count = math.prod(shape)
        if binary is not None:
            if binary != count:
                raise Invalid(f"input {IMAGE}: shape {shape} needs {count} bytes, binary_data_size is {binary}")
            req.tensor = np.frombuffer(rest, np.uint8).reshape(shape)
        else:
            req.tensor = _json_pixels(spec.get("data"), shape)
    elif name == IMAGE_BYTES:
        if datatype != "BYTES" or len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise Invalid(f"input {IMAGE_BYTES} must be BYTES with shape [N] (or [N, 1]); got {datatype} {shape}")
        _check_count(shape[0], max_images)
        files = _split_bytes(rest, IMAGE_BYTES) if binary is not None else _json_files(spec.get("data"))
        if len(files) != shape[0]:
            raise Invalid(f"input {IMAGE_BYTES}: shape {shape} but {len(files)} elements")
        req.named = [(f"{IMAGE_BYTES}[{i}]", data) for i, data in enumerate(files)]
    else:
        raise Invalid(f"unknown input {name!r}: this model takes {IMAGE} (UINT8 NCHW) or {IMAGE_BYTES} (BYTES)")
    req.outputs = _outputs(doc)
    return req


def _check_count(n: int, limit: int) -> None:
    if n == 0:
        raise Invalid("the input holds no images (its first dimension is 0)")
    if n > limit:
        raise TooLarge(f"{n} images in one request; at most {limit} are accepted (split the request)")


def _json_pixels(data: Any, shape: list[int]) -> np.ndarray:
    if not isinstance(data, list):
        raise Invalid(f"input {IMAGE}: `data` must be a list of integers 0..255 (or send it binary)")
    try:
        flat = np.asarray(data, dtype=np.int64).reshape(-1)
    except (ValueError, TypeError, OverflowError) as exc:
        raise Invalid(f"input {IMAGE}: `data` is not a (flat or nested) list of integers: {exc}") from exc
    if flat.size != math.prod(shape):
        raise Invalid(f"input {IMAGE}: shape {shape} needs {math.prod(shape)} values, `data` holds {flat.size}")
    if flat.size and (flat.min() < 0 or flat.max() > 255):
        raise Invalid(f"input {IMAGE}: UINT8 values must lie in 0..255")
    return flat.astype(np.uint8).reshape(shape)


def _json_files(data: Any) -> list[bytes]:
    if not isinstance(data, list):
        raise Invalid(f"input {IMAGE_BYTES}: `data` must be a list of base64 strings (or send it binary)")
    out = []
    for i, item in enumerate(data):
        if isinstance(item, list) and len(item) == 1:  # shape [N, 1] written nested
            item = item[0]
        if not isinstance(item, str):
            raise Invalid(f"input {IMAGE_BYTES}[{i}]: expected a base64 string, got {type(item).__name__}")
        try:
            out.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise Invalid(f"input {IMAGE_BYTES}[{i}]: not valid base64 ({exc})") from exc
    return out


def _outputs(doc: dict) -> list[tuple[str, bool]]:
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise Invalid("`parameters` must be an object")
    all_binary = params.get("binary_data_output", False) is True
    asked = doc.get("outputs")
    if asked is None:
        return [(name, all_binary) for name in OUTPUTS]
    if not isinstance(asked, list) or not asked:
        raise Invalid(f"`outputs` must be a non-empty list of {{'name': ...}} among {list(OUTPUTS)}")
    out = []
    for spec in asked:
        name = spec.get("name") if isinstance(spec, dict) else None
        if name not in OUTPUTS:
            raise Invalid(f"unknown output {name!r}: this model has {list(OUTPUTS)}")
        p = spec.get("parameters") or {}
        if not isinstance(p, dict):
            raise Invalid(f"output {name}: `parameters` must be an object")
        out.append((name, p.get("binary_data", all_binary) is True))
    return out


def build_response(
    model_name: str, req: InferRequest, probs: np.ndarray, clusters: Any | None = None
) -> tuple[bytes, int | None]:
    """(body, JSON header length or None when the body is all JSON). `clusters`: the registry's
    ClusterMap of a model version (merged groups: their probabilities summed, CLUSTER the group)."""
    if clusters is not None:
        probs, ids = clusters.merge_probs(probs)
        cluster = np.asarray(ids, dtype=np.int64)[np.argmax(probs, axis=1)]
    else:
        cluster = np.argmax(probs, axis=1)
    tensors = {
        PROBABILITIES: ("FP32", np.ascontiguousarray(probs, dtype="<f4")),
        CLUSTER: ("INT64", cluster.astype("<i8")),
    }
    outputs, blobs = [], []
    for name, binary in req.outputs:
        datatype, array = tensors[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            blob = array.tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.reshape(-1).tolist()
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "outputs": outputs}
    if req.id is not None:
        doc["id"] = req.id
    head = json.dumps(doc).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)


def locate(tenant: Any, name: str, version: int | None) -> tuple[Path, Any | None]:
    """(run directory, the version's ClusterMap or None) behind a /v2 model name: a registered model
    of the tenant, resolved now (an alias moved a moment ago is seen at once); else a SUCCEEDED run
    id, remembered like /predict's (no database read for a run found lately). Blocking."""
    from app.core.db import new_session
    from app.services import registry
    from app.services import runs as run_service
    from app.serving.model_versions import choose_warm

    if version is None:
        cached = run_service.cached_servable_dir(tenant, name)
        if cached is not None:
            return cached, None
    reference = name if version is None else f"{name}/versions/{version}"
    with new_session() as session:
        try:
            registry.get(session, tenant, registry.parse_reference(reference)[0])
            registered = True
        except (Invalid, NotFound):
            registered = False
        if registered:
            resolved, run_dir = choose_warm(session, registry.resolve(session, tenant, reference))
            return run_dir, resolved.clusters
    if version is not None:
        raise NotFound(f"model {name!r} not found (a run id has no versions; list models with GET /v1/models)")
    return run_service.servable_dir(tenant, name), None
