"""Printable text: the one type for every free-text field a tenant sends and the service stores.

Names (datasets, weights), file names, idempotency keys: each is shown back in JSON, in the UI and
in logs, and stored in a database. PostgreSQL cannot store NUL at all (Schemathesis once found the
500), a lone surrogate cannot be encoded to UTF-8 by any driver, and no control character (a
newline in a log line, an escape sequence in a terminal) belongs in a display name. So: every
character must be printable or a plain space; checked in the schema (422) and, for fields that do not
come through pydantic (multipart form fields), with `check_printable` in the service.
"""

from __future__ import annotations

import unicodedata
from typing import Annotated

from pydantic import AfterValidator, StringConstraints, TypeAdapter

# Cc: C0/C1 controls (NUL, newline, ESC, DEL ...); Cs: lone surrogates (not encodable as UTF-8);
# Zl/Zp: line and paragraph separators, newlines by another name.
_REFUSED = frozenset({"Cc", "Cs", "Zl", "Zp"})
MESSAGE = "contains control characters; use printable text"


def _printable(text: str) -> str:
    if any(unicodedata.category(ch) in _REFUSED for ch in text):
        raise ValueError(MESSAGE)
    return text


PrintableText = Annotated[str, AfterValidator(_printable)]
"""Any length; bound it where used (``Annotated[PrintableText, StringConstraints(max_length=...)]``)."""


def bounded(max_length: int) -> type:
    """Printable text of 1..max_length characters (the column's width)."""
    return Annotated[PrintableText, StringConstraints(min_length=1, max_length=max_length)]


Name = bounded(200)

_CHECK = TypeAdapter(PrintableText)


def is_printable(text: str) -> bool:
    try:
        _CHECK.validate_python(text)
    except ValueError:
        return False
    return True


def check_printable(text: str, what: str, error: type[Exception] = ValueError) -> str:
    """``text`` unchanged, or ``error(f"{what} {MESSAGE}")`` (for fields that are not pydantic's)."""
    if not is_printable(text):
        raise error(f"{what} {MESSAGE}")
    return text
