"""Test helpers for the HTTP API: a thin client (with generation shortcuts), SSE reading, assertions."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis

BROKER_URL = os.environ["RABBITMQ_URL"]  # the tests' own vhost (tests/conftest.py)
VHOST = BROKER_URL.rsplit("/", 1)[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


@dataclass
class Account:
    email: str
    password: str
    user_id: str
    access: str
    refresh: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access}"}


class Api:
    """A thin client for the tests: plain httpx, plus register/login shortcuts."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.http = httpx.Client(base_url=base_url, timeout=30)

    def request(
        self, method: str, path: str, *, user: Account | None = None, **kwargs: Any
    ) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}) or {})
        if user is not None:
            headers.update(user.headers)
        return self.http.request(method, path, headers=headers, **kwargs)

    def register(self, email: str | None = None, password: str = "correct horse battery") -> Account:
        email = email or f"user-{uuid.uuid4().hex[:12]}@example.com"
        r = self.http.post("/api/auth/register", json={"email": email, "password": password})
        assert r.status_code == 201, r.text
        body = r.json()
        return Account(email, password, body["user"]["id"], body["accessToken"], body["refreshToken"])

    def create_chat(self, user: Account, title: str | None = None) -> dict[str, Any]:
        r = self.request("POST", "/api/chats", user=user, json={} if title is None else {"title": title})
        assert r.status_code == 201, r.text
        return dict(r.json())

    def generation(self, user: Account, generation_id: str) -> dict[str, Any]:
        """GET /api/generations/{generation_id}, asserting it is there."""
        r = self.request("GET", f"/api/generations/{generation_id}", user=user)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def create_generation(
        self, user: Account, chat_id: str, *, headers: dict[str, str] | None = None, **body: Any
    ) -> httpx.Response:
        """POST /api/chats/{chat_id}/generations with `body` as it is; the reply, whatever it is."""
        return self.request(
            "POST", f"/api/chats/{chat_id}/generations", user=user, json=body, headers=headers
        )

    def generate(
        self, user: Account, chat_id: str | None = None, *, until_done: bool = False, **body: Any
    ) -> dict[str, Any]:
        """Create a generation (in a new chat when `chat_id` is None) and assert it was created: its reply
        (generationId, generation, streamUrl) plus `chat` (a new chat, or just its id). `until_done`: also
        follow its stream (by its streamUrl) to `done`, the events in `events`."""
        chat = self.create_chat(user) if chat_id is None else {"id": chat_id}
        r = self.create_generation(user, chat["id"], **body)
        assert r.status_code == 201, r.text
        created: dict[str, Any] = {"chat": chat, **r.json()}
        if until_done:
            stream = EventStream(self.http, created["streamUrl"])
            try:
                created["events"] = stream.until_done()
            finally:
                stream.close()
        return created


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The contract's envelope, with the request id echoed in the header."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert error["code"] == code, body
    assert error["message"]
    assert error["requestId"] == response.headers["x-request-id"]
    return dict(error)


class EventStream:
    """An open SSE response read event by event (the test's own EventSource)."""

    def __init__(self, client: httpx.Client, url: str, headers: dict[str, str] | None = None) -> None:
        self._cm = client.stream("GET", url, headers=headers or {}, timeout=httpx.Timeout(30, read=20))
        self.response = self._cm.__enter__()
        self.raw = b""
        self._pending = b""
        self._chunks = self.response.iter_raw()

    def next(self) -> tuple[int, dict[str, Any]]:
        """The next event as (id, data); comments are skipped."""
        while b"\n\n" not in self._pending:
            chunk = next(self._chunks)
            self.raw += chunk
            self._pending += chunk
        frame, self._pending = self._pending.split(b"\n\n", 1)
        lines = [ln for ln in frame.decode().split("\n") if not ln.startswith(":")]
        if not lines:
            return self.next()
        event_id = int(lines[0].removeprefix("id: "))
        assert lines[1].startswith("data: ") and len(lines) == 2, frame
        return event_id, json.loads(lines[1].removeprefix("data: "))

    def until_done(self) -> list[tuple[int, dict[str, Any]]]:
        events = []
        while True:
            event = self.next()
            events.append(event)
            if event[1]["type"] == "done":
                return events

    def close(self) -> None:
        self._cm.__exit__(None, None, None)


def text_of(events: list[tuple[int, dict[str, Any]]]) -> str:
    return "".join(e["delta"] for _, e in events if e["type"] == "delta")


class LocalProcess:
    """`python -m minichat_local` as a user runs it (relay, reaper and consumer included), on a given port."""

    def __init__(self, port: int, log_path: Path, **env: str) -> None:
        self.port = port
        self.log_path = log_path
        self.env = dict(os.environ, MINICHAT_LOG_LEVEL="WARNING", **env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.base_url = f"http://127.0.0.1:{port}"

    def start(self, timeout: float = 30) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "minichat_local", "--port", str(self.port)],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.base_url}/api/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, "local mode did not become healthy\n" + self.log()
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL the process (its workers die with it); returns once nothing listens on the port."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            except OSError:
                return
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""


def daily_usage_matches_events(db: Any) -> bool:
    """The contract's invariant: daily_usage equals the sum of usage_events per user and UTC day."""
    daily = db.execute(
        "SELECT user_id, day, input_tokens, output_tokens FROM daily_usage ORDER BY 1, 2"
    ).fetchall()
    summed = db.execute(
        "SELECT user_id, (occurred_at AT TIME ZONE 'UTC')::date, sum(input_tokens), sum(output_tokens)"
        " FROM usage_events GROUP BY 1, 2 ORDER BY 1, 2"
    ).fetchall()
    return bool(daily == summed)


def assert_usage_invariant(db: Any) -> None:
    """daily_usage == sum(usage_events) per user and day, and one usage event per generation."""
    assert daily_usage_matches_events(db)
    dupes = db.execute("SELECT count(*) - count(DISTINCT generation_id) FROM usage_events").fetchone()[0]
    assert dupes == 0


@contextmanager
def database_refusing(db: Any, *, table: str, event: str, condition: str) -> Iterator[None]:
    """While inside: the database refuses (RAISE) every `event` (INSERT, UPDATE) on `table` whose row
    matches `condition` (PL/pgSQL over NEW): a failure that is not an outage."""
    db.execute(
        f"""
        CREATE OR REPLACE FUNCTION test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF {condition} THEN
            RAISE EXCEPTION 'refused by the test';
          END IF;
          RETURN NEW;
        END $$;
        CREATE TRIGGER test_refuse BEFORE {event} ON {table} FOR EACH ROW EXECUTE FUNCTION test_refuse();
        """
    )
    try:
        yield
    finally:
        db.execute(f"DROP TRIGGER IF EXISTS test_refuse ON {table}; DROP FUNCTION IF EXISTS test_refuse();")


class OwnRedis:
    """A throwaway redis-server (no persistence): stopped and started again by the test."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        client = self.client()
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)
