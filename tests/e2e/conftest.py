"""Browser tests: local mode started as a subprocess on the tests' own services, driven by Playwright.

The browser is Debian's Chromium (/usr/bin/chromium, `apt-get install chromium`), never a downloaded one:
the PyPI `playwright` package brings only its driver. The server runs against the tests' database,
Redis db and RabbitMQ vhost (tests/conftest.py), and stops at the end of each module so it never runs
beside the integration tests that count rows in the same database.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("MINICHAT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--no-first-run",
    "--no-default-browser-check",
    "--metrics-recording-only",
    "--password-store=basic",
]
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
LAPTOP = {"width": 1280, "height": 800}


@pytest.fixture(scope="module")
def live_server(
    database_url: str, broker_vhost: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """Local mode with the mock models, for one test module."""
    from e2e_support import serve_local_mode

    with serve_local_mode(tmp_path_factory.mktemp("e2e") / "local-mode.log") as base_url:
        yield base_url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium from Debian, one per module (started after, stopped before other modules)."""
    if not Path(CHROMIUM).exists():
        message = f"{CHROMIUM} is missing: apt-get install -y chromium"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import expect, sync_playwright

    # Generous on a shared 2-core machine; a passing run waits for none of it.
    expect.set_options(timeout=10_000)
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            instance.close()


class Tabs:
    """Browser contexts (one per simulated device) and their pages, each watched for script errors."""

    def __init__(self, browser: Any, base_url: str) -> None:
        self.browser = browser
        self.base_url = base_url
        self.contexts: list[Any] = []
        self.errors: list[str] = []
        self.urls: list[str] = []

    def context(self, **options: Any) -> Any:
        options.setdefault("viewport", LAPTOP)
        options.setdefault("service_workers", "block")
        context = self.browser.new_context(base_url=self.base_url, **options)
        context.set_default_timeout(10_000)
        self.contexts.append(context)
        return context

    def page(self, context: Any = None) -> Any:
        page = (context or self.context()).new_page()
        page.on("pageerror", lambda error: self.errors.append(f"{page.url}: {error}"))
        page.on(
            "console",
            lambda msg: (
                self.errors.append(f"console.{msg.type}: {msg.text}")
                if msg.type == "error" and "Failed to load resource" not in msg.text
                else None
            ),
        )
        page.on("request", lambda request: self.urls.append(request.url))
        return page

    def close(self) -> None:
        for context in self.contexts:
            context.close()


@pytest.fixture
def tabs(browser: Any, live_server: str) -> Iterator[Tabs]:
    """A fresh set of browser contexts per test; fails the test on any uncaught script error."""
    tabs = Tabs(browser, live_server)
    try:
        yield tabs
    finally:
        tabs.close()
    assert not tabs.errors, "script errors in the page:\n" + "\n".join(tabs.errors)
    # The access token never travels in a URL (the stream uses the create reply's ticket or the header).
    leaked = [u for u in tabs.urls if "token" in u.lower() or "authorization" in u.lower()]
    assert not leaked, leaked


@pytest.fixture
def page(tabs: Tabs) -> Any:
    """One tab on a laptop-sized window."""
    return tabs.page()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
