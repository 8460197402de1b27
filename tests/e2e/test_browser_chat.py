"""The web client in a real browser: chatting, streaming, stop, reload, tabs, rename/delete, usage."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from e2e_support import (
    SLOW_TEXT,
    answer_text,
    answers,
    api,
    chat_id,
    choose_model,
    live_answer,
    login,
    register,
    send,
    wait_for_words,
    wait_until_finished,
)
from playwright.sync_api import expect

GREEK = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma"


def test_register_chat_with_echo_and_sign_out(page: Any, live_server: str) -> None:
    email = register(page)
    expect(page.locator("#empty")).to_be_visible()
    # The list arrives after the page shows (GET /api/models): waited for, not read at once.
    for model in ("mock-echo", "mock-slow", "mock-stall", "mock-error"):
        expect(page.locator(f"#model-select option[value='{model}']")).to_have_text(model)
    choose_model(page, "mock-echo")

    send(page, "Hello there, streaming world")
    expect(page.locator("#messages .msg-user")).to_have_text("Hello there, streaming world")
    expect(answers(page)).to_have_count(1)
    expect(answers(page).locator(".msg-content")).to_have_text("Hello there, streaming world")
    wait_until_finished(page)
    expect(page.locator("#input")).to_have_value("")
    # The chat is listed (titled from its first message), open, and in the URL.
    cid = chat_id(page)
    item = page.locator(f".chat-item[data-id='{cid}']")
    expect(item).to_have_class("chat-item active")
    expect(item.locator(".chat-title")).to_have_text("Hello there, streaming world")
    expect(page.locator("#chat-heading")).to_have_text("Hello there, streaming world")

    # The server kept both messages: a reload shows the same conversation.
    page.reload()
    expect(page.locator("#messages .msg")).to_have_count(2)
    expect(answers(page).locator(".msg-content")).to_have_text("Hello there, streaming world")
    with api(page, live_server) as http:
        messages = http.get(f"/api/chats/{cid}/messages").json()["items"]
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "Hello there, streaming world"),
        ("assistant", "Hello there, streaming world"),
    ]

    # Sign out, and back in: the chat is still there.
    page.click("#logout")
    expect(page.locator("#auth-view")).to_be_visible()
    assert page.evaluate("localStorage.getItem('minichat.tokens')") is None
    login(page, email)
    expect(page.locator(".chat-item")).to_have_count(1)
    page.locator(".chat-item .chat-link").click()
    expect(page.locator("#messages .msg")).to_have_count(2)


def test_stream_arrives_incrementally_and_stop_keeps_the_partial_answer(page: Any, live_server: str) -> None:
    register(page)
    choose_model(page, "mock-slow")
    # Shift+Enter makes a new line; Enter sends.
    page.fill("#input", "twenty words follow")
    page.press("#input", "Shift+Enter")
    page.keyboard.type(GREEK)
    assert page.input_value("#input").count("\n") == 1
    page.press("#input", "Enter")
    expect(page.locator("#messages .msg-user .msg-content")).to_have_text(f"twenty words follow\n{GREEK}")
    expect(page.locator("#stop")).to_be_visible()
    wait_for_words(page, 2)
    first = answer_text(live_answer(page))
    wait_for_words(page, len(first.split()) + 2)  # more words keep arriving: it streams
    page.click("#stop")
    expect(page.locator("[data-status='canceled']")).to_have_text("Stopped")
    wait_until_finished(page)
    partial = answer_text(answers(page).last)
    time.sleep(0.8)
    assert answer_text(answers(page).last) == partial  # the text stopped
    words = partial.split()
    assert 3 <= len(words) < 21
    full = f"twenty words follow {GREEK}".split()
    assert words == full[: len(words)]
    # The partial answer is what the server kept.
    cid = chat_id(page)
    with api(page, live_server) as http:
        kept = http.get(f"/api/chats/{cid}/messages").json()["items"][-1]
    assert kept["role"] == "assistant" and kept["content"].split() == words

    # Esc stops too; the next message can be sent at once after `done`.
    send(page, SLOW_TEXT)
    wait_for_words(page, 3)
    page.keyboard.press("Escape")
    expect(page.locator("[data-status='canceled']")).to_have_count(2)
    wait_until_finished(page)
    assert len(answer_text(answers(page).last).split()) < 16
    choose_model(page, "mock-echo")
    send(page, "after the stop")
    expect(answers(page).last.locator(".msg-content")).to_have_text("after the stop")


def test_reload_mid_answer_resumes_it_exactly_once(page: Any, live_server: str) -> None:
    register(page)
    choose_model(page, "mock-slow")
    send(page, SLOW_TEXT)
    wait_for_words(page, 3)
    cid = chat_id(page)
    page.reload()
    # After the reload the answer is still being written, and it is shown live again.
    expect(live_answer(page)).to_have_count(1, timeout=5000)
    wait_until_finished(page)
    assert page.url.endswith(f"#/c/{cid}")
    expect(answers(page)).to_have_count(1)
    assert answer_text(answers(page).first) == SLOW_TEXT  # every word, none twice
    page.reload()
    expect(page.locator("#messages .msg")).to_have_count(2)
    assert answer_text(answers(page).first) == SLOW_TEXT


def test_two_tabs_on_one_chat_show_the_same_answer(tabs: Any, live_server: str) -> None:
    context = tabs.context()
    first = tabs.page(context)
    register(first)
    choose_model(first, "mock-echo")
    send(first, "hello from the first tab")
    wait_until_finished(first)
    cid = chat_id(first)

    second = tabs.page(context)  # a second tab of the same browser: same session
    second.goto(f"/#/c/{cid}")
    expect(second.locator("#messages .msg")).to_have_count(2)

    choose_model(first, "mock-slow")
    send(first, SLOW_TEXT)
    # The other tab picks the new answer up while it is being written.
    expect(live_answer(second)).to_have_count(1, timeout=5000)
    expect(second.locator("#messages .msg-user").last).to_have_text(SLOW_TEXT)
    wait_until_finished(first)
    wait_until_finished(second)
    for tab in (first, second):
        expect(answers(tab)).to_have_count(2)
        assert answer_text(answers(tab).last) == SLOW_TEXT


def test_in_flight_conflict_attaches_to_the_running_answer(tabs: Any, live_server: str) -> None:
    laptop = tabs.page()
    email = register(laptop)
    choose_model(laptop, "mock-slow")
    send(laptop, SLOW_TEXT)
    wait_for_words(laptop, 2)
    cid = chat_id(laptop)

    # Another device of the same user opens the chat: it knows nothing of the running answer until
    # its own send is refused with 409 generation_in_flight, and then it attaches to it.
    phone = tabs.page(tabs.context(viewport={"width": 390, "height": 844}))
    login(phone, email)
    phone.goto(f"/#/c/{cid}")
    expect(phone.locator("#messages .msg-user")).to_have_count(1)
    send(phone, "a question while busy")
    expect(phone.locator("#notice")).to_contain_text("still being written")
    wait_until_finished(phone)
    assert answer_text(answers(phone).last) == SLOW_TEXT
    expect(phone.locator("#input")).to_have_value("a question while busy")  # nothing typed is lost
    wait_until_finished(laptop)
    assert answer_text(answers(laptop).last) == SLOW_TEXT

    # The same tab, from a new chat: the conflict takes it to the chat whose answer is running.
    send(laptop, SLOW_TEXT)
    wait_for_words(laptop, 2)
    laptop.click("#new-chat")
    expect(laptop.locator("#empty")).to_be_visible()
    choose_model(laptop, "mock-echo")
    send(laptop, "this waits as a draft")
    laptop.wait_for_url(f"**/#/c/{cid}")
    new_id = laptop.locator(".chat-item").first.get_attribute("data-id")  # made for the message, now a draft
    assert new_id != cid
    wait_until_finished(laptop)
    expect(answers(laptop)).to_have_count(2)
    assert answer_text(answers(laptop).last) == SLOW_TEXT
    laptop.locator(f".chat-item[data-id='{new_id}'] .chat-link").click()
    expect(laptop.locator("#input")).to_have_value("this waits as a draft")
    expect(laptop.locator("#messages .msg")).to_have_count(0)


def test_rename_and_delete_a_chat(page: Any, live_server: str) -> None:
    register(page)
    send(page, "a chat to rename")
    wait_until_finished(page)
    cid = chat_id(page)
    item = page.locator(f".chat-item[data-id='{cid}']")
    item.hover()
    item.get_by_role("button", name="Rename chat").click()
    field = item.locator("input.rename-input")
    expect(field).to_have_value("a chat to rename")
    field.fill("Renamed <b>chat</b>")
    field.press("Enter")
    expect(item.locator(".chat-title")).to_have_text("Renamed <b>chat</b>")
    expect(page.locator("#chat-heading")).to_have_text("Renamed <b>chat</b>")
    with api(page, live_server) as http:
        assert http.get(f"/api/chats/{cid}").json()["title"] == "Renamed <b>chat</b>"
    page.reload()
    expect(page.locator(f".chat-item[data-id='{cid}'] .chat-title")).to_have_text("Renamed <b>chat</b>")

    # Escape abandons a rename.
    item.hover()
    item.get_by_role("button", name="Rename chat").click()
    item.locator("input.rename-input").fill("not this")
    item.locator("input.rename-input").press("Escape")
    expect(item.locator(".chat-title")).to_have_text("Renamed <b>chat</b>")

    item.hover()
    item.get_by_role("button", name="Delete chat").click()
    dialog = page.locator("#confirm-dialog")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("Renamed <b>chat</b>")
    dialog.get_by_role("button", name="Delete").click()
    expect(page.locator(".chat-item")).to_have_count(0)
    expect(page.locator("#empty")).to_be_visible()
    assert not page.url.endswith(cid)
    with api(page, live_server) as http:
        assert http.get(f"/api/chats/{cid}").status_code == 404
    page.reload()
    expect(page.locator(".chat-item")).to_have_count(0)


def test_usage_view_shows_tokens_after_the_worker_ran(page: Any) -> None:
    register(page)
    choose_model(page, "mock-echo")
    send(page, "count these five words please")
    wait_until_finished(page)
    page.click("#usage-link")
    page.wait_for_url("**/#/usage")
    expect(page.locator("#usage-view")).to_be_visible()
    expect(page.locator("#composer")).to_be_hidden()
    # The worker counts the usage a second or so after the answer; the view refreshes by itself.
    expect(page.locator("#usage-output")).to_have_text("5", timeout=15_000)
    total = int(page.locator("#usage-total").text_content().replace(",", ""))
    assert total > 5
    chart = page.locator("#usage-chart svg.usage-chart")
    expect(chart.locator("g.bar")).to_have_count(30)
    today = chart.locator("g.bar").last
    expect(today.locator("rect.out")).to_have_count(1)
    assert "5 output tokens" in today.locator("title").text_content()
    assert chart.locator("g.bar rect.out").count() == 1  # only today has tokens


def test_html_from_user_and_model_is_shown_as_text(page: Any) -> None:
    register(page)
    choose_model(page, "mock-echo")
    payload = '<img src=x onerror="window.__pwned=1"><b>bold</b><script>window.__pwned=2</script>'
    send(page, payload)
    wait_until_finished(page)
    expect(page.locator("#messages .msg-user .msg-content")).to_have_text(payload)
    expect(answers(page).locator(".msg-content")).to_have_text(payload)
    messages = page.locator("#messages")
    for tag in ("img", "b", "script"):
        expect(messages.locator(tag)).to_have_count(0)
    assert page.evaluate("window.__pwned") is None

    # The model's Markdown becomes safe elements only; a javascript: link stays text.
    send(page, "**strong** and `code` and [bad](javascript:alert(1)) and [good](https://example.com/x)")
    wait_until_finished(page)
    last = answers(page).last
    expect(last.locator("strong")).to_have_text("strong")
    expect(last.locator("code")).to_have_text("code")
    expect(last.locator("a")).to_have_count(1)
    expect(last.locator("a")).to_have_attribute("href", "https://example.com/x")
    expect(last.locator("a")).to_have_attribute("rel", "noopener noreferrer nofollow")
    expect(last.locator(".msg-content")).to_contain_text("[bad](javascript:alert(1))")
    assert page.evaluate("window.__pwned") is None


def test_screenshots_of_a_finished_conversation(tabs: Any, live_server: str, artifacts: Path) -> None:
    conversation = [
        "Give me three tips for **writing clear commit messages**:\n"
        "1. Use the imperative mood: `Add retry to the relay`\n"
        "2. Keep the subject under 50 characters\n"
        "3. Explain *why* in the body, not *what*",
        "Thanks! Can you show me an example?",
    ]
    viewports = {"laptop": ({"width": 1280, "height": 800}, 1), "phone": ({"width": 390, "height": 844}, 2)}
    for name, (viewport, scale) in viewports.items():
        page = tabs.page(tabs.context(viewport=viewport, device_scale_factor=scale))
        register(page)
        with api(page, live_server) as http:  # a few older chats, so the sidebar looks lived in
            for title in ("Weekly meal plan", "SQL window functions, explained", "Trip ideas for Lisbon"):
                http.post("/api/chats", json={"title": title})
        choose_model(page, "mock-echo")
        for text in conversation:
            send(page, text)
            wait_until_finished(page)
        with api(page, live_server) as http:
            http.patch(f"/api/chats/{chat_id(page)}", json={"title": "Writing clear commit messages"})
        page.reload()
        expect(page.locator("#chat-heading")).to_have_text("Writing clear commit messages")
        expect(answers(page)).to_have_count(2)
        expect(answers(page).first.locator("ol li")).to_have_count(3)
        expect(page.locator(".chat-item")).to_have_count(4)
        page.locator("#input").fill("And one more thing…")
        time.sleep(0.4)  # let the entry animations settle
        page.screenshot(path=str(artifacts / f"conversation-{name}.png"))
        sidebar = page.locator("#sidebar")
        if name == "phone":
            page.click("#open-sidebar")
            expect(sidebar).to_be_in_viewport(ratio=1)
            time.sleep(0.3)
            page.screenshot(path=str(artifacts / "sidebar-phone.png"))
            page.click("#usage-link")
            expect(sidebar).not_to_be_in_viewport()
        else:
            page.click("#usage-link")
        expect(page.locator("#usage-output")).not_to_have_text("0", timeout=15_000)
        expect(page.locator("#usage-chart svg")).to_be_visible()
        time.sleep(0.3)
        page.screenshot(path=str(artifacts / f"usage-{name}.png"))
        assert (artifacts / f"conversation-{name}.png").stat().st_size > 10_000
