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
# Zl/Zp: line and paragraph separators, newlines by another name; Cn: unassigned code points.
_REFUSED = frozenset({"Cc", "Cs", "Zl", "Zp", "Cn"})
# Bidirectional overrides and isolates make a name display as something else ("gpj.exe").
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_LINES = frozenset("\r\n\t")  # what multi-line text (a description; a form sends CRLF) may hold
MESSAGE = "contains control characters; use printable text"


def refused(text: str, *, multiline: bool = False) -> bool:
    """True when ``text`` holds a character no stored text may hold (new lines and tabs are
    allowed in ``multiline`` text only)."""
    return any(
        (unicodedata.category(ch) in _REFUSED or ch in _BIDI) and not (multiline and ch in _LINES) for ch in text
    )


def _printable(text: str) -> str:
    if refused(text):
        raise ValueError(MESSAGE)
    return text


def _printable_lines(text: str) -> str:
    if refused(text, multiline=True):
        raise ValueError(MESSAGE)
    return text


PrintableText = Annotated[str, AfterValidator(_printable)]
"""Any length; bound it where used (``Annotated[PrintableText, StringConstraints(max_length=...)]``)."""
PrintableLines = Annotated[str, AfterValidator(_printable_lines)]
"""The same, new lines (CR, LF) and tabs allowed (descriptions)."""


def bounded(max_length: int) -> type:
    """Printable text of 1..max_length characters (the column's width)."""
    return Annotated[PrintableText, StringConstraints(min_length=1, max_length=max_length)]


Name = bounded(200)

_CHECK = TypeAdapter(PrintableText)
_LINES_CHECK = TypeAdapter(PrintableLines)


def is_printable(text: str, *, multiline: bool = False) -> bool:
    try:
        (_LINES_CHECK if multiline else _CHECK).validate_python(text)
    except ValueError:
        return False
    return True


def check_printable(text: str, what: str, error: type[Exception] = ValueError) -> str:
    """``text`` unchanged, or ``error(f"{what} {MESSAGE}")`` (for fields that are not pydantic's)."""
    if not is_printable(text):
        raise error(f"{what} {MESSAGE}")
    return text
