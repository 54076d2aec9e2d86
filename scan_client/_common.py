"""What the sync and the async client share: errors, retry timing, request bodies, SSE parsing,
and `Call` / `Poll`, the descriptions of calls that both clients run (built in _calls.py)."""

from __future__ import annotations

import functools
import inspect
import io
import json
import os
import re
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, BinaryIO, Concatenate, Generic, ParamSpec, TypeVar

import httpx
import numpy as np

from app.schemas.runs import RunEventOut

TERMINAL = ("SUCCEEDED", "FAILED", "CANCELED")
Progress = Callable[[int, int], None]  # (bytes sent, bytes in all)
ImageLike = bytes | str | os.PathLike
T = TypeVar("T")
P = ParamSpec("P")


class ApiError(Exception):
    """An answer outside the expected statuses; `detail` is the API's message."""

    def __init__(self, response: httpx.Response):
        self.response = response
        self.status_code = response.status_code
        try:
            self.detail = str(response.json().get("detail"))
        except (ValueError, AttributeError):
            self.detail = response.text[:500]
        super().__init__(f"{response.request.method} {response.request.url.path}: {self.status_code} {self.detail}")


class StalledRun(TimeoutError):
    """A run that made no progress (state, stage, epoch, step) for the stall timeout."""


def retry_delay(response: httpx.Response, attempt: int, cap: float) -> float:
    """Seconds to wait before retrying a 503: its Retry-After (seconds or an HTTP date), else an
    exponential backoff from 0.5 s; never more than `cap`."""
    value = response.headers.get("retry-after", "").strip()
    delay = None
    if value.isdigit():
        delay = float(value)
    elif value:
        try:
            delay = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            delay = None
    if delay is None:
        delay = 0.5 * 2**attempt
    return max(0.0, min(delay, cap))


def may_resend(method: str, exc: httpx.TransportError) -> bool:
    """Whether a request that failed on the connection may go again: always when it never reached the
    server (connect failed), and for idempotent methods when the connection broke (a keep-alive
    connection the server closed just as the request went out)."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return True
    return method.upper() in ("GET", "HEAD", "PUT", "DELETE", "OPTIONS") and isinstance(
        exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError
    )


def check(response: httpx.Response, expect: Iterable[int]) -> httpx.Response:
    if response.status_code not in tuple(expect):
        raise ApiError(response)
    return response


class ProgressFile:
    """A file that reports how much of it has been read (httpx reads multipart files in chunks, so
    this is upload progress); rewound before each retry."""

    def __init__(self, raw: BinaryIO, total: int, callback: Progress | None):
        self.raw, self.total, self.callback, self.sent = raw, total, callback, 0

    def seek(self, offset: int, whence: int = 0) -> int:
        pos = self.raw.seek(offset, whence)
        self.sent = pos
        return pos

    def tell(self) -> int:
        return self.raw.tell()

    def read(self, size: int = -1) -> bytes:
        chunk = self.raw.read(size)
        self.sent += len(chunk)
        if self.callback is not None and chunk:
            self.callback(min(self.sent, self.total), self.total)
        return chunk


def open_upload(source: bytes | str | os.PathLike | BinaryIO, filename: str | None) -> tuple[BinaryIO, int, str]:
    """(file object, size, file name) of what to upload."""
    if isinstance(source, bytes):
        return io.BytesIO(source), len(source), filename or "upload"
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        return open(path, "rb"), path.stat().st_size, filename or path.name
    pos = source.tell()
    size = source.seek(0, os.SEEK_END) - pos
    source.seek(pos)
    return source, size, filename or Path(getattr(source, "name", "upload")).name


def predict_request(images: Any) -> dict[str, Any]:
    """httpx keyword arguments for /predict: a uint8 array (N, C, H, W) goes raw (octet-stream, the
    fast path); files (bytes or paths) go as multipart `files`."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError("an image array must be uint8 with shape (N, C, H, W) at the run's size")
        return {
            "content": np.ascontiguousarray(images).tobytes(),
            "headers": {"Content-Type": "application/octet-stream"},
        }
    files = []
    for i, item in enumerate(images):
        if isinstance(item, bytes):
            files.append(("files", (f"image{i}", item, "application/octet-stream")))
        else:
            path = Path(item)
            files.append(("files", (path.name, path.read_bytes(), "application/octet-stream")))
    return {"files": files}


