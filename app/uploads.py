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


async def receive(request: Request, dest_dir: Path, max_bytes: int) -> Upload:
    """The part named ``file`` goes to ``dest_dir/<safe name>``; small text fields are kept."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise Invalid(
            "send the dataset as multipart/form-data with the archive in the field 'file' "
            "(curl -F file=@digits.zip ...)"
        )
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + 64 * 1024:
        raise TooLarge(
            f"upload of {int(declared)} bytes exceeds the limit of {max_bytes} bytes (SCAN_MAX_UPLOAD_BYTES)"
        )

    upload = Upload()
    state: dict = {"headers": {}, "field": b"", "value": b"", "name": None, "sink": None, "text": None}
    too_large = False

    def on_part_begin() -> None:
        state.update(headers={}, name=None, sink=None, text=None)

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["field"].lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_headers_finished() -> None:
        _, disp = parse_options_header(state["headers"].get(b"content-disposition", b""))
        name = disp.get(b"name", b"").decode("utf-8", "replace")
        state["name"] = name
        if name == "file" and upload.path is None:
            upload.filename = disp.get(b"filename", b"upload").decode("utf-8", "replace")
            dest_dir.mkdir(parents=True, exist_ok=True)
            upload.path = dest_dir / safe_filename(upload.filename)
            state["sink"] = open(upload.path, "wb")  # closed in on_part_end / finally
        else:
            state["text"] = bytearray()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        nonlocal too_large
        if state["sink"] is not None:
            upload.size += end - start
            if upload.size > max_bytes:
                too_large = True
                return
            state["sink"].write(data[start:end])
        elif state["text"] is not None and len(state["text"]) < MAX_FIELD_BYTES:
            state["text"] += data[start:end]

    def on_part_end() -> None:
        if state["sink"] is not None:
            state["sink"].close()
            state["sink"] = None
        elif state["text"] is not None and state["name"]:
            upload.fields[state["name"]] = state["text"].decode("utf-8", "replace")

    parser = MultipartParser(
        params[b"boundary"],
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            if too_large:
                raise TooLarge(
                    f"upload exceeds the limit of {max_bytes} bytes (SCAN_MAX_UPLOAD_BYTES); "
                    "split the dataset or raise the limit"
                )
        parser.finalize()
    except MultipartParseError as exc:
        if state["sink"] is not None:
            state["sink"].close()
        shutil.rmtree(dest_dir, ignore_errors=True)
        raise Invalid(f"malformed multipart body ({exc}); let your HTTP client build it (curl -F file=@...)") from exc
    except BaseException:
        if state["sink"] is not None:
            state["sink"].close()
        shutil.rmtree(dest_dir, ignore_errors=True)
        raise
    if upload.path is None:
        shutil.rmtree(dest_dir, ignore_errors=True)
        raise Invalid("no file in the upload: send it in the multipart field 'file' (curl -F file=@data.zip)")
    if upload.size == 0:
        shutil.rmtree(dest_dir, ignore_errors=True)
        raise Invalid(f"{upload.filename}: the uploaded file is empty")
    return upload
