"""What a tenant is told when a worker fails: the problem, never the server's files or a library's
internals (those go to the worker log with the traceback).

A message is shown as written only when it was written for a user: our own domain errors, the data
readers' DataError, and the ValueErrors ml/ raises for a bad configuration. Any absolute path in it
is cut to its last component. Running out of memory gets its own advice; anything else is an
internal error named only by its type.
"""

from __future__ import annotations

import re

from app.core.errors import ServiceError

# An absolute POSIX path: a slash followed by a run of characters that never end a path in prose.
_PATH = re.compile(r"(?<![\w.])/(?:[^\s'\"():;,<>]+/)*([^\s'\"():;,<>/]*)")
_MAX_CHARS = 500


def strip_paths(text: str) -> str:
    """'/srv/var/runs/ab/pretext.pt: bad' -> 'pretext.pt: bad'."""
    return _PATH.sub(lambda m: m.group(1) or "(path)", text)


def _out_of_memory(exc: BaseException) -> bool:
    return (
        isinstance(exc, MemoryError) or "out of memory" in str(exc).lower() or "unable to allocate" in str(exc).lower()
    )


def public_message(exc: BaseException) -> str:
    from ml.data import DataError

    if _out_of_memory(exc):
        return (
            "the worker ran out of memory (the input, or the run's batch_size, image_size or "
            "hidden_dim, is too large for it)"
        )
    if isinstance(exc, ServiceError):
        text = exc.detail
    elif isinstance(exc, DataError):
        text = str(exc)
    elif type(exc) is ValueError:  # ml/'s own checks; library errors subclass it far less often
        text = str(exc)
    else:
        return f"internal error ({type(exc).__name__}); the operators have the details in the worker log"
    text = strip_paths(text)
    return text if len(text) <= _MAX_CHARS else text[:_MAX_CHARS] + "..."
