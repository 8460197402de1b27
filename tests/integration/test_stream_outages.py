"""Issue 11 items 3, 5 and 9: streams across processes and through Redis trouble.

Each test runs local-mode processes against a redis-server of its own (started here on a free port, so
stopping it or making its writes fail touches nobody else), the test database and the test broker vhost.
"""

from __future__ import annotations

import itertools
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import free_port
from helpers import Api, EventStream, LocalProcess, OwnRedis, text_of


def _local(tmp_path: Path, name: str, own_redis: OwnRedis, **env: str) -> LocalProcess:
    return LocalProcess(free_port(), tmp_path / f"{name}.log", REDIS_URL=own_redis.url, **env)


@pytest.fixture
def processes(
    database_url: str, broker_vhost: str, db: Any, redis_client: Any, tmp_path: Path, own_redis: OwnRedis
) -> Iterator[list[LocalProcess]]:
    """Local-mode processes the test starts; all stopped (and their logs shown) afterwards."""
    started: list[LocalProcess] = []
    try:
        yield started
    finally:
        for process in started:
            process.stop()
            print(f"--- {process.log_path.name}\n{process.log()}")


def _two_processes(
    processes: list[LocalProcess], tmp_path: Path, own_redis: OwnRedis, **env: str
) -> tuple[LocalProcess, LocalProcess]:
    """Two single-worker local-mode processes on the same database and Redis: one runs the generation
    (the first stream connection goes to it), the other has a reader that follows the event buffer."""
    pair = [_local(tmp_path, name, own_redis, MINICHAT_WORKERS="1", **env) for name in ("runner", "follower")]
    processes += pair
    for process in pair:
        process.start()
    return pair[0], pair[1]


def _read_all(client: httpx.Client, url: str, out: dict[str, Any]) -> None:
    stream = EventStream(client, url)
    try:
        out["events"] = stream.until_done()
    finally:
        out["ended"] = time.monotonic()
        stream.close()


def _follow(base_url: str, url: str, out: dict[str, Any]) -> None:
    """An EventSource's way: reconnect with Last-Event-ID whenever the stream breaks, until `done`."""
    events: list[tuple[int, dict[str, Any]]] = []
    reconnects = 0
    with httpx.Client(base_url=base_url, timeout=30) as client:
        while not events or events[-1][1]["type"] != "done":
            headers = {"Last-Event-ID": str(events[-1][0])} if events else None
            try:
                stream = EventStream(client, url, headers)
                try:
                    while not events or events[-1][1]["type"] != "done":
                        events.append(stream.next())
                finally:
                    stream.close()
            except (httpx.HTTPError, StopIteration):
                reconnects += 1
                time.sleep(1)
    out["events"], out["reconnects"] = events, reconnects


def _ms(values: list[float]) -> str:
    return f"median {statistics.median(values) * 1000:.1f} ms, max {max(values) * 1000:.1f} ms"


# --- item 3 --------------------------------------------------------------------------------------------

WORDS = 300  # mock-slow: 200 ms a word, about 60 s a generation
OUTAGE_S = 45.0


