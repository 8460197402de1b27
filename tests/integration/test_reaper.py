"""The reaper: stale queued and orphaned streaming generations end `failed`, users are freed."""

from __future__ import annotations

from typing import Any

from helpers import Api, EventStream, assert_error
from minichat import buffer, limits
from minichat.reaper import reap
from minichat.sse import encode_event


def _queued(api: Api, user: Any) -> dict[str, Any]:
    chat = api.create_chat(user)
    r = api.request("POST", f"/api/chats/{chat['id']}/generations", user=user, json={"content": "hello"})
    assert r.status_code == 201
    return {"chat": chat, **r.json()}


def test_a_queued_generation_never_opened_is_failed_and_its_user_freed(
    api: Api, db: Any, redis_client: Any
) -> None:
    user = api.register()
    started = _queued(api, user)
    gid = started["generationId"]
    assert reap().as_dict() == {"streamNotOpened": 0, "workerLost": 0, "skipped": 0}  # not old enough yet
    db.execute("UPDATE generations SET created_at = now() - interval '61 seconds' WHERE id = %s", (gid,))
    assert reap().as_dict() == {"streamNotOpened": 1, "workerLost": 0, "skipped": 0}
    g = api.request("GET", f"/api/generations/{gid}", user=user).json()
    assert g["status"] == "failed" and g["errorCode"] == "stream_not_opened" and g["finishedAt"]
    assert redis_client.get(limits.inflight_key(user.user_id)) is None
    assert (
        api.request("POST", f"/api/chats/{started['chat']['id']}/generations", user=user, json={}).status_code
        == 201
    )
    assert reap().as_dict() == {
        "streamNotOpened": 0,
        "workerLost": 0,
        "skipped": 0,
    }  # terminal states never change


def test_an_orphaned_stream_is_failed_with_its_partial_answer(api: Api, db: Any, redis_client: Any) -> None:
    user = api.register()
    started = _queued(api, user)
    gid = started["generationId"]
    # A process claimed it, buffered two deltas, then died (no heartbeat for 31 s).
    db.execute(
        "UPDATE generations SET status = 'streaming', started_at = now() - interval '40 seconds',"
        " heartbeat_at = now() - interval '31 seconds' WHERE id = %s",
        (gid,),
    )
    key = buffer.key(gid)
    redis_client.xadd(key, {"f": encode_event(1, {"type": "delta", "delta": "Partial"})}, id="0-1")
    redis_client.xadd(key, {"f": encode_event(2, {"type": "delta", "delta": " answer"})}, id="0-2")
    assert reap().as_dict() == {"streamNotOpened": 0, "workerLost": 1, "skipped": 0}
    g = api.request("GET", f"/api/generations/{gid}", user=user).json()
    assert g["status"] == "failed" and g["errorCode"] == "worker_lost" and g["outputTokens"] > 0
    messages = api.request("GET", f"/api/chats/{started['chat']['id']}/messages", user=user).json()["items"]
    assert messages[-1]["role"] == "assistant" and messages[-1]["content"] == "Partial answer"
    # A follower sees the sequence completed: the buffered deltas, then error, usage, done.
    stream = EventStream(api.http, started["streamUrl"])
    events = stream.until_done()
    stream.close()
    assert [(i, e["type"]) for i, e in events] == [
        (1, "delta"),
        (2, "delta"),
        (3, "error"),
        (4, "usage"),
        (5, "done"),
    ]
    assert events[2][1]["code"] == "worker_lost" and events[4][1]["status"] == "failed"
    usage = db.execute("SELECT payload FROM outbox WHERE queue = 'usage_event'").fetchall()
    assert [p[0]["estimated"] for p in usage] == [True]


def test_a_live_heartbeat_is_never_reaped(api: Api, db: Any) -> None:
    user = api.register()
    started = _queued(api, user)
    db.execute(
        "UPDATE generations SET status = 'streaming', started_at = now() - interval '10 minutes',"
        " heartbeat_at = now() - interval '3 seconds', created_at = now() - interval '10 minutes'"
        " WHERE id = %s",
        (started["generationId"],),
    )
    assert reap().as_dict() == {"streamNotOpened": 0, "workerLost": 0, "skipped": 0}
    r = api.request("POST", f"/api/chats/{started['chat']['id']}/generations", user=user, json={})
    assert_error(r, 409, "generation_in_flight")
    db.execute(
        "UPDATE generations SET status = 'canceled', finished_at = now() WHERE id = %s",
        (started["generationId"],),
    )
