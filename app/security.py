"""The HTTP face's own hardening: response headers every answer carries, and access logs that never
hold a secret.

- Headers: ``X-Content-Type-Options: nosniff`` (an uploaded PNG is never sniffed as HTML),
  ``X-Frame-Options: DENY`` and CSP ``frame-ancestors 'none'`` (no clickjacking of the UI), a CSP
  that allows only this origin's scripts, and ``Referrer-Policy: same-origin``. The UI's templates
  use ``style=`` attributes for bar widths and heat-map shades, hence ``'unsafe-inline'`` for styles
  only; scripts never run inline.
- Logs: uvicorn's access log writes the full request line; a key or token sent in the query string
  (``?api_key=...``) would be written whole. A filter on ``uvicorn.access`` masks such values.
"""

from __future__ import annotations

import logging
import re

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"content-security-policy", CSP.encode()),
]

# Query parameters whose value is a credential, whatever the route.
_SECRET_PARAM = re.compile(
    r"(?i)([?&](?:api[_-]?key|key|token|access[_-]?token|auth|password|secret|session)=)"
    r"[^&#\s]*"
)


def redact(text: str) -> str:
    """'/ui?api_key=sk_abc&x=1' -> '/ui?api_key=REDACTED&x=1'."""
    return _SECRET_PARAM.sub(r"\1REDACTED", text)


class SecurityHeadersMiddleware:
    """Pure ASGI (does not buffer streamed bodies); adds the headers unless a route set its own."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [h for h in HEADERS if h[0] not in present]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _RedactQueryFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.msg, str):
            record.msg = redact(record.msg)
        return True


def install_log_redaction() -> None:
    for name in ("uvicorn.access", "uvicorn.error", "scan"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RedactQueryFilter) for f in logger.filters):
            logger.addFilter(_RedactQueryFilter())
