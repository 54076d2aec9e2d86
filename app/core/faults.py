"""Telling the infrastructure's hiccups from a stage's own errors, and riding them out.

A database restart, a Redis restart or a dropped TCP connection is not a failure of the work that
happened to be running: the API answers 503 with Retry-After, and a worker pauses and retries
instead of failing the stage. Only errors of the stage itself (bad data, out of memory, a bug) fail
a run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger("scan.faults")
T = TypeVar("T")


class InfrastructureUnavailable(Exception):
    """The database or broker stayed unreachable longer than a worker is willing to wait."""


def _infra_types() -> tuple[type[BaseException], ...]:
    import sqlalchemy.exc as sa_exc

    types: list[type[BaseException]] = [
        sa_exc.OperationalError,
        sa_exc.InterfaceError,
        sa_exc.TimeoutError,
        ConnectionError,
        TimeoutError,
        InfrastructureUnavailable,
    ]
    try:
        import psycopg

        types += [psycopg.OperationalError, psycopg.InterfaceError]
    except ImportError:  # pragma: no cover - SQLite-only installs
        pass
    try:
        import kombu.exceptions

        types += [kombu.exceptions.OperationalError]
    except ImportError:  # pragma: no cover
        pass
    try:
        import redis.exceptions

        types += [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError]
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


INFRA_ERRORS = _infra_types()


def is_infrastructure_error(exc: BaseException) -> bool:
    """True for "could not reach / lost the database or broker", also when wrapped by SQLAlchemy."""
    import sqlalchemy.exc as sa_exc

    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, INFRA_ERRORS):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def which_service(exc: BaseException) -> str:
    """'database' or 'broker', for messages a person reads."""
    module = type(exc).__module__
    return "broker" if module.startswith(("kombu", "redis", "amqp", "celery")) else "database"


def retry_infra(
    fn: Callable[[], T],
    *,
    what: str,
    budget_s: float,
    on_error: Callable[[], None] | None = None,
    first_wait_s: float = 0.2,
    max_wait_s: float = 5.0,
) -> T:
    """Call ``fn`` until it stops failing for infrastructure reasons, backing off exponentially, for at
    most ``budget_s`` seconds; then raise InfrastructureUnavailable. Other errors pass through at once.
    ``on_error`` runs after each failure (e.g. ``session.rollback``) and may fail itself."""
    deadline = time.monotonic() + budget_s
    wait, failures = first_wait_s, 0
    while True:
        try:
            result = fn()
        except Exception as exc:
            if not is_infrastructure_error(exc):
                raise
            failures += 1
            if on_error is not None:
                try:
                    on_error()
                except Exception:  # noqa: BLE001 - the connection is gone; the next try reconnects
                    pass
            if time.monotonic() + wait > deadline:
                raise InfrastructureUnavailable(
                    f"{what}: the {which_service(exc)} stayed unreachable for {budget_s:.0f}s "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                ) from exc
            if failures == 1:
                log.warning(
                    "%s: %s unreachable (%s); retrying with backoff", what, which_service(exc), type(exc).__name__
                )
            time.sleep(wait)
            wait = min(wait * 2, max_wait_s)
            continue
        if failures:
            log.warning("%s: recovered after %d failed tries", what, failures)
        return result