def test_redis_stopped_for_45_s_while_10_generations_stream(
    processes: list[LocalProcess], own_redis: OwnRedis, db: Any, tmp_path: Path
) -> None:
    process = _local(tmp_path, "local", own_redis)
    follower = _local(tmp_path, "follower", own_redis, MINICHAT_WORKERS="1")
    processes += [process, follower]
    process.start()
    follower.start()
    api = Api(process.base_url)
    users = [api.register() for _ in range(11)]
    chats = [api.create_chat(u) for u in users]
    other, other_chat = users[10], chats[10]

    baseline: list[float] = []  # creates with Redis up (each run to its end, so the next may start)
    for _ in range(5):
        t0 = time.perf_counter()
        r = api.create_generation(other, other_chat["id"], content="baseline", model="mock-echo")
        baseline.append(time.perf_counter() - t0)
        assert r.status_code == 201, r.text
        stream = EventStream(api.http, r.json()["streamUrl"])
        stream.until_done()
        stream.close()

    content = " ".join(f"w{i}" for i in range(WORDS))
    started = []
    for user, chat in zip(users[:10], chats[:10], strict=True):
        r = api.create_generation(user, chat["id"], content=content, model="mock-slow")
        assert r.status_code == 201, r.text
        started.append(r.json())
    results: list[dict[str, Any]] = [{} for _ in started]
    clients = [httpx.Client(base_url=api.base_url, timeout=30) for _ in started]
    readers = [
        threading.Thread(target=_read_all, args=(c, s["streamUrl"], out), daemon=True)
        for c, s, out in zip(clients, started, results, strict=True)
    ]
    t_start = time.monotonic()
    for reader in readers:
        reader.start()
    time.sleep(1)
    # A reader of each in another process too: it follows the event buffer in Redis, reconnecting.
    followed: list[dict[str, Any]] = [{} for _ in started]
    followers = [
        threading.Thread(target=_follow, args=(follower.base_url, s["streamUrl"], out), daemon=True)
        for s, out in zip(started, followed, strict=True)
    ]
    for thread in followers:
        thread.start()
    time.sleep(2)

    own_redis.stop()
    t_down = time.monotonic()
    time.sleep(1)
    during: list[float] = []
    statuses = []
    for _ in range(5):
        t0 = time.perf_counter()
        r = api.create_generation(other, other_chat["id"], content="during the outage", model="mock-echo")
        during.append(time.perf_counter() - t0)
        statuses.append(r.status_code)
        time.sleep(0.5)
    time.sleep(max(0.0, t_down + OUTAGE_S - time.monotonic()))
    own_redis.start()
    t_up = time.monotonic()

    for reader in [*readers, *followers]:
        reader.join(timeout=120)
    for client in clients:
        client.close()
    durations = [out["ended"] - t_start for out in results]
    print(
        f"\nRedis down {t_up - t_down:.1f} s while 10 generations streamed;"
        f" creates during the outage: {statuses}, {_ms(during)}"
        f" (baseline with Redis up: {_ms(baseline)});"
        f" generations took {min(durations):.1f}-{max(durations):.1f} s"
        f" (baseline: {WORDS - 1} words 200 ms apart = {(WORDS - 1) * 0.2:.1f} s);"
        f" readers in another process reconnected {sum(f['reconnects'] for f in followed)} times in all"
    )
    assert statuses == [503] * 5
    assert max(during) < 1.0  # quickly, not after a long timeout
    for out, elsewhere in zip(results, followed, strict=True):
        events = out["events"]
        assert [i for i, _ in events] == list(range(1, len(events) + 1))
        assert events[-1][1] == {"type": "done", "status": "succeeded"}, events[-3:]
        assert text_of(events) == content
        # Nothing lost for the reader elsewhere either (the buffer Redis lost was written again).
        assert elsewhere["reconnects"] > 0 and elsewhere["events"] == events
    ids = [s["generationId"] for s in started]
    rows = db.execute(
        "SELECT g.status, g.output_tokens, m.content FROM generations g"
        " LEFT JOIN messages m ON m.generation_id = g.id WHERE g.id = ANY(%s)",
        (ids,),
    ).fetchall()
    assert [(r[0], r[1], r[2] == content) for r in rows] == [("succeeded", WORDS, True)] * 10
    # Counted: the worker wrote every usage event (broker and worker do not need Redis).
    deadline = time.monotonic() + 30
    while True:
        counted = db.execute(
            "SELECT count(*), coalesce(sum(output_tokens), 0) FROM usage_events"
            " WHERE generation_id = ANY(%s)",
            (ids,),
        ).fetchone()
        if counted[0] == 10 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert tuple(counted) == (10, 10 * WORDS)
    in_flight = db.execute(
        "SELECT count(*) FROM generations WHERE status IN ('queued', 'streaming')"
    ).fetchone()
    assert in_flight[0] == 0
    # And generations work again.
    assert (
        api.create_generation(other, other_chat["id"], content="after", model="mock-echo").status_code == 201
    )


