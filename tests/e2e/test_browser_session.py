"""The web client in a real browser: sessions and tokens, errors people understand, lists, settings."""

from __future__ import annotations

import json
import time
from typing import Any

from e2e_support import (
    SLOW_TEXT,
    answer_text,
    answers,
    api,
    chat_id,
    choose_model,
    live_answer,
    register,
    send,
    tokens,
    wait_for_words,
    wait_until_finished,
)
from playwright.sync_api import expect

BREAK_ACCESS_TOKEN = """() => {
    const t = JSON.parse(localStorage.getItem('minichat.tokens'));
    t.accessToken = t.accessToken.slice(0, -6) + 'AAAAAA';
    localStorage.setItem('minichat.tokens', JSON.stringify(t));
}"""


def _watch(page: Any) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {"refresh": [], "401": []}
    page.on(
        "request", lambda r: seen["refresh"].append(r.url) if r.url.endswith("/api/auth/refresh") else None
    )
    page.on("response", lambda r: seen["401"].append(r.url) if r.status == 401 else None)
    return seen


def test_a_refused_access_token_is_refreshed_once_for_concurrent_calls(tabs: Any, live_server: str) -> None:
    context = tabs.context()
    page = tabs.page(context)
    register(page)
    send(page, "keep me signed in")
    wait_until_finished(page)
    cid = chat_id(page)
    before = tokens(page)

    # The access token is refused (as after a secret rotation): the reload fires /me, /models, /chats,
    # the chat and its messages at once, all get 401, and exactly one refresh serves them all.
    other = tabs.page(context)
    other.goto(f"/#/c/{cid}")
    expect(other.locator("#messages .msg")).to_have_count(2)
    page.evaluate(BREAK_ACCESS_TOKEN)
    broken = tokens(page)["accessToken"]
    seen_page, seen_other = _watch(page), _watch(other)
    # Both tabs reload at once: a second tab refreshing at the same moment must not spend the token twice.
    for tab in (page, other):
        tab.evaluate("window.__before = true; setTimeout(() => location.reload(), 0)")
    for tab in (page, other):
        tab.wait_for_function(
            "() => !window.__before && document.querySelectorAll('#messages .msg').length === 2"
        )
        expect(tab.locator("#app")).to_be_visible()
        expect(tab.locator(".chat-item")).to_have_count(1)
    assert seen_page["401"] or seen_other["401"]
    assert len(seen_page["refresh"]) + len(seen_other["refresh"]) == 1
    after = tokens(page)
    assert after["refreshToken"] != before["refreshToken"]
    assert after["accessToken"] != broken
    with api(page, live_server) as http:
        assert http.get("/api/auth/me").status_code == 200

    # An access token about to expire is refreshed before it is used: no 401 at all.
    page.evaluate(
        """() => {
            const t = JSON.parse(localStorage.getItem('minichat.tokens'));
            t.expiresAt = Date.now() + 5000;
            localStorage.setItem('minichat.tokens', JSON.stringify(t));
        }"""
    )
    seen = _watch(page)
    page.reload()
    expect(page.locator("#messages .msg")).to_have_count(2)
    assert len(seen["refresh"]) == 1 and not seen["401"]
    # Still one working session in both tabs.
    send(other, "still signed in")
    wait_until_finished(other)
    expect(answers(other)).to_have_count(2)


def test_a_dead_session_goes_back_to_sign_in(page: Any, live_server: str) -> None:
    register(page)
    # Both tokens revoked (signed out elsewhere): the next call cannot be saved by a refresh.
    page.evaluate(BREAK_ACCESS_TOKEN)
    with httpx_client(live_server) as http:
        assert (
            http.post("/api/auth/refresh", json={"refreshToken": tokens(page)["refreshToken"]}).status_code
            == 200
        )
    page.click("#usage-link")
    expect(page.locator("#auth-view")).to_be_visible()
    expect(page.locator("#auth-error")).to_contain_text("session has ended")


def test_network_loss_mid_answer_retries_and_resumes_without_duplicates(tabs: Any) -> None:
    context = tabs.context()
    page = tabs.page(context)
    register(page)
    choose_model(page, "mock-slow")
    send(page, SLOW_TEXT)
    wait_for_words(page, 2)
    context.set_offline(True)
    expect(page.locator("#banner")).to_be_visible()
    expect(page.locator("#banner")).to_contain_text("offline")
    time.sleep(1.0)
    context.set_offline(False)
    wait_until_finished(page)
    expect(page.locator("#banner")).to_be_hidden(timeout=10_000)
    assert answer_text(answers(page).last) == SLOW_TEXT


