"""The stack's fixtures live in tests/stack.py (loaded by tests/conftest.py, so that tests/service and
tests/security share one API, one database and one set of workers). Helpers re-exported for imports."""

from pathlib import Path

import pytest

from tests.stack import MAX_UPLOAD, PY, ROOT, TINY, db_session, digits_npz, start_run, wait_for_run  # noqa: F401 - re-exported: the service tests import helpers from here


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium for the UI tests (test_ui, test_ui_registry)."""
    from tests.service.test_ui import CHROMIUM, CHROMIUM_ARGS

    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (make chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()
