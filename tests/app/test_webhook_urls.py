"""What a webhook may call: checked at registration (the URL) and at delivery (the resolved address)."""

from __future__ import annotations

import pytest

from app.core.errors import Invalid
from app.services.webhooks import _checked_address, check_url, sign


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "http://[::1]/hook",
        "http://10.1.2.3/",
        "http://192.168.0.10/",
        "http://169.254.169.254/latest/meta-data/",  # the cloud metadata endpoint
        "http://0.0.0.0/",
        "http://localhost:9000/",
        "http://metadata.google.internal/",
    ],
)
def test_private_targets_are_refused_unless_allowed(url):
    with pytest.raises(Invalid, match="public"):
        check_url(url, allow_private=False)
    assert check_url(url, allow_private=True) == url


@pytest.mark.parametrize(
    "url", ["gopher://example.com/", "file:///etc/passwd", "http://a:b@example.com/", "http://x y/"]
)
def test_only_plain_http_urls(url):
    with pytest.raises(Invalid):
        check_url(url, allow_private=True)


def test_public_urls_pass():
    assert check_url("https://hooks.example.com/scan?x=1", allow_private=False)


def test_a_name_resolving_to_loopback_is_refused_at_delivery():
    # "localhost" resolves through /etc/hosts, no network needed: the address is checked, not the name.
    with pytest.raises(PermissionError, match="non-public"):
        _checked_address("localhost", 80, allow_private=False)
    assert _checked_address("localhost", 80, allow_private=True) in ("127.0.0.1", "::1")
    with pytest.raises(PermissionError):
        _checked_address("127.0.0.1", 80, allow_private=False)


def test_signature_is_hmac_sha256_of_timestamp_and_body():
    import hashlib
    import hmac

    body = b'{"a":1}'
    expected = hmac.new(b"k", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign("k", 1700000000, body) == f"sha256={expected}"
    assert sign("k", 1700000001, body) != sign("k", 1700000000, body)