def test_rate_limited_says_when_to_retry(page: Any) -> None:
    register(page)
    body = {
        "error": {"code": "rate_limited", "message": "Too many requests; retry in 7 s.", "requestId": "t"}
    }
    page.route(
        "**/api/chats/*/generations",
        lambda route: route.fulfill(
            status=429, headers={"Retry-After": "7"}, content_type="application/json", body=json.dumps(body)
        ),
    )
    send(page, "too fast")
    expect(page.locator("#notice")).to_contain_text("Try again in")
    assert page.locator("#notice").text_content().strip().endswith(("7 s.", "6 s."))
    expect(page.locator("#send")).to_be_disabled()
    expect(page.locator("#input")).to_have_value("too fast")  # nothing typed is lost
    expect(page.locator("#messages .msg")).to_have_count(0)


def test_failed_answer_is_explained(page: Any) -> None:
    register(page)
    choose_model(page, "mock-error")
    send(page, "this answer will break after three words")
    expect(page.locator("[data-status='failed']")).to_contain_text("model ran into a problem")
    wait_until_finished(page)
    assert answer_text(answers(page).last) == "this answer will"  # the three words before the failure


def test_settings_are_sent_with_the_message(page: Any, live_server: str) -> None:
    register(page)
    page.click("#open-settings")
    dialog = page.locator("#settings-dialog")
    expect(dialog).to_be_visible()
    expect(dialog.locator("#temperature-value")).to_have_text("Model default")
    dialog.locator("#system-prompt").fill("You are terse.")
    dialog.locator("#temperature").focus()
    page.keyboard.press("Home")
    for _ in range(3):
        page.keyboard.press("ArrowRight")
    expect(dialog.locator("#temperature-value")).to_have_text("0.3")
    dialog.get_by_role("button", name="Save").click()
    expect(dialog).to_be_hidden()
    expect(page.locator("#settings-dot")).to_be_visible()
    choose_model(page, "mock-echo")
    with page.expect_request("**/api/chats/*/generations") as request_info:
        send(page, "with settings")
    sent = request_info.value.post_data_json
    assert sent == {
        "content": "with settings",
        "model": "mock-echo",
        "systemPrompt": "You are terse.",
        "temperature": 0.3,
    }
    wait_until_finished(page)
    generation_id = answers(page).last.get_attribute("data-generation-id")
    with api(page, live_server) as http:
        generation = http.get(f"/api/generations/{generation_id}").json()
    assert generation["systemPrompt"] == "You are terse." and generation["temperature"] == 0.3
    # Settings survive a reload; the reset goes back to the model's default.
    page.reload()
    page.click("#open-settings")
    expect(dialog.locator("#system-prompt")).to_have_value("You are terse.")
    dialog.get_by_role("button", name="Use model default").click()
    expect(dialog.locator("#temperature-value")).to_have_text("Model default")
    dialog.locator("#system-prompt").fill("")
    dialog.get_by_role("button", name="Save").click()
    with page.expect_request("**/api/chats/*/generations") as request_info:
        send(page, "without settings")
    assert request_info.value.post_data_json == {"content": "without settings", "model": "mock-echo"}
    wait_until_finished(page)


def test_chat_list_and_history_are_paginated(page: Any, live_server: str) -> None:
    register(page)
    with api(page, live_server) as http:
        created = [http.post("/api/chats", json={"title": f"Chat number {n:02d}"}).json() for n in range(45)]
        long_chat = created[0]["id"]
        for n in range(105):
            assert (
                http.post(f"/api/chats/{long_chat}/messages", json={"content": f"note {n}"}).status_code
                == 201
            )
    # The list requests the reloaded page makes. Not its responses as they come: the list request of the
    # page before the reload may still be answering, and its body is gone with that page.
    asked: list[Any] = []
    page.on("request", lambda r: asked.append(r) if "/api/chats?limit=" in r.url else None)
    page.reload()
    items = page.locator(".chat-item")
    # The first page is 30 chats, newest first. The client asks for the next one as soon as the list's
    # end is near the bottom of the scroller, which on some layouts is at once: what it asked for, not
    # how many items it shows at a given moment, tells the pages apart.
    expect(items.first.locator(".chat-title")).to_have_text("Chat number 00")
    page.locator("#chat-scroll").evaluate("el => el.scrollTo(0, el.scrollHeight)")
    expect(items).to_have_count(45)
    pages = [r.response() for r in asked]
    first, second = (r.json() for r in pages[:2])
    assert len(pages) == 2 and "cursor=" not in pages[0].url and "cursor=" in pages[1].url
    assert len(first["items"]) == 30 and first["nextCursor"] and len(second["items"]) == 15
    assert second["nextCursor"] is None
    expect(items.last.locator(".chat-title")).to_have_text("Chat number 01")
    # All pages of a long history, oldest first.
    items.first.locator(".chat-link").click()
    messages = page.locator("#messages .msg-user")
    expect(messages).to_have_count(105)
    expect(messages.first).to_have_text("note 0")
    expect(messages.last).to_have_text("note 104")