# --- item 5 --------------------------------------------------------------------------------------------


def test_a_reader_in_another_process_gets_every_event_once_when_buffer_writes_fail(
    processes: list[LocalProcess], own_redis: OwnRedis, tmp_path: Path
) -> None:
    runner, follower = _two_processes(processes, tmp_path, own_redis)
    api = Api(runner.base_url)
    user = api.register()
    chat = api.create_chat(user)
    content = " ".join(f"w{i}" for i in range(40))  # mock-slow: about 8 s
    r = api.create_generation(user, chat["id"], content=content, model="mock-slow")
    url = r.json()["streamUrl"]
    here = EventStream(api.http, url)  # the first connection: the run is in `runner`
    first = here.next()
    there: dict[str, Any] = {}
    with httpx.Client(base_url=follower.base_url, timeout=30) as client:
        reader = threading.Thread(target=_read_all, args=(client, url, there), daemon=True)
        reader.start()
        time.sleep(1.5)
        # Every write to Redis fails (OOM) for 2.5 s; reads still work.
        admin = own_redis.client()
        admin.config_set("maxmemory", 1)
        time.sleep(2.5)
        admin.config_set("maxmemory", 0)
        admin.close()
        local = [first, *here.until_done()]
        here.close()
        reader.join(timeout=30)
    remote = there["events"]
    print(f"\n{len(local)} events; the follower in the other process got {len(remote)}")
    assert [i for i, _ in local] == list(range(1, len(local) + 1))
    assert remote == local  # every event, once, in order
    assert text_of(remote) == content
    assert "event buffer write failed" in runner.log()  # the writes did fail (and were retried)


# --- item 9 --------------------------------------------------------------------------------------------


def _chunk_times(client: httpx.Client, url: str, seconds: float, out: dict[str, Any]) -> None:
    """When each chunk arrived (from the request on), until `done` or `seconds`."""
    opened = time.monotonic()
    times = [opened]
    body = b""
    with client.stream("GET", url, timeout=httpx.Timeout(30, read=25)) as response:
        for chunk in response.iter_raw():
            times.append(time.monotonic())
            body += chunk
            if b'"type":"done"' in body or times[-1] - opened > seconds:
                break
    out["gaps"] = [b - a for a, b in itertools.pairwise(times)]
    out["body"] = body


def test_pings_reach_a_reader_in_another_process_at_least_every_15_s(
    processes: list[LocalProcess], own_redis: OwnRedis, tmp_path: Path
) -> None:
    runner, follower = _two_processes(processes, tmp_path, own_redis, MINICHAT_PROVIDER_IDLE_TIMEOUT="300")
    api = Api(runner.base_url)
    user = api.register()
    chat = api.create_chat(user)
    r = api.create_generation(user, chat["id"], content="one word then silence", model="mock-stall")
    url = r.json()["streamUrl"]
    here: dict[str, Any] = {}
    there: dict[str, Any] = {}
    with (
        httpx.Client(base_url=runner.base_url) as near,
        httpx.Client(base_url=follower.base_url) as far,
    ):
        first = threading.Thread(target=_chunk_times, args=(near, url, 47, here))
        first.start()
        time.sleep(0.5)  # the run starts in `runner`; the follower reads the buffer
        second = threading.Thread(target=_chunk_times, args=(far, url, 46, there))
        second.start()
        first.join(60)
        second.join(60)
    api.request("POST", f"/api/generations/{r.json()['generationId']}/cancel", user=user)
    print(
        f"\nlongest silence for a reader in the other process: {max(there['gaps']):.2f} s"
        f" (pings: {there['body'].count(b': ping')});"
        f" baseline, a reader in the running process: {max(here['gaps']):.2f} s"
        f" (pings: {here['body'].count(b': ping')})"
    )
    assert b'"type":"delta"' in there["body"] and there["body"].count(b": ping") >= 3
    assert max(there["gaps"]) <= 15.0
    assert max(here["gaps"]) <= 15.0
