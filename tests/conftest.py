"""Suite-wide settings. SCAN_TEST_MODE picks how tests/service runs the stack:

- ``embedded`` (default): SQLite + Celery's filesystem transport under a temporary folder;
- ``services``: PostgreSQL (SCAN_DATABASE_URL, default postgresql://postgres@127.0.0.1:5432/test) and
  Redis (SCAN_BROKER_URL, default redis://127.0.0.1:6379/15), as `make test-services` sets them.
"""

from __future__ import annotations

import pytest


def pytest_report_header(config: pytest.Config) -> str:
    import os

    return f"SCAN_TEST_MODE={os.environ.get('SCAN_TEST_MODE', 'embedded')}"


# The API/worker stack's fixtures, shared by tests/service and tests/security (defined once here, so
# one session never starts two stacks).
from tests.stack import *  # noqa: E402, F403 - pytest finds fixtures only by name in a conftest
