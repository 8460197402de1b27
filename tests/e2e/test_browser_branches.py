"""Branches in the web client: Regenerate, Edit in place (Enter resends, Esc cancels), the "2 / 3" switch."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from e2e_support import answers, api, chat_id, choose_model, register, send, wait_until_finished
from playwright.sync_api import expect


def _users(page: Any) -> Any:
    return page.locator("#messages .msg-user")


def _stored(page: Any) -> None:
    """Until the list shows the server's messages (real ids: the actions are there)."""
    wait_until_finished(page)
    expect(page.locator("#messages .msg-assistant .action-regenerate")).to_have_count(1)


def _active_path(page: Any, base_url: str) -> list[tuple[str, str]]:
    with api(page, base_url) as http:
        items = http.get(f"/api/chats/{chat_id(page)}/messages").json()["items"]
    return [(m["role"], m["content"]) for m in items]


def test_regenerate_the_last_answer_and_switch_between_versions(page: Any, live_server: str) -> None:
    register(page)
    choose_model(page, "mock-echo")
    send(page, "What is a branch?")
    _stored(page)
    first_id = answers(page).get_attribute("data-message-id")
    expect(answers(page).locator(".branch-switch")).to_have_count(0)  # one version: no switcher
    expect(_users(page).locator(".action-regenerate")).to_have_count(0)  # only answers regenerate

    with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/generations")):
        answers(page).locator(".action-regenerate").click()
    _stored(page)
    expect(answers(page)).to_have_count(1)  # the new answer takes the old one's place
    expect(answers(page).locator(".branch-count")).to_have_text("2 / 2")
    second_id = answers(page).get_attribute("data-message-id")
    assert second_id and second_id != first_id

    answers(page).locator(".branch-prev").click()
    expect(answers(page)).to_have_attribute("data-message-id", first_id or "")
    expect(answers(page).locator(".branch-count")).to_have_text("1 / 2")
    expect(answers(page).locator(".branch-prev")).to_be_disabled()
    # The version shown is the chat's: a reload keeps it.
    page.reload()
    expect(answers(page)).to_have_attribute("data-message-id", first_id or "")
    expect(answers(page).locator(".branch-count")).to_have_text("1 / 2")
    answers(page).locator(".branch-next").click()
    expect(answers(page)).to_have_attribute("data-message-id", second_id)
    expect(answers(page).locator(".branch-next")).to_be_disabled()

    # Regenerating an older version adds a third.
    answers(page).locator(".action-regenerate").click()
    _stored(page)
    expect(answers(page).locator(".branch-count")).to_have_text("3 / 3")


def test_edit_in_place_enter_resends_escape_cancels(page: Any, live_server: str) -> None:
    register(page)
    choose_model(page, "mock-echo")
    for text in ("first question", "second question"):
        send(page, text)
        _stored(page)
    expect(page.locator("#messages .msg")).to_have_count(4)

    # Esc cancels: nothing changes, nothing is sent.
    _users(page).first.locator(".action-edit").click()
    editor = page.locator("#messages .edit-input")
    expect(editor).to_be_focused()
    expect(editor).to_have_value("first question")
    editor.press("End")
    editor.type(" (typo")
    editor.press("Escape")
    expect(editor).to_have_count(0)
    expect(_users(page).first.locator(".msg-content")).to_have_text("first question")
    expect(page.locator("#messages .msg")).to_have_count(4)

    # Enter resends: the edited message starts a new branch, and its answer follows it.
    _users(page).first.locator(".action-edit").click()
    editor.fill("first question, edited")
    with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/generations")):
        editor.press("Enter")
    _stored(page)
    expect(page.locator("#messages .msg")).to_have_count(2)
    expect(_users(page).locator(".msg-content")).to_have_text("first question, edited")
    expect(answers(page).locator(".msg-content")).to_have_text("first question, edited")
    expect(_users(page).locator(".branch-count")).to_have_text("2 / 2")
    assert _active_path(page, live_server) == [
        ("user", "first question, edited"),
        ("assistant", "first question, edited"),
    ]

    # Back to the first version: the whole earlier branch returns, and a reload keeps it.
    _users(page).locator(".branch-prev").click()
    expect(page.locator("#messages .msg")).to_have_count(4)
    expect(_users(page).first.locator(".branch-count")).to_have_text("1 / 2")
    page.reload()
    expect(page.locator("#messages .msg")).to_have_count(4)
    expect(_users(page).nth(1).locator(".msg-content")).to_have_text("second question")
    assert [t for _, t in _active_path(page, live_server)][::2] == ["first question", "second question"]

    # Shift+Enter is a new line in the editor, as in the composer.
    _users(page).nth(1).locator(".action-edit").click()
    editor.fill("second")
    editor.press("Shift+Enter")
    editor.type("question, two lines")
    with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/generations")):
        editor.press("Enter")
    _stored(page)
    expect(page.locator("#messages .msg")).to_have_count(4)
    expect(_users(page).nth(1).locator(".msg-content")).to_have_text("second\nquestion, two lines")
    expect(_users(page).nth(1).locator(".branch-count")).to_have_text("2 / 2")
    expect(_users(page).first.locator(".branch-count")).to_have_text("1 / 2")


def test_screenshot_of_a_branched_conversation(tabs: Any, live_server: str, artifacts: Path) -> None:
    page = tabs.page(tabs.context(viewport={"width": 1280, "height": 800}))
    register(page)
    choose_model(page, "mock-echo")
    send(page, "Suggest a name for a **chat** app")
    _stored(page)
    _users(page).locator(".action-edit").click()
    page.locator("#messages .edit-input").fill("Suggest a short name for a chat app")
    page.locator("#messages .edit-input").press("Enter")
    _stored(page)
    answers(page).locator(".action-regenerate").click()
    _stored(page)
    answers(page).locator(".action-regenerate").click()
    _stored(page)
    answers(page).locator(".branch-prev").click()
    expect(answers(page).locator(".branch-count")).to_have_text("2 / 3")
    expect(_users(page).locator(".branch-count")).to_have_text("2 / 2")
    page.locator("#input").fill("Why that one?")
    page.mouse.move(1000, 105)  # over the question: its actions show
    time.sleep(0.4)  # let the entry animations settle
    page.screenshot(path=str(artifacts / "branches-laptop.png"))
    assert (artifacts / "branches-laptop.png").stat().st_size > 10_000
    _users(page).locator(".action-edit").click()
    page.locator("#messages .edit-input").type(", please")
    time.sleep(0.3)
    page.screenshot(path=str(artifacts / "branches-editing-laptop.png"))
    page.locator("#messages .edit-input").press("Escape")
    expect(page.locator("#messages .edit-input")).to_have_count(0)