@dataclass
class StallWatch:
    """Fails a wait only after `timeout` seconds without progress, never a slow run or job that
    keeps moving; waiting in the queue behind others is not a stall either."""

    timeout: float
    mark: tuple | None = None
    deadline: float = 0.0

    def __post_init__(self) -> None:
        self.deadline = time.monotonic() + self.timeout

    def see(self, what: str, state: str, mark: tuple) -> None:
        if mark != self.mark or state == "QUEUED":
            self.mark, self.deadline = mark, time.monotonic() + self.timeout
        if time.monotonic() > self.deadline:
            raise StalledRun(f"{what} made no progress in {self.timeout:.0f}s (still {state})")


# -- one description of a call, run by either client ------------------------------------------------


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API call, described once for both clients (scan_client/_calls.py builds them): what to
    send, the statuses that mean success, and how the answer becomes a schema."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    expect: tuple[int, ...] = (200,)
    kwargs: dict[str, Any] = field(default_factory=dict)
    rewind: BinaryIO | None = None  # a body read again from its start on each retry
    cleanup: Callable[[], None] | None = None  # after the call, answered or not (a file opened here)


@dataclass(frozen=True)
class Poll(Generic[T]):
    """A wait: `get` until `done(answer)`, every `poll_s` seconds; StalledRun when `progress(answer)`
    has not changed for `stall_timeout` seconds (a QUEUED answer is never a stall)."""

    what: str
    get: Call[T]
    done: Callable[[T], bool]
    progress: Callable[[T], tuple]
    stall_timeout: float
    poll_s: float


def sync_method(build: Callable[P, Call[T] | Poll[T]]) -> Callable[Concatenate[Any, P], T]:
    """A method of `Client` that runs what `build` describes (`self.call`)."""
    return _method(build, "{}")  # type: ignore[return-value]


def async_method(build: Callable[P, Call[T] | Poll[T]]) -> Callable[Concatenate[Any, P], Coroutine[Any, Any, T]]:
    """A method of `AsyncClient` that runs what `build` describes (`await self.call`)."""
    return _method(build, "Coroutine[Any, Any, {}]")  # type: ignore[return-value]


def _method(build: Callable[..., Any], returns: str) -> Callable[..., Any]:
    @functools.wraps(build)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return self.call(build(*args, **kwargs))

    # help() and IDEs show the method's own signature: self, the builder's parameters, and the
    # schema it answers (the builder's Call[X] / Poll[X] is X).
    sig = inspect.signature(build)
    answer = re.sub(r"^(?:Call|Poll)\[(.*)\]$", r"\1", str(sig.return_annotation))
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    method.__signature__ = sig.replace(
        parameters=[self_param, *sig.parameters.values()], return_annotation=returns.format(answer)
    )
    return method


class SSEParser:
    """Server-Sent Events from text lines: yields (event, id, data) per event, skipping comments."""

    def __init__(self) -> None:
        self.event, self.id, self.data = "message", None, []

    def feed(self, line: str) -> tuple[str, str | None, str] | None:
        if line == "":
            if not self.data:
                self.event = "message"
                return None
            out = (self.event, self.id, "\n".join(self.data))
            self.event, self.data = "message", []
            return out
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self.event = value
        elif name == "data":
            self.data.append(value)
        elif name == "id":
            self.id = value
        return None


def event_of(kind: str, data: str) -> RunEventOut | dict:
    """A run event, or the final {"state": ...} of the `end` event."""
    if kind == "end":
        return json.loads(data)
    return RunEventOut.model_validate_json(data)
