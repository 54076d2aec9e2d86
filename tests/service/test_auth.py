"""Every route but the health checks needs a valid key; `scan admin create-key` makes working keys."""

from __future__ import annotations

import subprocess

import httpx

from tests.service.conftest import PY, ROOT


def test_missing_and_bad_keys_get_401(anon_client, api_server):
    for path in ("/v1/datasets", "/v1/runs", "/v1/runs/x", "/v1/datasets/x/items/0.png"):
        r = anon_client.get(path)
        assert r.status_code == 401 and "Authorization: Bearer" in r.json()["detail"]
        assert r.headers["www-authenticate"] == "Bearer"
    for bad in ("nonsense", "scan_000000000000_wrong", "scan_"):
        r = httpx.get(api_server + "/v1/datasets", headers={"Authorization": f"Bearer {bad}"})
        assert r.status_code == 401 and "invalid" in r.json()["detail"]


def test_health_needs_no_key(anon_client):
    assert anon_client.get("/livez").json() == {"status": "ok"}
    r = anon_client.get("/readyz")
    assert r.status_code == 200, r.text
    assert set(r.json()["checks"]) == {"database", "broker", "storage"}


def test_cli_creates_a_working_key_stored_hashed(stack, api_server):
    out = subprocess.run(
        [PY, "-m", "cli.main", "admin", "create-key", "--tenant", "cli-tenant"],
        cwd=ROOT,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    key = out.stdout.strip().splitlines()[-1]
    r = httpx.get(api_server + "/v1/datasets", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200 and r.json()["total"] == 0  # a new tenant sees nothing of the others
    from sqlalchemy import select

    from app.tables import ApiKey
    from tests.service.conftest import db_session

    with db_session() as session:
        hashes = set(session.scalars(select(ApiKey.key_hash)))
    assert key not in hashes and all(len(h) == 64 for h in hashes)


def test_embedded_first_start_writes_a_key(stack, api_server):
    import pytest

    if stack.mode != "embedded":
        pytest.skip("the first key is written only in embedded mode")
    key = (stack.var_dir / "api-key.txt").read_text().strip()
    assert (stack.var_dir / "api-key.txt").stat().st_mode & 0o077 == 0
    assert httpx.get(api_server + "/v1/runs", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def _new_key(tenant: str) -> str:
    from app.services.auth import create_key
    from tests.stack import db_session

    with db_session() as session:
        key = create_key(session, tenant)
        session.commit()
    return key


def test_current_key_names_its_tenant(api_server):
    key = _new_key("tenant-whoami")
    r = httpx.get(api_server + "/v1/keys/current", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    assert r.json() == {"tenant": "tenant-whoami", "prefix": key.split("_")[1]}


def test_a_revoked_key_is_refused_at_once_though_the_api_caches_keys(api_server, keys):
    """The API remembers verified keys (no database read per request); revoking through the API
    ends that at once, and another tenant cannot revoke a key that is not theirs."""
    key = _new_key("tenant-revoke-api")
    headers = {"Authorization": f"Bearer {key}"}
    prefix = key.split("_")[1]
    for _ in range(3):  # verified once, then served from the cache
        assert httpx.get(api_server + "/v1/runs", headers=headers).status_code == 200
    other = httpx.delete(api_server + f"/v1/keys/{prefix}", headers={"Authorization": f"Bearer {keys['b']}"})
    assert other.status_code == 404 and prefix in other.json()["detail"]
    assert httpx.get(api_server + "/v1/runs", headers=headers).status_code == 200
    assert httpx.delete(api_server + f"/v1/keys/{prefix}", headers=headers).status_code == 204
    r = httpx.get(api_server + "/v1/runs", headers=headers)
    assert r.status_code == 401 and "revoked" in r.json()["detail"]


def test_cli_revocation_reaches_the_running_api_at_once(stack, api_server):
    """`scan admin revoke-key` runs in another process: the stamp file it touches empties the API
    process's key cache before the next request."""
    key = _new_key("tenant-revoke-cli")
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.get(api_server + "/v1/runs", headers=headers).status_code == 200
    out = subprocess.run(
        [PY, "-m", "cli.main", "admin", "revoke-key", key],
        cwd=ROOT,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert httpx.get(api_server + "/v1/runs", headers=headers).status_code == 401
