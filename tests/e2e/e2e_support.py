"""What the browser tests do the way a person would: sign up, pick a model, type, wait for the answer."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
from playwright.sync_api import expect

PASSWORD = "correct horse battery"
# mock-slow sends one word every 200 ms: 16 words take about 3 s.
SLOW_TEXT = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"


def new_email() -> str:
    return f"web-{uuid.uuid4().hex[:10]}@example.com"


def register(page: Any, email: str | None = None) -> str:
    email = email or new_email()
    page.goto("/")
    page.get_by_role("tab", name="Create account").click()
    page.fill("#auth-email", email)
    page.fill("#auth-password", PASSWORD)
    page.click("#auth-submit")
    expect(page.locator("#app")).to_be_visible()
    expect(page.locator("#account-email")).to_have_text(email)
    return email


def login(page: Any, email: str) -> None:
    page.goto("/")
    expect(page.locator("#auth-view")).to_be_visible()
    page.fill("#auth-email", email)
    page.fill("#auth-password", PASSWORD)
    page.click("#auth-submit")
    expect(page.locator("#app")).to_be_visible()


def choose_model(page: Any, model: str) -> None:
    expect(page.locator(f"#model-select option[value='{model}']")).to_have_count(1)
    page.select_option("#model-select", model)


def send(page: Any, text: str) -> None:
    """Type `text` and press Enter; returns once the server has answered the create request."""
    page.fill("#input", text)
    with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/generations")):
        page.press("#input", "Enter")


def answers(page: Any) -> Any:
    return page.locator("#messages .msg-assistant")


def live_answer(page: Any) -> Any:
    return page.locator("#messages .msg-assistant.streaming")


def wait_for_words(page: Any, count: int, timeout: float = 10_000) -> None:
    """Until the answer being streamed shows at least `count` words."""
    page.wait_for_function(
        """n => {
            const el = document.querySelector('#messages .msg-assistant.streaming .msg-content');
            return !!el && el.textContent.trim().split(/\\s+/).filter(Boolean).length >= n;
        }""",
        arg=count,
        timeout=timeout,
    )


def wait_until_finished(page: Any, timeout: float = 15_000) -> None:
    """Until no message is being sent and no answer is being written in the open chat."""
    page.wait_for_function(
        """() => !document.querySelector('#thread[aria-busy], #messages .pending, #messages .streaming')
            && document.querySelector('#stop').hidden""",
        timeout=timeout,
    )


def answer_text(locator: Any) -> str:
    return str(locator.locator(".msg-content").inner_text()).strip()


def chat_id(page: Any) -> str:
    page.wait_for_url("**/#/c/*")
    return str(page.url.rsplit("/", 1)[1])


def tokens(page: Any) -> dict[str, Any]:
    return dict(json.loads(page.evaluate("localStorage.getItem('minichat.tokens')")))


def api(page: Any, base_url: str) -> httpx.Client:
    """An HTTP client acting as the signed-in user of `page` (for setup and for checking the server)."""
    return httpx.Client(
        base_url=base_url, headers={"Authorization": f"Bearer {tokens(page)['accessToken']}"}, timeout=30
    )
