"""The stack's fixtures live in tests/stack.py (loaded by tests/conftest.py, so that tests/service and
tests/security share one API, one database and one set of workers). Helpers re-exported for imports."""

from tests.stack import MAX_UPLOAD, PY, ROOT, TINY, db_session, digits_npz, start_run, wait_for_run  # noqa: F401 - re-exported: the service tests import helpers from here
