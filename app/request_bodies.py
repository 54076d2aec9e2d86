"""Reading /predict and /neighbors request bodies: streamed and bounded, multipart `files` or JSON
`{"images": [base64, ...]}`; the images go on to app/serving/images.py to be decoded."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from fastapi import HTTPException, Request
from starlette.datastructures import UploadFile

from app.core.errors import BadRequest, Invalid, TooLarge
from app.core.settings import get_settings


def max_images() -> int:
    return int(get_settings().max_predict_images)


async def read_limited_body(request: Request) -> bytes:
    """The body, read as a stream and refused (413) at the first chunk past max_serving_body_bytes:
    a 200 MB part is never buffered before its answer. A declared Content-Length over the limit is
    refused before anything is read."""
    limit = int(get_settings().max_serving_body_bytes)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge(
            f"request body of {int(declared)} bytes is over the limit of {limit} bytes "
            "(SCAN_MAX_SERVING_BODY_BYTES); send fewer or smaller images"
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(
                f"request body is over the limit of {limit} bytes "
                "(SCAN_MAX_SERVING_BODY_BYTES); send fewer or smaller images"
            )
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # Starlette's form parser then reads this bounded copy, not the socket
    return body


async def read_upload_form(request: Request, limit: int) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
    """(files as (name, bytes), other form fields) from a multipart body of bounded size."""
    await read_limited_body(request)
    try:
        form = await request.form(max_files=limit + 1, max_fields=32)
    except HTTPException:
        raise
    except Exception as exc:  # malformed multipart, or more parts than allowed
        raise BadRequest(f"could not read the multipart body: {exc}") from exc
    files: list[tuple[str, bytes]] = []
    fields: dict[str, str] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key not in ("files", "file", "image", "images"):
                raise Invalid(f"unexpected file field {key!r}; send images as `files`")
            files.append((value.filename or f"files[{len(files)}]", await value.read()))
        else:
            fields[key] = value
    return files, fields


def decode_base64_images(items: Any, field: str = "images") -> list[tuple[str, bytes]]:
    if not isinstance(items, list) or not items:
        raise Invalid(f"`{field}` must be a non-empty list of base64-encoded images")
    out = []
    for i, item in enumerate(items):
        name = f"{field}[{i}]"
        if not isinstance(item, str):
            raise Invalid(f"{name}: expected a base64 string, got {type(item).__name__}")
        if item.startswith("data:") and "," in item:  # data:image/png;base64,....
            item = item.split(",", 1)[1]
        try:
            out.append((name, base64.b64decode(item, validate=True)))
        except (binascii.Error, ValueError) as exc:
            raise Invalid(f"{name}: not valid base64 ({exc})") from exc
    return out


async def read_json_body(request: Request) -> Any:
    try:
        return json.loads(await read_limited_body(request))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from exc


def check_count(n: int, limit: int) -> None:
    if n == 0:
        raise Invalid('no images: send multipart `files` or JSON {"images": [base64, ...]}')
    if n > limit:
        raise TooLarge(f"{n} images in one request; at most {limit} are accepted (split the request)")
