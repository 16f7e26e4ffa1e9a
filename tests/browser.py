"""A real headless browser for page tests: Debian's `chromium` driven by Playwright.

Playwright is told where the browser is (`executable_path`), so nothing is downloaded; CI installs
it with `apt-get install -y chromium` and `pip install -e .[browser-test]`. Import the fixtures in a
test module: `from .browser import browser, page  # noqa: F401`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path(os.environ.get("RERANKER_TEST_CHROMIUM", "/usr/bin/chromium"))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One Chromium per test module. Not per session: while Playwright's sync API runs, this
    thread has a running event loop, and `asyncio.run` in later tests would refuse to start."""
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="needs playwright: pip install -e .[browser-test]"
    )
    if not CHROMIUM.exists():
        pytest.skip(f"needs a chromium at {CHROMIUM}: apt-get install -y chromium")
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: containers run the tests as root, where Chromium's sandbox can't start
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh page (own cookies and storage) that fails the test on a JavaScript error."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    yield opened
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
