"""scan_client without a server: both clients offer the same calls, every call goes to a route the
API has, with a success status the route answers, and importing the client loads no server code."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scan_client import AsyncClient, Client
from scan_client import _calls as calls
from scan_client._common import Call, Poll

ROOT = Path(__file__).resolve().parents[1]
PLUMBING = {"request", "call", "close", "aclose", "follow_events"}


def _builders() -> dict[str, object]:
    return {
        name: fn
        for name, fn in vars(calls).items()
        if inspect.isfunction(fn) and not name.startswith("_") and fn.__module__ == calls.__name__
    }


def _public(cls: type) -> set[str]:
    return {n for n in dir(cls) if not n.startswith("_")} - PLUMBING


def test_both_clients_offer_every_call_with_the_same_signature():
    builders = _builders()
    assert _public(Client) == _public(AsyncClient) == set(builders)
    for name, build in builders.items():
        expected = list(inspect.signature(build).parameters)
        for cls in (Client, AsyncClient):
            assert list(inspect.signature(getattr(cls, name)).parameters) == ["self", *expected], (cls, name)
            assert getattr(cls, name).__doc__ == build.__doc__


def _sample(param: inspect.Parameter, tmp: Path):
    values = {
        "name": "digits",
        "model": "digits",
        "alias": "production",
        "reference": "digits@production",
        "version": 2,
        "cluster": 3,
        "clusters": [1, 2],
        "num_clusters": 10,
        "url": "https://example.com/hook",
        "arch": "convnet",
        "images": [b"\x89PNG"],
        "path": tmp / "model.zip",
        "description": "d",
    }
    if param.name == "source":
        return "digits" if param.annotation == "str" else b"bytes"
    if param.name.endswith("_id"):
        return "abc123"
    return values[param.name]


def _call_of(name: str, build, tmp: Path) -> Call:
    args, kwargs = [], {}
    for param in inspect.signature(build).parameters.values():
        if param.default is not inspect.Parameter.empty or param.kind is param.VAR_KEYWORD:
            continue
        if param.kind is param.KEYWORD_ONLY:
            kwargs[param.name] = _sample(param, tmp)
        else:
            args.append(_sample(param, tmp))
    if name in ("neighbors", "model_neighbors"):
        kwargs["items"] = [1]
    made = build(*args, **kwargs)
    return made.get if isinstance(made, Poll) else made


@pytest.fixture(scope="module")
def routes() -> dict[str, dict]:
    """(path template -> operations) of the API's OpenAPI document, read in a child process so
    this test process keeps no settings of the app."""
    code = "import json, app.main; print(json.dumps(app.main.app.openapi()['paths']))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_every_call_names_a_route_of_the_api_and_expects_what_it_answers(routes, tmp_path):
    for name, build in _builders().items():
        call = _call_of(name, build, tmp_path)
        path = call.path.partition("?")[0]  # a call may carry its query in the path (predict's k)
        matches = [
            ops[call.method.lower()]
            for template, ops in routes.items()
            if re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", template), path) and call.method.lower() in ops
        ]
        assert matches, f"{name}: no route {call.method} {call.path}"
        answered = {int(code) for op in matches for code in op["responses"] if code.startswith("2")}
        assert set(call.expect) & answered, (name, call.expect, answered)
        if call.cleanup is not None:
            call.cleanup()


def test_a_cluster_patch_sends_only_the_fields_given():
    assert calls.name_cluster("m", 1, 3, "loops").kwargs["json"] == {"name": "loops"}
    assert calls.name_cluster("m", 1, 3, description=None).kwargs["json"] == {"description": None}
    with pytest.raises(ValueError, match="exactly one"):
        calls.neighbors("r", items=[1], vectors=[[0.0]])


def test_importing_the_client_loads_no_database_layer_and_no_torch():
    code = (
        "import sys, scan_client; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'sqlalchemy', 'celery', 'torch', 'faiss', 'workers'}"
        " | ({'app.services'} & set(sys.modules))))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
