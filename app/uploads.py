"""Stream a multipart upload straight to disk with a hard size limit (413 beyond it).

Starlette's own form parser spools every file to an unbounded temporary file before the route runs;
here the body is parsed chunk by chunk, so at most ``max_bytes`` ever reach the disk.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from app.core.errors import Invalid, TooLarge
from app.services.datasets import safe_filename

MAX_FIELD_BYTES = 4096


@dataclass
class Upload:
    path: Path | None = None
    filename: str | None = None
    size: int = 0
    fields: dict[str, str] = field(default_factory=dict)


async def receive(request: Request, dest_dir: Path, max_bytes: int, setting: str = "SCAN_MAX_UPLOAD_BYTES") -> Upload:
    """The part named ``file`` goes to ``dest_dir/<safe name>``; small text fields are kept."""
    parts = _Parts(dest_dir, max_bytes)
    parser = MultipartParser(_boundary(request, max_bytes, setting), parts.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            if parts.too_large:
                raise TooLarge(
                    f"upload exceeds the limit of {max_bytes} bytes ({setting}); split the dataset or raise the limit"
                )
        parser.finalize()
    except MultipartParseError as exc:
        parts.discard()
        raise Invalid(f"malformed multipart body ({exc}); let your HTTP client build it (curl -F file=@...)") from exc
    except BaseException:
        parts.discard()
        raise
    upload = parts.upload
    if upload.path is None:
        parts.discard()
        raise Invalid("no file in the upload: send it in the multipart field 'file' (curl -F file=@data.zip)")
    if upload.size == 0:
        parts.discard()
        raise Invalid(f"{upload.filename}: the uploaded file is empty")
    return upload


def _boundary(request: Request, max_bytes: int, setting: str) -> bytes:
    """The multipart boundary; refuses other bodies, and a declared length beyond the limit."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise Invalid(
            "send the dataset as multipart/form-data with the archive in the field 'file' "
            "(curl -F file=@digits.zip ...)"
        )
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + 64 * 1024:
        raise TooLarge(f"upload of {int(declared)} bytes exceeds the limit of {max_bytes} bytes ({setting})")
    return params[b"boundary"]


class _Parts:
    """The multipart parser's callbacks: a part's headers, then its bytes, to the upload's file (the
    first part named ``file``, at most ``max_bytes``) or to a small text field."""

    def __init__(self, dest_dir: Path, max_bytes: int):
        self.dest_dir, self.max_bytes = dest_dir, max_bytes
        self.upload = Upload()
        self.too_large = False
        self.field, self.value = b"", b""
        self._part_begin()

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def discard(self) -> None:
        """Close the file being written and remove everything received."""
        self._close()
        shutil.rmtree(self.dest_dir, ignore_errors=True)

    def _part_begin(self) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.name: str | None = None
        self.sink = None  # the open upload file while its part is read; closed in _part_end or discard
        self.text: bytearray | None = None

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self.field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]

    def _header_end(self) -> None:
        self.headers[self.field.lower()] = self.value
        self.field, self.value = b"", b""

    def _headers_finished(self) -> None:
        _, disp = parse_options_header(self.headers.get(b"content-disposition", b""))
        self.name = disp.get(b"name", b"").decode("utf-8", "replace")
        if self.name == "file" and self.upload.path is None:
            self.upload.filename = disp.get(b"filename", b"upload").decode("utf-8", "replace")
            self.dest_dir.mkdir(parents=True, exist_ok=True)
            self.upload.path = self.dest_dir / safe_filename(self.upload.filename)
            self.sink = open(self.upload.path, "wb")  # stays open across callbacks: closed by _close
        else:
            self.text = bytearray()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self.sink is not None:
            self.upload.size += end - start
            if self.upload.size > self.max_bytes:
                self.too_large = True
                return
            self.sink.write(data[start:end])
        elif self.text is not None and len(self.text) < MAX_FIELD_BYTES:
            self.text += data[start:end]

    def _part_end(self) -> None:
        if self.sink is not None:
            self._close()
        elif self.text is not None and self.name:
            self.upload.fields[self.name] = self.text.decode("utf-8", "replace")

    def _close(self) -> None:
        if self.sink is not None:
            self.sink.close()
            self.sink = None
