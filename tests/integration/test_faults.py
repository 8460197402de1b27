"""Fault tests: a killed stream process, PostgreSQL and Redis restarted mid-stream, a stalling model.

Each restarts a real service of this machine, so they run one at a time and put it back in `finally`.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psycopg

from helpers import Account, Api, EventStream, LocalProcess, assert_error


def _pg_cluster() -> str:
    return sorted(p.name for p in Path("/etc/postgresql").iterdir())[0]


def _restart_postgres() -> None:
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", _pg_cluster(), "main", "restart", "-m", "fast"],
        check=True,
        capture_output=True,
        timeout=120,
    )


def _restart_redis() -> None:
    subprocess.run(["redis-cli", "shutdown", "nosave"], capture_output=True, timeout=30, check=False)
    time.sleep(0.5)
    subprocess.run(
        [
            "redis-server",
            "--daemonize",
            "yes",
            "--bind",
            "127.0.0.1",
            "--port",
            "6379",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    for _ in range(100):
        if (
            subprocess.run(["redis-cli", "ping"], capture_output=True, timeout=5, check=False).stdout.strip()
            == b"PONG"
        ):
            return
        time.sleep(0.1)
    raise RuntimeError("redis did not come back")


class Traffic:
    """A steady background load of REST calls; records every status (a transport error counts as 0)."""

    def __init__(self, base_url: str, user: Account, chat_id: str) -> None:
        self.statuses: Counter[int] = Counter()
        self.bodies_500: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(base_url, user, chat_id), daemon=True)

    def _run(self, base_url: str, user: Account, chat_id: str) -> None:
        with httpx.Client(base_url=base_url, timeout=10) as client:
            while not self._stop.is_set():
                for method, path in (("GET", "/api/chats"), ("GET", f"/api/chats/{chat_id}/messages")):
                    try:
                        r = client.request(method, path, headers=user.headers)
                        self.statuses[r.status_code] += 1
                        if r.status_code >= 500 and r.status_code != 503:
                            self.bodies_500.append(r.text)
                        if r.status_code == 503:
                            assert r.json()["error"]["code"] == "service_unavailable"
                    except httpx.TransportError:
                        self.statuses[0] += 1
                time.sleep(0.02)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)


def _wait_ok(api: Api, user: Account, timeout: float = 30) -> float:
    started = time.monotonic()
    while True:
        try:
            if api.request("GET", "/api/chats", user=user).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        assert time.monotonic() - started < timeout, "no recovery"
        time.sleep(0.2)


def test_stream_process_killed_mid_generation(local_process: LocalProcess, database_url: str) -> None:
    local_process.start()
    api = Api(local_process.base_url)
    user = api.register()
    chat = api.create_chat(user)
    words = " ".join(f"w{i}" for i in range(200))
    r = api.create_generation(user, chat["id"], content=words, model="mock-slow")
    assert r.status_code == 201
    generation_id = r.json()["generationId"]
    stream = EventStream(api.http, r.json()["streamUrl"])
    stream.next()
    stream.next()
    killed_at = time.monotonic()
    local_process.kill()  # SIGKILL: no drain, no goodbye
    local_process.start()  # a supervisor restarts it; its reaper finds the orphan
    while True:
        g = api.request("GET", f"/api/generations/{generation_id}", user=user).json()
        if g["status"] != "streaming":
            break
        assert time.monotonic() - killed_at < 90, "still streaming 90 s after the kill"
        time.sleep(0.5)
    freed_after = time.monotonic() - killed_at
    assert g["status"] == "failed" and g["errorCode"] == "worker_lost"
    r = api.create_generation(user, chat["id"], content="again")
    assert r.status_code == 201, r.text
    print(f"user free again {freed_after:.1f} s after SIGKILL")
    # The partial answer was recovered from the event buffer.
    messages = api.request("GET", f"/api/chats/{chat['id']}/messages", user=user).json()["items"]
    assistant = [m for m in messages if m["role"] == "assistant"]
    assert assistant and words.startswith(assistant[0]["content"])
    with psycopg.connect(database_url) as conn:
        stuck = conn.execute(
            "SELECT count(*) FROM generations WHERE status = 'streaming' AND id = %s", (generation_id,)
        ).fetchone()
        assert stuck is not None and stuck[0] == 0
    stream.close()


def test_postgres_restart_mid_stream(local_mode: Api) -> None:
    api = local_mode
    user = api.register()
    chat = api.create_chat(user)
    api.request("POST", f"/api/chats/{chat['id']}/messages", user=user, json={"content": "hello"})
    r = api.create_generation(user, chat["id"], content="a b c d e f g h i j", model="mock-slow")
    stream = EventStream(api.http, r.json()["streamUrl"])
    stream.next()
    with Traffic(api.base_url, user, chat["id"]) as traffic:
        time.sleep(0.5)
        _restart_postgres()
        recovered = _wait_ok(api, user)
        time.sleep(0.5)
    assert traffic.bodies_500 == [], traffic.bodies_500[:3]
    assert set(traffic.statuses) <= {200, 503}, traffic.statuses
    assert traffic.statuses[200] > 0
    print(f"statuses during the restart: {dict(traffic.statuses)}; recovered in {recovered:.1f} s")
    # The generation that was streaming through the restart still ends, persisted.
    events = stream.until_done()
    stream.close()
    assert events[-1][1]["type"] == "done"
    g = api.request("GET", f"/api/generations/{r.json()['generationId']}", user=user).json()
    assert g["status"] in {"succeeded", "failed"} and g["finishedAt"]
    assert api.create_generation(user, chat["id"], content="next").status_code == 201


def test_redis_restart_mid_stream(local_mode: Api) -> None:
    api = local_mode
    user = api.register()
    chat = api.create_chat(user)
    r = api.create_generation(user, chat["id"], content="a b c d e f g h", model="mock-slow")
    stream = EventStream(api.http, r.json()["streamUrl"])
    stream.next()
    with Traffic(api.base_url, user, chat["id"]) as traffic:
        time.sleep(0.3)
        _restart_redis()
        time.sleep(1.0)
    assert traffic.bodies_500 == [] and set(traffic.statuses) <= {200, 503}, traffic.statuses
    events = stream.until_done()  # the local reader never needed Redis
    stream.close()
    assert events[-1][1] == {"type": "done", "status": "succeeded"}
    # Full recovery without restarting MiniChat: generations work again.
    deadline = time.monotonic() + 20
    while True:
        r = api.create_generation(user, chat["id"], content="again")
        if r.status_code == 201:
            break
        assert_error(r, 503, "service_unavailable")
        assert time.monotonic() < deadline
        time.sleep(0.2)
    stream = EventStream(api.http, r.json()["streamUrl"])
    assert stream.until_done()[-1][1]["status"] == "succeeded"
    stream.close()


def test_a_stalling_upstream_model_times_out_and_frees_the_user(api: Api, openai_stub: Any) -> None:
    user = api.register()
    chat = api.create_chat(user)
    r = api.create_generation(user, chat["id"], content="hi", model="stub-stall-after-2")
    started = time.monotonic()
    stream = EventStream(api.http, r.json()["streamUrl"])
    events = stream.until_done()
    stream.close()
    assert time.monotonic() - started < 10
    kinds = [e["type"] for _, e in events]
    assert kinds == ["delta", "error", "usage", "done"] or kinds == [
        "delta",
        "delta",
        "error",
        "usage",
        "done",
    ]
    assert events[-3][1]["code"] == "provider_timeout" and events[-1][1]["status"] == "failed"
    assert api.create_generation(user, chat["id"]).status_code == 201
