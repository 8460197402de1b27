"""The HTTP edge: request ids, body limits, malformed input, unknown routes, health."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from helpers import Api, assert_error
from minichat import kv
from minichat.config import get_settings, set_settings


def test_request_id_is_echoed_or_made(api: Api) -> None:
    r = api.http.get("/api/health", headers={"X-Request-Id": "abc-123_x.y"})
    assert r.headers["x-request-id"] == "abc-123_x.y"
    for bad in ["a" * 129, "has space", "semi;colon", "ünï"]:
        r = api.http.get("/api/auth/me", headers={"X-Request-Id": bad.encode("utf-8")})
        rid = r.headers["x-request-id"]
        assert rid != bad and 1 <= len(rid) <= 128
        assert r.json()["error"]["requestId"] == rid
    assert api.http.get("/api/chats").headers["x-request-id"]


def test_error_envelope_carries_the_request_id(api: Api) -> None:
    r = api.http.get("/api/auth/me", headers={"X-Request-Id": "trace-42"})
    assert assert_error(r, 401, "unauthorized")["requestId"] == "trace-42"


def test_body_over_256_kib_is_413_before_parsing(api: Api, db: Any) -> None:
    body = json.dumps({"email": "big@example.com", "password": "x" * (256 * 1024)})
    assert_error(api.http.post("/api/auth/register", content=body), 413, "payload_too_large")

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
        for _ in range(300):
            yield b"x" * 1024

    assert_error(api.http.post("/api/auth/register", content=chunked()), 413, "payload_too_large")
    assert db.execute("SELECT count(*) FROM users").fetchone()[0] == 0


def test_body_at_the_limit_is_parsed(api: Api) -> None:
    user = api.register()
    body = json.dumps({"title": "t"}) + " " * (256 * 1024 - 20)
    r = api.request("POST", "/api/chats", user=user, content=body)
    assert r.status_code == 201, r.text


def test_deeply_nested_json_is_refused(api: Api) -> None:
    body = '{"email": ' + "[" * 5000 + "]" * 5000 + "}"
    r = api.http.post("/api/auth/register", content=body)
    assert_error(r, 400, "validation_error")
    r = api.http.post("/api/auth/register", content='{"email": ' + "[" * 40 + "]" * 40 + "}")
    assert_error(r, 400, "validation_error")


def test_unknown_route_and_wrong_method(api: Api) -> None:
    assert_error(api.http.get("/api/nothing-here"), 404, "not_found")
    assert_error(api.http.get("/api/chats/x/y/z"), 404, "not_found")
    r = api.http.put("/api/chats")
    assert_error(r, 405, "method_not_allowed")
    assert "GET" in r.headers["allow"] and "POST" in r.headers["allow"]


def test_health_reports_each_service(api: Api) -> None:
    r = api.http.get("/api/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "checks": {"database": "ok", "redis": "ok", "broker": "ok"}}


@pytest.fixture
def redis_down() -> Iterator[None]:
    original = get_settings()
    kv.close_redis()
    set_settings(
        original.with_(redis_url="redis://127.0.0.1:1/0", rabbitmq_url="amqp://guest:guest@127.0.0.1:1/%2F")
    )
    yield
    kv.close_redis()
    set_settings(original)


def test_health_degraded_names_the_failing_checks(api: Api, redis_down: None) -> None:
    r = api.http.get("/api/health")
    assert r.status_code == 503
    assert r.json() == {
        "status": "degraded",
        "checks": {"database": "ok", "redis": "unavailable", "broker": "unavailable"},
    }
    # Auth and chats do not need Redis: they keep working.
    user = api.register()
    assert api.request("GET", "/api/chats", user=user).status_code == 200


def test_header_injection_in_request_id_is_not_reflected(api: Api) -> None:
    with httpx.Client(base_url=api.base_url) as client:
        r = client.get("/api/health", headers={"X-Request-Id": "abc\tSet-Cookie: x=1"})
    assert "set-cookie" not in r.headers
    assert r.headers["x-request-id"] != "abc\tSet-Cookie: x=1"