def test_phone_sized_window_uses_a_drawer(tabs: Any) -> None:
    page = tabs.page(tabs.context(viewport={"width": 390, "height": 844}))
    register(page)
    sidebar = page.locator("#sidebar")
    expect(sidebar).not_to_be_in_viewport()
    send(page, "hello from a phone")
    wait_until_finished(page)
    page.click("#open-sidebar")
    expect(sidebar).to_be_in_viewport()
    expect(page.locator(".chat-item")).to_have_count(1)
    page.keyboard.press("Escape")
    expect(sidebar).not_to_be_in_viewport()
    page.click("#open-sidebar")
    page.click("#new-chat")
    expect(sidebar).not_to_be_in_viewport()
    expect(page.locator("#empty")).to_be_visible()
    expect(live_answer(page)).to_have_count(0)


def httpx_client(base_url: str) -> Any:
    import httpx

    return httpx.Client(base_url=base_url, timeout=30)


def test_sse_parser_and_markdown_renderer_in_the_browser(page: Any) -> None:
    """The client's own SSE parser and Markdown renderer, on inputs the server rarely produces."""
    page.goto("/")
    events = page.evaluate(
        """async () => {
            const { readEvents } = await import('/stream.js');
            // CRLF, CR and LF line ends, a comment, a two-line data field, a trailing incomplete event.
            const bytes = new TextEncoder().encode(
                ': ping\\r\\n\\r\\n'
                + 'id: 1\\r\\ndata: {"type":"delta","delta":"h\\u00e9llo \\ud83d\\ude00"}\\r\\n\\r\\n'
                + 'id: 2\\ndata: {"type":"delta",\\ndata: "delta":"x"}\\n\\n'
                + 'id: 3\\rdata:{"type":"done","status":"succeeded"}\\r\\r'
                + 'id: 4\\ndata: {"type":"never"}'  // no blank line: incomplete, never dispatched
            );
            // One byte per chunk: every split point is exercised (inside "\\r\\n", inside a UTF-8 character).
            let at = 0;
            const body = new ReadableStream({
                pull(controller) {
                    if (at >= bytes.length) return controller.close();
                    controller.enqueue(bytes.slice(at, at + 1));
                    at += 1;
                },
            });
            const out = [];
            for await (const event of readEvents(body, () => {})) out.push(event);
            return out;
        }"""
    )
    assert events == [
        {"id": "1", "data": '{"type":"delta","delta":"héllo 😀"}'},
        {"id": "2", "data": '{"type":"delta",\n"delta":"x"}'},
        {"id": "3", "data": '{"type":"done","status":"succeeded"}'},
    ]
    report = page.evaluate(
        """async () => {
            const { renderMarkdown } = await import('/markdown.js');
            const nasty = [
                '<script>window.__md=1</script>', '<img src=x onerror="window.__md=2">',
                '[x](javascript:window.__md=3)', '[x](data:text/html,<b>x</b>)', '![i](https://e.com/i.png)',
                '```html\\n<iframe src="https://e.com"></iframe>\\n```', '**<b>bold</b>**', '`<i>`',
                '> <svg onload="window.__md=4">', '- <a href="javascript:1">x</a>', '# <h1>t</h1>',
                '[ok](https://e.com/" onmouseover="window.__md=5)', '```\\nunclosed <b> fence',
            ];
            const allowed = new Set(['P', 'BR', 'STRONG', 'EM', 'CODE', 'PRE', 'A', 'UL', 'OL', 'LI',
                                     'BLOCKQUOTE', 'H3', 'H4', 'H5', 'H6', 'HR']);
            const box = document.createElement('div');
            document.body.append(box);
            const bad = [];
            for (const text of nasty) {
                box.replaceChildren(renderMarkdown(text));
                for (const el of box.querySelectorAll('*')) {
                    if (!allowed.has(el.tagName)) bad.push(text + ' -> ' + el.tagName);
                    for (const attr of el.attributes) {
                        const ok = (el.tagName === 'A' && ['href', 'target', 'rel'].includes(attr.name))
                            || (el.tagName === 'CODE' && attr.name === 'data-lang')
                            || (el.tagName === 'OL' && attr.name === 'start');
                        if (!ok) bad.push(text + ' -> ' + el.tagName + '[' + attr.name + ']');
                    }
                    const href = el.getAttribute('href');
                    if (el.tagName === 'A' && !/^https?:\\/\\//.test(href)) bad.push(text + ' -> href');
                }
                if (!box.textContent.length) bad.push(text + ' -> lost its text');
            }
            await new Promise((r) => setTimeout(r, 50));
            box.remove();
            return { bad, md: window.__md ?? null };
        }"""
    )
    assert report == {"bad": [], "md": None}
