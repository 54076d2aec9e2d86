"""The browser-facing side: a server-side UI session (the cookie never holds the API key), CSRF
tokens and an Origin check on every form, security headers on every answer, /metrics closed to
strangers, and no secret from a query string in the access log."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.service.test_ui import login, logout, ui_client

TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')


def test_login_needs_the_forms_csrf_token_and_this_origin(api_server: str, keys: dict) -> None:
    with httpx.Client(base_url=api_server, follow_redirects=False) as c:
        token = TOKEN.search(c.get("/ui/login").text).group(1)
        own = {"Origin": api_server}
        # No token, a wrong one, a foreign Origin, no Origin or Referer at all: no session.
        for data, headers in (
            ({"api_key": keys["a"]}, own),
            ({"api_key": keys["a"], "csrf_token": "forged"}, own),
            ({"api_key": keys["a"], "csrf_token": token}, {"Origin": "https://evil.example"}),
            ({"api_key": keys["a"], "csrf_token": token}, {}),
        ):
            r = c.post("/ui/login", data=data, headers=headers)
            assert r.status_code == 403, (data, headers, r.text)
            assert not any(h.startswith("scan_session=") for h in r.headers.get_list("set-cookie"))
        assert login(c, keys["a"]).status_code == 303


def test_the_cookie_is_a_signed_session_id_that_logout_kills(api_server: str, keys: dict) -> None:
    with ui_client(api_server, keys["a"]) as c:
        cookie = c.cookies["scan_session"]
        assert keys["a"] not in cookie and "." in cookie
        session_id, signature = cookie.split(".")
        with httpx.Client(base_url=api_server, follow_redirects=False) as thief:
            # A tampered signature is refused before the database is asked.
            forged = f"{session_id}.{'0' * len(signature)}"
            assert thief.get("/ui", cookies={"scan_session": forged}).status_code == 303
            assert thief.get("/ui", cookies={"scan_session": cookie}).status_code == 200
            # Logging out needs the page's CSRF token; without it the session survives.
            r = c.post("/ui/logout", data={}, headers={"Origin": api_server})
            assert r.status_code == 403
            assert c.get("/ui").status_code == 200
            assert logout(c).status_code == 303
            # The copied cookie died with the session (the row is gone, not just the browser's cookie).
            assert thief.get("/ui", cookies={"scan_session": cookie}).status_code == 303


def test_every_answer_carries_the_security_headers(api_server: str, keys: dict, client: httpx.Client) -> None:
    with ui_client(api_server, keys["a"]) as c:
        for r in (
            c.get("/ui"),
            c.get("/ui/login"),
            client.get("/v1/datasets"),
            client.get("/livez"),
            client.get("/v1/runs/nope"),
        ):
            assert r.headers["x-frame-options"] == "DENY"
            assert r.headers["x-content-type-options"] == "nosniff"
            csp = r.headers["content-security-policy"]
            assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
            assert "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]


def test_secure_cookie_over_https_and_metrics_closed_to_strangers(stack, keys: dict, monkeypatch) -> None:
    """In-process app (same database): TestClient's peer is 'testclient', not the loopback."""
    from fastapi.testclient import TestClient

    from app.core.settings import get_settings
    from app.main import create_app

    with TestClient(create_app(), base_url="https://scan.example", follow_redirects=False) as c:
        assert login(c, keys["a"]).status_code == 303
        cookie = [h for h in c.get("/ui/login").headers.get_list("set-cookie") if h.startswith("scan_login_csrf=")][0]
        assert "Secure" in cookie
        assert c.get("/metrics").status_code == 403  # not a loopback peer, no token configured
        monkeypatch.setenv("SCAN_METRICS_TOKEN", "m-secret-1")
        get_settings.cache_clear()
        try:
            assert c.get("/metrics").status_code == 401
            assert c.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
            r = c.get("/metrics", headers={"Authorization": "Bearer m-secret-1"})
            assert r.status_code == 200 and "scan_http_requests_total" in r.text
        finally:
            monkeypatch.delenv("SCAN_METRICS_TOKEN")
            get_settings.cache_clear()


def test_no_secret_from_a_query_string_reaches_the_access_log(stack, client: httpx.Client) -> None:
    secret = "scan_deadbeef_ThisMustNotBeLogged"
    client.get(f"/v1/datasets?api_key={secret}&limit=1")
    client.get(f"/ui/login?next=/ui&token={secret}")
    log = (stack.var_dir / "api.log").read_text()
    assert "api_key=REDACTED" in log and "token=REDACTED" in log
    assert secret not in log


@pytest.mark.parametrize("text", ["/v1/x?api_key=abc&limit=2", "/ui?Token=abc", "/x?access_token=abc#f"])
def test_redaction_keeps_the_rest_of_the_line(text: str) -> None:
    from app.security import redact

    out = redact(text)
    assert "abc" not in out and "REDACTED" in out and out.split("?")[0] == text.split("?")[0]


def test_revoking_the_key_ends_its_ui_sessions(api_server: str) -> None:
    from app.services.auth import create_key, key_row
    from app.tables import ApiKey, utcnow
    from tests.stack import db_session

    with db_session() as session:
        key = create_key(session, "tenant-revoked")
        session.commit()
    with ui_client(api_server, key) as c:
        assert c.get("/ui").status_code == 200
        with db_session() as session:
            session.get(ApiKey, key_row(session, key).id).revoked_at = utcnow()
            session.commit()
        assert c.get("/ui").status_code == 303
