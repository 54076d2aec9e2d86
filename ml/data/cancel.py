"""Cooperative cancel of a long decode: the caller says how to tell "stop", the readers ask.

A dataset deleted during its ingest must stop the ingest mid-decode (it once ran to the end and
wrote 2 x 2 GiB that no row pointed to). ml/ knows nothing of the database, so the caller (the
ingest service) installs a check with `cancel_check`; the readers call `check_cancelled()` between
members and between batches of rows, on the reading thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_CHECK: ContextVar[Callable[[], bool] | None] = ContextVar("ml_data_cancel_check", default=None)


class Cancelled(Exception):
    """The caller asked the decode to stop (not bad input: no DataError)."""


@contextmanager
def cancel_check(should_stop: Callable[[], bool]) -> Iterator[None]:
    """Within the block, readers stop with `Cancelled` once ``should_stop()`` is true (it is called
    between batches; keep it cheap or rate-limit it)."""
    token = _CHECK.set(should_stop)
    try:
        yield
    finally:
        _CHECK.reset(token)


def check_cancelled(progress: str = "") -> None:
    check = _CHECK.get()
    if check is not None and check():
        raise Cancelled(f"stopped on request{f' ({progress})' if progress else ''}")
