"""Issue 11 item 1 (SPEC §7.3): answers the database cannot take as they are, and a terminal transaction
that fails. Model text is stored exactly as streamed after two repairs; an answer reaching 200,000
characters ends there (finishReason `length`); nothing leaves a generation in flight or its user blocked,
and `done` goes out only after the terminal state is committed."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import free_port
from helpers import Account, Api, EventStream, LocalProcess, database_refusing, text_of
from minichat.chats import ASSISTANT_MAX_CHARS
from minichat.reaper import reap
from minichat_local.openai_stub import Behavior

HOSTILE = "stub-tokens-8-nul-at-2-surrogate-at-5"
HUGE = "stub-tokens-260-token-chars-1000"  # 260,000 characters
MODELS = (HOSTILE, HUGE, "stub-tokens-50")


@pytest.fixture
def stub_mode(
    database_url: str, broker_vhost: str, db: Any, redis_client: Any, openai_stub: Any, tmp_path: Any
) -> Iterator[Api]:
    """A local-mode process whose OpenAI provider is the stub (a real OpenAI-compatible server)."""
    process = LocalProcess(
        free_port(),
        tmp_path / "local-mode.log",
        OPENAI_BASE_URL=openai_stub.base_url,
        OPENAI_API_KEY="sk-test-not-a-real-key",
        MINICHAT_OPENAI_MODELS=",".join(MODELS),
        MINICHAT_DEFAULT_MODEL="mock-echo",
    )
    try:
        process.start()
        api = Api(process.base_url)
        yield api
        api.http.close()
    finally:
        process.stop()
        print(process.log())


def _generate(api: Api, user: Account, chat_id: str, **body: Any) -> tuple[str, list[tuple[int, Any]]]:
    finished = api.generate(user, chat_id, until_done=True, **{"content": "hi", **body})
    return finished["generationId"], finished["events"]


def _stored(api: Api, user: Account, chat_id: str, generation_id: str) -> tuple[dict[str, Any], str]:
    generation = api.request("GET", f"/api/generations/{generation_id}", user=user).json()
    items = api.request("GET", f"/api/chats/{chat_id}/messages", user=user).json()["items"]
    answer = [m["content"] for m in items if m["generationId"] == generation_id]
    return generation, answer[0] if answer else ""


def test_nul_and_lone_surrogates_are_repaired_and_stored_as_streamed(stub_mode: Api) -> None:
    api = stub_mode
    user = api.register()
    chat = api.create_chat(user)
    generation_id, events = _generate(api, user, chat["id"], model=HOSTILE)
    sent = Behavior().for_model(HOSTILE).text(8)
    assert "\x00" in sent and "\ud800" in sent  # what the upstream sent
    repaired = sent.replace("\x00", "").replace("\ud800", "\ufffd")
    assert events[-1][1] == {"type": "done", "status": "succeeded"}
    assert text_of(events) == repaired
    generation, stored = _stored(api, user, chat["id"], generation_id)
    assert stored == repaired
    assert generation["status"] == "succeeded" and generation["finishReason"] == "stop"
    assert api.create_generation(user, chat["id"]).status_code == 201


def test_an_answer_reaching_200000_characters_ends_there_with_finish_reason_length(stub_mode: Api) -> None:
    api = stub_mode
    user = api.register()
    chat = api.create_chat(user)
    started = time.perf_counter()
    generation_id, events = _generate(api, user, chat["id"], model=HUGE)
    print(f"260,000-character answer cut at 200,000: {time.perf_counter() - started:.2f} s")
    whole = Behavior().for_model(HUGE).text(260)
    assert len(whole) == 260_000
    assert events[-1][1] == {"type": "done", "status": "succeeded"}
    assert text_of(events) == whole[:ASSISTANT_MAX_CHARS]
    generation, stored = _stored(api, user, chat["id"], generation_id)
    assert stored == whole[:ASSISTANT_MAX_CHARS]
    assert generation["status"] == "succeeded" and generation["finishReason"] == "length"
    assert generation["outputTokens"] > 0
    assert api.create_generation(user, chat["id"]).status_code == 201


def test_finish_reason_stop_and_length_from_max_tokens(stub_mode: Api) -> None:
    api = stub_mode
    user = api.register()
    chat = api.create_chat(user)
    for model, max_tokens, expected in (
        ("stub-tokens-50", None, "stop"),
        ("stub-tokens-50", 5, "length"),
        ("mock-echo", None, "stop"),
        ("mock-echo", 1, "length"),
    ):
        body: dict[str, Any] = {"model": model, "content": "three small words"}
        if max_tokens:
            body["maxTokens"] = max_tokens
        generation_id, _events = _generate(api, user, chat["id"], **body)
        generation, _ = _stored(api, user, chat["id"], generation_id)
        assert (model, generation["finishReason"]) == (model, expected)
    # Not succeeded: null.
    r = api.create_generation(user, chat["id"], model="mock-error")
    stream = EventStream(api.http, r.json()["streamUrl"])
    assert stream.until_done()[-1][1]["status"] == "failed"
    stream.close()
    assert _stored(api, user, chat["id"], r.json()["generationId"])[0]["finishReason"] is None


@pytest.fixture
def poisoned_answers(db: Any) -> Iterator[None]:
    """A database that refuses assistant messages containing 'poison' (any non-transient failure)."""
    with database_refusing(
        db,
        table="messages",
        event="INSERT",
        condition="NEW.role = 'assistant' AND NEW.content LIKE '%poison%'",
    ):
        yield


def test_a_terminal_transaction_that_fails_still_ends_the_generation(
    api: Api, db: Any, redis_client: Any, poisoned_answers: None
) -> None:
    user = api.register()
    chat = api.create_chat(user)
    r = api.create_generation(user, chat["id"], content="a poison pill")
    generation_id = r.json()["generationId"]
    stream = EventStream(api.http, r.json()["streamUrl"])
    events = stream.until_done()
    # `done` is seen: the terminal state must already be committed.
    status = db.execute(
        "SELECT status, error_code FROM generations WHERE id = %s", (generation_id,)
    ).fetchone()
    stream.close()
    assert tuple(status) == ("failed", "internal_error")
    kinds = [e["type"] for _, e in events]
    assert kinds[-3:] == ["error", "usage", "done"] and set(kinds[:-3]) == {"delta"}
    assert events[-3][1]["code"] == "internal_error"
    assert events[-1][1] == {"type": "done", "status": "failed"}
    assert redis_client.get(f"user:{user.user_id}:inflight_generation") is None
    # Counted all the same, and the user is free at once.
    usage = db.execute("SELECT payload FROM outbox WHERE queue = 'usage_event'").fetchall()
    assert [p[0]["generationId"] for p in usage] == [generation_id]
    r = api.create_generation(user, chat["id"], content="fine")
    assert r.status_code == 201, r.text
    # A stream opened later replays the same end.
    replay = EventStream(api.http, f"/api/generations/{generation_id}/stream", user.headers)
    assert replay.until_done() == events
    replay.close()


def test_when_nothing_can_be_committed_done_is_never_sent_and_the_reaper_ends_it(
    api: Api, db: Any, redis_client: Any
) -> None:
    """The worst case: the database refuses every end of the generation, the fallback too. The run sends
    no `done` (the row is still in flight) and leaves; its heartbeat stops, the reaper ends it with the
    text from the event buffer, and a reader that reconnects gets the end."""
    user = api.register()
    chat = api.create_chat(user)
    refused = "NEW.status IN ('succeeded', 'failed', 'canceled')"
    with database_refusing(db, table="generations", event="UPDATE", condition=refused):
        r = api.create_generation(user, chat["id"], content="hello there world")
        generation_id = r.json()["generationId"]
        stream = EventStream(api.http, r.json()["streamUrl"])
        seen = []
        with pytest.raises(StopIteration):  # the stream ends without `done`
            while True:
                seen.append(stream.next())
        stream.close()
        assert [e["type"] for _, e in seen] == ["delta"] * len(seen) and text_of(seen) == "hello there world"
        status = db.execute("SELECT status FROM generations WHERE id = %s", (generation_id,)).fetchone()
        assert status[0] == "streaming"
    time.sleep(1.2)  # no heartbeat since the run left
    assert reap(silent_for=1.0).as_dict() == {"streamNotOpened": 0, "workerLost": 1, "skipped": 0}
    again = EventStream(api.http, r.json()["streamUrl"], {"Last-Event-ID": str(seen[-1][0])})
    rest = again.until_done()
    again.close()
    assert [e["type"] for _, e in rest] == ["error", "usage", "done"]
    assert rest[0][1]["code"] == "worker_lost" and rest[-1][1]["status"] == "failed"
    assert _stored(api, user, chat["id"], generation_id)[1] == "hello there world"
    assert api.create_generation(user, chat["id"]).status_code == 201
