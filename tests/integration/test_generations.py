"""Generations end to end through local mode: create, stream (SSE), cancel, resume, races."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from typing import Any

import httpx
import pytest
import redis.asyncio

from helpers import Account, Api, EventStream, LocalProcess, assert_error, text_of
from minichat import generations, limits
from minichat.providers import estimate_tokens

QUESTION = "Tell me about the quick brown fox"
SLOW = "one two three four five six seven eight"


def _open(api: Api, started: dict[str, Any], headers: dict[str, str] | None = None) -> EventStream:
    return EventStream(api.http, started["streamUrl"], headers)


def test_happy_path_matches_the_stream_protocol_byte_for_byte(api: Api, db: Any) -> None:
    user = api.register()
    started = api.generate(user, content=QUESTION)
    assert set(started) == {"chat", "generationId", "generation", "streamUrl"}
    assert started["generation"]["status"] == "queued" and started["generation"]["model"] == "mock-echo"
    assert started["streamUrl"].startswith(f"/api/generations/{started['generationId']}/stream?ticket=")
    stream = _open(api, started)
    assert stream.response.status_code == 200
    assert stream.response.headers["content-type"].startswith("text/event-stream")
    assert "no-cache" in stream.response.headers["cache-control"]
    events = stream.until_done()
    stream.close()
    assert [i for i, _ in events] == list(range(1, len(events) + 1))
    kinds = [e["type"] for _, e in events]
    assert kinds[-2:] == ["usage", "done"] and set(kinds[:-2]) == {"delta"}
    assert text_of(events) == QUESTION
    usage = events[-2][1]
    assert usage["outputTokens"] == 7 and usage["inputTokens"] > 0 and usage["estimated"] is False
    assert events[-1][1] == {"type": "done", "status": "succeeded"}
    expected = b"".join(
        f"id: {i}\ndata: {json.dumps(e, separators=(',', ':'), ensure_ascii=False)}\n\n".encode()
        for i, e in events
    )
    assert stream.raw == expected  # exact framing: one id line, one data line, a blank line
    generation = api.generation(user, started["generationId"])
    assert generation["status"] == "succeeded"
    assert generation["startedAt"] and generation["finishedAt"] >= generation["startedAt"]
    assert generation["outputTokens"] == 7 and generation["inputTokens"] == usage["inputTokens"]
    messages = api.request("GET", f"/api/chats/{started['chat']['id']}/messages", user=user).json()["items"]
    assert [(m["role"], m["content"]) for m in messages] == [("user", QUESTION), ("assistant", QUESTION)]
    assert messages[1]["generationId"] == started["generationId"]


def test_generation_shape_and_request_id(api: Api) -> None:
    user = api.register()
    chat = api.create_chat(user)
    r = api.create_generation(
        user,
        chat["id"],
        headers={"X-Request-Id": "req-gen-1"},
        content="hi",
        model="mock-echo",
        systemPrompt="Be brief.",
        temperature=0.5,
        maxTokens=64,
    )
    assert r.status_code == 201, r.text
    g = r.json()["generation"]
    assert set(g) == {
        "id", "chatId", "status", "model", "systemPrompt", "temperature", "maxTokens", "inputTokens",
        "outputTokens", "createdAt", "startedAt", "finishedAt", "errorCode", "errorMessage", "requestId",
        "finishReason",
    }  # fmt: skip
    assert g["finishReason"] is None  # queued
    assert g["requestId"] == "req-gen-1" and g["systemPrompt"] == "Be brief."
    assert g["temperature"] == 0.5 and g["maxTokens"] == 64 and g["chatId"] == chat["id"]
    api.request("POST", f"/api/generations/{g['id']}/cancel", user=user)


def test_cancel_while_streaming_keeps_the_partial_answer(api: Api) -> None:
    user = api.register()
    started = api.generate(user, content=SLOW, model="mock-slow")
    stream = _open(api, started)
    first = [stream.next(), stream.next()]
    t0 = time.monotonic()
    r = api.request("POST", f"/api/generations/{started['generationId']}/cancel", user=user)
    assert r.status_code == 200 and r.json()["status"] in {"streaming", "canceled"}
    rest = stream.until_done()
    elapsed = time.monotonic() - t0
    stream.close()
    assert elapsed < 1.0, elapsed
    events = first + rest
    assert events[-1][1] == {"type": "done", "status": "canceled"}
    assert events[-2][1]["type"] == "usage" and events[-2][1]["estimated"] is True
    partial = text_of(events)
    assert partial and SLOW.startswith(partial) and partial != SLOW
    g = api.generation(user, started["generationId"])
    assert g["status"] == "canceled" and g["outputTokens"] > 0
    messages = api.request("GET", f"/api/chats/{started['chat']['id']}/messages", user=user).json()["items"]
    assert messages[-1]["role"] == "assistant" and messages[-1]["content"] == partial
    again = api.request("POST", f"/api/generations/{started['generationId']}/cancel", user=user)
    assert again.status_code == 200 and again.json()["status"] == "canceled"  # idempotent


def test_cancel_while_the_model_is_silent(api: Api) -> None:
    user = api.register()
    started = api.generate(user, content="stall here please", model="mock-stall")
    stream = _open(api, started)
    assert stream.next()[1]["type"] == "delta"
    time.sleep(0.3)
    t0 = time.monotonic()
    api.request("POST", f"/api/generations/{started['generationId']}/cancel", user=user)
    rest = stream.until_done()
    stream.close()
    assert time.monotonic() - t0 < 1.0
    assert rest[-1][1]["status"] == "canceled"


def test_a_stalled_model_times_out_and_frees_the_user(api: Api) -> None:
    user = api.register()
    started = api.generate(user, content="stall here please", model="mock-stall")
    stream = _open(api, started)
    events = stream.until_done()  # idle timeout is 2 s in the test environment
    stream.close()
    kinds = [e["type"] for _, e in events]
    assert kinds == ["delta", "error", "usage", "done"]
    assert events[1][1]["code"] == "provider_timeout"
    assert events[-1][1]["status"] == "failed"
    g = api.generation(user, started["generationId"])
    assert g["status"] == "failed" and g["errorCode"] == "provider_timeout"
    assert api.create_generation(user, started["chat"]["id"], content="again").status_code == 201


def test_cancel_a_queued_generation(api: Api, redis_client: Any) -> None:
    user = api.register()
    started = api.generate(user, content=QUESTION)
    r = api.request("POST", f"/api/generations/{started['generationId']}/cancel", user=user)
    assert r.status_code == 200 and r.json()["status"] == "canceled" and r.json()["finishedAt"]
    assert redis_client.get(limits.inflight_key(user.user_id)) is None
    assert api.create_generation(user, started["chat"]["id"], content="next").status_code == 201
    stream = _open(api, started)
    events = stream.until_done()
    stream.close()
    assert [e["type"] for _, e in events] == ["usage", "done"] and events[-1][1]["status"] == "canceled"


def test_provider_error(api: Api) -> None:
    user = api.register()
    started = api.generate(user, content="alpha beta gamma delta epsilon", model="mock-error")
    stream = _open(api, started)
    events = stream.until_done()
    stream.close()
    kinds = [e["type"] for _, e in events]
    assert kinds[-3:] == ["error", "usage", "done"] and set(kinds[:-3]) == {"delta"}
    assert text_of(events) == "alpha beta gamma"
    error = events[-3][1]
    assert error["code"] == "provider_error" and error["message"]
    g = api.generation(user, started["generationId"])
    assert g["status"] == "failed" and g["errorCode"] == "provider_error" and g["errorMessage"]
    messages = api.request("GET", f"/api/chats/{started['chat']['id']}/messages", user=user).json()["items"]
    assert messages[-1]["content"] == "alpha beta gamma"


def _wait_terminal(api: Api, user: Account, generation_id: str, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        g = api.generation(user, generation_id)
        if g["status"] in {"succeeded", "canceled", "failed"}:
            return g
        assert time.monotonic() < deadline, g
        time.sleep(0.05)


def test_client_disconnect_does_not_stop_the_generation(api: Api) -> None:
    user = api.register()
    started = api.generate(user, content="a b c d e", model="mock-slow")
    stream = _open(api, started)
    stream.next()
    stream.close()
    g = _wait_terminal(api, user, started["generationId"])
    assert g["status"] == "succeeded"
    messages = api.request("GET", f"/api/chats/{started['chat']['id']}/messages", user=user).json()["items"]
    assert messages[-1]["content"] == "a b c d e"


@pytest.mark.parametrize("how", ["header", "query"])
def test_resume_mid_stream_with_last_event_id(api: Api, how: str) -> None:
    user = api.register()
    started = api.generate(user, content=SLOW, model="mock-slow")
    first = _open(api, started)
    head = [first.next() for _ in range(3)]
    first.close()
    if how == "header":
        second = _open(api, started, {"Last-Event-ID": "3"})
    else:
        second = EventStream(api.http, started["streamUrl"] + "&lastEventId=3")
    tail = second.until_done()
    second.close()
    events = head + tail
    assert [i for i, _ in events] == list(range(1, len(events) + 1))  # no loss, no duplicate
    assert text_of(events) == SLOW


def test_a_stream_opened_after_the_end_replays_the_whole_sequence(api: Api, redis_client: Any) -> None:
    user = api.register()
    started = api.generate(user, content=QUESTION)
    live = _open(api, started)
    events = live.until_done()
    live.close()
    replay = _open(api, started)
    assert replay.until_done() == events
    replay.close()
    resumed = _open(api, started, {"Last-Event-ID": str(len(events) - 2)})
    assert resumed.until_done() == events[-2:]
    resumed.close()
    # Once the buffer has expired: rebuilt from the database: one delta from id 1; Last-Event-ID ignored.
    redis_client.delete(f"generation:{started['generationId']}:events")
    rebuilt = _open(api, started, {"Last-Event-ID": "2"})
    got = rebuilt.until_done()
    rebuilt.close()
    assert [(i, e["type"]) for i, e in got] == [(1, "delta"), (2, "usage"), (3, "done")]
    assert got[0][1]["delta"] == QUESTION and got[1][1] == events[-2][1] and got[2][1] == events[-1][1]


def test_two_concurrent_readers_see_identical_sequences(api: Api) -> None:
    user = api.register()
    started = api.generate(user, content=SLOW, model="mock-slow")
    results: list[list[tuple[int, dict[str, Any]]]] = []

    def read(delay: float) -> None:
        time.sleep(delay)
        with httpx.Client(base_url=api.base_url, timeout=30) as client:
            stream = EventStream(client, started["streamUrl"])
            results.append(stream.until_done())
            stream.close()

    threads = [threading.Thread(target=read, args=(d,)) for d in (0, 0, 0.5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and results[0] == results[1] == results[2]
    assert text_of(results[0]) == SLOW


def test_twelve_parallel_creates_exactly_one_wins(api: Api, db: Any) -> None:
    user = api.register()
    chat = api.create_chat(user)
    barrier = threading.Barrier(12)
    replies: list[httpx.Response] = []

    def create() -> None:
        with httpx.Client(base_url=api.base_url, timeout=30) as client:
            barrier.wait()
            replies.append(
                client.post(
                    f"/api/chats/{chat['id']}/generations", headers=user.headers, json={"model": "mock-echo"}
                )
            )

    threads = [threading.Thread(target=create) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in replies if r.status_code == 201]
    losers = [r for r in replies if r.status_code != 201]
    assert len(winners) == 1
    winner = winners[0].json()["generationId"]
    for r in losers:
        assert assert_error(r, 409, "generation_in_flight")["generationId"] == winner
    assert db.execute("SELECT count(*) FROM generations").fetchone()[0] == 1


def test_the_next_generation_can_start_as_soon_as_done_is_seen(api: Api) -> None:
    user = api.register()
    chat = api.create_chat(user)
    for i in range(3):
        r = api.create_generation(user, chat["id"], content=f"turn {i}")
        assert r.status_code == 201, r.text
        stream = EventStream(api.http, r.json()["streamUrl"])
        stream.until_done()
        stream.close()
    messages = api.request("GET", f"/api/chats/{chat['id']}/messages", user=user).json()["items"]
    assert [m["content"] for m in messages] == ["turn 0", "turn 0", "turn 1", "turn 1", "turn 2", "turn 2"]


def test_a_lock_left_by_a_finished_generation_never_blocks(api: Api, redis_client: Any) -> None:
    user = api.register()
    started = api.generate(user, content=QUESTION)
    api.request("POST", f"/api/generations/{started['generationId']}/cancel", user=user)
    redis_client.set(limits.inflight_key(user.user_id), started["generationId"], px=60_000)
    assert api.create_generation(user, started["chat"]["id"], content="go").status_code == 201


def test_the_keep_alive_extends_only_locks_still_held_and_reads_every_cancel_flag(redis_client: Any) -> None:
    users = [str(uuid.uuid4()) for _ in range(4)]
    runs = [str(uuid.uuid4()) for _ in range(4)]
    flags = [f"test:{g}:cancel" for g in runs]
    redis_client.set(limits.inflight_key(users[0]), runs[0], px=1_000)
    redis_client.set(limits.inflight_key(users[1]), "another generation", px=1_000)  # taken over
    # users[2] holds no lock (released, or expired); users[3]'s run was canceled
    redis_client.set(limits.inflight_key(users[3]), runs[3], px=1_000)
    redis_client.set(flags[3], b"1")
    redis_client.set(flags[1], b"1")

    async def keep() -> list[bool]:
        client = redis.asyncio.Redis.from_url(os.environ["REDIS_URL"])
        try:
            return await limits.renew_runs_async(
                client, list(zip(users, runs, flags, strict=True)), ttl_ms=60_000
            )
        finally:
            await client.aclose()

    assert asyncio.run(keep()) == [False, True, False, True]
    assert redis_client.pttl(limits.inflight_key(users[0])) > 50_000
    assert redis_client.pttl(limits.inflight_key(users[3])) > 50_000
    assert redis_client.pttl(limits.inflight_key(users[1])) <= 1_000  # someone else's: untouched
    assert redis_client.get(limits.inflight_key(users[1])) == b"another generation"
    assert redis_client.exists(limits.inflight_key(users[2])) == 0  # never recreated


def test_a_cancel_whose_message_was_lost_is_found_and_locks_are_renewed_by_the_keep_alive(
    api: Api, redis_client: Any
) -> None:
    """The engine's keep-alive (every 5 s) renews the running generations' locks and reads their cancel
    flags: a flag set without its pub/sub message still stops the run."""
    long = " ".join(["word"] * 200)  # 40 s at mock-slow's 200 ms a word
    kept, stopped = api.register(), api.register()
    runs = [api.generate(user, content=long, model="mock-slow") for user in (kept, stopped)]
    streams = [_open(api, started) for started in runs]
    try:
        for stream in streams:
            assert stream.next()[1]["type"] == "delta"  # both running in this process
        redis_client.pexpire(limits.inflight_key(kept.user_id), 20_000)
        redis_client.set(generations.cancel_key(runs[1]["generationId"]), b"1", ex=60)  # no PUBLISH
        started = time.monotonic()
        events = streams[1].until_done()
        assert events[-1][1] == {"type": "done", "status": "canceled"}
        assert time.monotonic() - started < 9  # the next tick, within 5 s
        assert redis_client.pttl(limits.inflight_key(kept.user_id)) > 60_000  # renewed in the same tick
    finally:
        for stream in streams:
            stream.close()
        api.request("POST", f"/api/generations/{runs[0]['generationId']}/cancel", user=kept)


def test_the_keep_alive_of_more_runs_than_one_call_takes_keeps_their_order(redis_client: Any) -> None:
    runs = [(str(uuid.uuid4()), str(uuid.uuid4())) for _ in range(1_201)]
    flags = [f"test:{g}:cancel" for _, g in runs]
    for i, (user_id, generation_id) in enumerate(runs):
        redis_client.set(limits.inflight_key(user_id), generation_id, px=1_000)
        if i % 7 == 3:
            redis_client.set(flags[i], b"1")

    async def keep() -> list[bool]:
        client = redis.asyncio.Redis.from_url(os.environ["REDIS_URL"])
        try:
            triples = [(u, g, f) for (u, g), f in zip(runs, flags, strict=True)]
            return await limits.renew_runs_async(client, triples, ttl_ms=60_000)
        finally:
            await client.aclose()

    assert asyncio.run(keep()) == [i % 7 == 3 for i in range(len(runs))]
    assert min(redis_client.pttl(limits.inflight_key(u)) for u, _ in runs) > 50_000


def test_the_database_backstops_a_lost_redis_lock(api: Api, redis_client: Any) -> None:
    user = api.register()
    started = api.generate(user, content=QUESTION)
    redis_client.delete(limits.inflight_key(user.user_id))
    r = api.create_generation(user, started["chat"]["id"], content="second")
    assert assert_error(r, 409, "generation_in_flight")["generationId"] == started["generationId"]


def test_unknown_model_writes_nothing(api: Api, db: Any) -> None:
    user = api.register()
    chat = api.create_chat(user)
    error = assert_error(
        api.create_generation(user, chat["id"], content="hi", model="gpt-nope"), 400, "unknown_model"
    )
    assert "gpt-nope" in error["message"]
    assert db.execute("SELECT count(*) FROM generations").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM messages").fetchone()[0] == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"maxTokens": 0}, "maxTokens"),
        ({"maxTokens": 32_769}, "maxTokens"),
        ({"maxTokens": 1.5}, "maxTokens"),
        ({"systemPrompt": "s" * 8_001}, "systemPrompt"),
        ({"content": "   "}, "content"),
        ({"content": "x" * 32_001}, "content"),
        ({"status": "succeeded"}, "status"),
        ({"userId": str(uuid.uuid4())}, "userId"),
    ],
)
def test_generation_validation(api: Api, db: Any, body: dict[str, Any], field: str) -> None:
    user = api.register()
    chat = api.create_chat(user)
    assert (
        assert_error(api.create_generation(user, chat["id"], **body), 400, "validation_error")["field"]
        == field
    )
    assert db.execute("SELECT count(*) FROM generations").fetchone()[0] == 0


def test_stream_auth(api: Api) -> None:
    owner, other = api.register(), api.register()
    a = api.generate(owner, content=QUESTION)
    b = api.generate(other, content=QUESTION)
    path = f"/api/generations/{a['generationId']}/stream"
    assert_error(api.http.get(path), 401, "unauthorized")
    ticket_b = b["streamUrl"].split("ticket=")[1]
    assert_error(
        api.http.get(f"{path}?ticket={ticket_b}"), 401, "invalid_token"
    )  # another generation's ticket
    assert_error(api.http.get(f"{path}?ticket=garbage"), 401, "invalid_token")
    assert_error(api.http.get(path, headers=other.headers), 404, "not_found")
    assert_error(api.http.get("/api/generations/not-a-uuid/stream", headers=owner.headers), 404, "not_found")
    # The ticket is no access token, and an access token is no ticket.
    assert_error(
        api.http.get("/api/auth/me", headers={"Authorization": f"Bearer {ticket_b}"}), 401, "invalid_token"
    )
    assert_error(api.http.get(f"{path}?ticket={owner.access}"), 401, "invalid_token")
    stream = EventStream(api.http, path, owner.headers)  # the Bearer header works too
    assert stream.until_done()[-1][1]["status"] == "succeeded"
    stream.close()
    api.request("POST", f"/api/generations/{b['generationId']}/cancel", user=other)


def test_a_ticket_stops_opening_the_stream_ten_minutes_after_the_end(api: Api, db: Any) -> None:
    owner = api.register()
    started = api.generate(owner, content=QUESTION)
    stream = _open(api, started)
    stream.until_done()
    stream.close()
    db.execute(
        "UPDATE generations SET finished_at = now() - interval '9 minutes' WHERE id = %s",
        (started["generationId"],),
    )
    stream = _open(api, started)  # within the grace: the whole sequence again
    assert stream.until_done()[-1][1]["status"] == "succeeded"
    stream.close()
    db.execute(
        "UPDATE generations SET finished_at = now() - interval '11 minutes' WHERE id = %s",
        (started["generationId"],),
    )
    assert_error(api.http.get(started["streamUrl"]), 401, "invalid_token")
    path = f"/api/generations/{started['generationId']}/stream"
    stream = EventStream(api.http, path, owner.headers)  # an access token has no such limit
    assert stream.until_done()[-1][1]["status"] == "succeeded"
    stream.close()


def test_another_users_generation_is_not_found(api: Api, db: Any) -> None:
    owner, other = api.register(), api.register()
    started = api.generate(owner, content=QUESTION)
    gid = started["generationId"]
    assert_error(api.request("GET", f"/api/generations/{gid}", user=other), 404, "not_found")
    assert_error(api.request("POST", f"/api/generations/{gid}/cancel", user=other), 404, "not_found")
    assert_error(api.create_generation(other, started["chat"]["id"], content="x"), 404, "not_found")
    assert db.execute("SELECT status FROM generations").fetchall() == [("queued",)]
    api.request("POST", f"/api/generations/{gid}/cancel", user=owner)


def test_deleting_a_chat_ends_its_running_generation_first(api: Api, db: Any, redis_client: Any) -> None:
    user = api.register()
    started = api.generate(user, content=SLOW, model="mock-slow")
    stream = _open(api, started)
    stream.next()
    r = api.request("DELETE", f"/api/chats/{started['chat']['id']}", user=user)
    assert r.status_code == 204
    assert redis_client.get(limits.inflight_key(user.user_id)) is None
    other = api.create_chat(user)
    assert api.create_generation(user, other["id"], content="right away").status_code == 201
    assert stream.until_done()[-1][1]["type"] == "done"
    stream.close()
    # Usage already counted stays counted: the usage event outlives the chat.
    usage = db.execute("SELECT payload FROM outbox WHERE queue = 'usage_event'").fetchall()
    assert [p[0]["generationId"] for p in usage] == [started["generationId"]]


def test_deleting_a_chat_counts_the_tokens_of_a_run_that_cannot_answer(
    api: Api, db: Any, redis_client: Any, local_process: LocalProcess
) -> None:
    """Issue 11 item 8: the process running the generation is gone (killed mid-stream), so nobody answers
    the cancel; the deletion ends the generation itself and still counts what it consumed: the prompt
    and the text already streamed (read back from the event buffer), estimated."""
    local_process.start()
    remote = Api(local_process.base_url)
    user = api.register()
    started = api.generate(user, content=SLOW * 5, model="mock-slow")
    stream = _open(remote, started)  # the first connection: the run is in that process
    seen = [stream.next() for _ in range(3)]
    time.sleep(0.1)  # the buffer writer's batch
    local_process.kill()
    r = api.request("DELETE", f"/api/chats/{started['chat']['id']}", user=user)
    assert r.status_code == 204
    assert redis_client.get(limits.inflight_key(user.user_id)) is None
    usage = [p[0] for p in db.execute("SELECT payload FROM outbox WHERE queue = 'usage_event'").fetchall()]
    assert [u["generationId"] for u in usage] == [started["generationId"]]
    streamed = text_of(seen)
    assert usage[0]["estimated"] is True and usage[0]["inputTokens"] > 0
    assert usage[0]["outputTokens"] >= estimate_tokens(streamed) > 0
    audit = [p[0] for p in db.execute("SELECT payload FROM outbox WHERE queue = 'audit_event'").fetchall()]
    assert [a["action"] for a in audit][-2:] == ["generation.canceled", "chat.deleted"]


def test_models(api: Api) -> None:
    user = api.register()
    r = api.request("GET", "/api/models", user=user)
    assert r.status_code == 200
    ids = {m["id"]: m["provider"] for m in r.json()["items"]}
    assert {"mock-echo", "mock-slow", "mock-stall", "mock-error"} <= set(ids)
    assert ids["mock-echo"] == "mock"
    assert_error(api.http.get("/api/models"), 401, "unauthorized")


def test_openai_models_stream_through_minichat(api: Api, openai_stub: Any) -> None:
    from minichat_local.openai_stub import stub_text

    user = api.register()
    before = openai_stub.stats.requests
    started = api.generate(user, content="hello upstream", model="stub-tokens-12")
    stream = _open(api, started)
    events = stream.until_done()
    stream.close()
    assert text_of(events) == stub_text(12)
    usage = events[-2][1]
    assert usage["outputTokens"] == 12 and usage["estimated"] is False
    assert openai_stub.stats.requests == before + 1
    sent = openai_stub.stats.last_request
    assert sent["model"] == "stub-tokens-12" and sent["messages"][-1] == {
        "role": "user",
        "content": "hello upstream",
    }
    assert openai_stub.stats.last_authorization == "Bearer sk-test-not-a-real-key"


def test_openai_upstream_failure_is_a_provider_error_without_the_body(api: Api) -> None:
    user = api.register()
    started = api.generate(user, content="x", model="stub-error-500")
    stream = _open(api, started)
    events = stream.until_done()
    stream.close()
    error = events[-3][1]
    assert error["code"] == "provider_error" and "stub_error" not in error["message"]
    assert "sk-test" not in stream.raw.decode()


def test_two_first_connections_in_two_processes_make_one_model_call(
    api: Api, openai_stub: Any, database_url: str
) -> None:
    import os
    import subprocess
    import sys

    from conftest import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "minichat_local", "--port", str(port)],
        env=dict(os.environ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        other = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{other}/api/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "second process did not start"
            time.sleep(0.1)
        user = api.register()
        before = openai_stub.stats.requests
        started = api.generate(user, content="race", model="stub-tokens-30-rate-20")
        barrier = threading.Barrier(2)
        results: dict[str, list[tuple[int, dict[str, Any]]]] = {}

        def read(base: str) -> None:
            with httpx.Client(base_url=base, timeout=30) as client:
                barrier.wait()
                stream = EventStream(client, started["streamUrl"])
                results[base] = stream.until_done()
                stream.close()

        threads = [threading.Thread(target=read, args=(b,)) for b in (api.base_url, other)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results[api.base_url] == results[other]
        assert openai_stub.stats.requests == before + 1  # exactly one model call
    finally:
        proc.terminate()
        proc.wait(timeout=15)
