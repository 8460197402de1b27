"""What the browser tests do the way a person would: sign up, pick a model, type, wait for the answer."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import expect

REPO = Path(__file__).resolve().parents[2]

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


@contextlib.contextmanager
def serve_local_mode(log: Path, **extra_env: str) -> Iterator[str]:
    """`python -m minichat_local` on a free port (relay and consumer included) with only the mock models
    (an OpenAI stub configured by another test must not leak in), plus `extra_env`."""
    import redis

    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    client.flushdb()  # no lock or counter left by an earlier run
    client.close()
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("OPENAI_") and k != "MINICHAT_OPENAI_MODELS"
    }
    env.update({"MINICHAT_DEFAULT_MODEL": "mock-echo", "MINICHAT_LOG_LEVEL": "WARNING", **extra_env})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "minichat_local", "--port", str(port)],
            env=env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{base_url}/api/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"local mode did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    try:
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        tail = log.read_text()[-4000:]
        if tail.strip():
            print(f"--- local mode log (tail) ---\n{tail}")  # shown by pytest when a test failed
