"""PrintableText: the one check for every free-text field a tenant sends and the service stores."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from app.core.errors import Invalid
from app.core.text import Name, PrintableText, check_printable, is_printable


class _Form(BaseModel):
    name: Name
    note: PrintableText | None = None


@pytest.mark.parametrize("text", ["digits", "chats et chiens", "数字 🙂", "a-b_c.d (v2)", "tab-free\u00a0nbsp"])
def test_printable_text_passes_unchanged(text: str) -> None:
    assert is_printable(text)
    assert _Form(name=text).name == text
    assert check_printable(text, "x") == text


@pytest.mark.parametrize(
    "text",
    [
        "a\x00b",
        "line\nbreak",
        "tab\there",
        "\x1b[31mred",
        "del\x7f",
        "c1\x85",
        "lone \ud800 surrogate",
        "ls\u2028",
        "gpj\u202eexe.txt",
        "unassigned \U000e0fff",
    ],
)
def test_control_characters_are_refused(text: str) -> None:
    assert not is_printable(text)
    with pytest.raises(ValidationError, match="contains control characters"):
        _Form(name=text)
    with pytest.raises(ValidationError, match="contains control characters"):
        _Form(name="ok", note=text)
    with pytest.raises(Invalid, match="^the name contains control characters; use printable text$"):
        check_printable(text, "the name", Invalid)


def test_name_is_bounded() -> None:
    _Form(name="x" * 200)
    for bad in ("", "x" * 201):
        with pytest.raises(ValidationError):
            _Form(name=bad)


def test_multiline_text_allows_new_lines_and_tabs_only() -> None:
    assert is_printable("two\nlines\tand a tab", multiline=True)
    assert not is_printable("two\nlines")
    assert is_printable("from a textarea\r\nsecond line", multiline=True)
    for bad in ("a\x00b", "\x1b[2J", "\u202e"):
        assert not is_printable(bad, multiline=True), repr(bad)
