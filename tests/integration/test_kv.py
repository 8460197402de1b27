"""kv.run_script: the per-thread EVALSHA path the rate limits take on every request (real Redis)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import redis

from minichat import kv, limits
from minichat.config import set_settings

COUNTER = kv.Script("return redis.call('INCRBY', KEYS[1], ARGV[1])")


@pytest.fixture(autouse=True)
def fresh_client(redis_client: Any) -> Any:
    set_settings(None)
    kv.close_redis()
    yield
    set_settings(None)  # a test may have pointed the settings elsewhere
    kv.close_redis()


def test_a_script_redis_has_never_seen_is_loaded_on_first_use(redis_client: Any) -> None:
    redis_client.script_flush()
    assert kv.run_script(COUNTER, ["kv:count"], [2]) == 2
    assert redis_client.script_exists(COUNTER.sha) == [True]
    redis_client.script_flush()  # e.g. a Redis restart or failover: EVALSHA says NOSCRIPT
    assert kv.run_script(COUNTER, ["kv:count"], [3]) == 5


def test_a_killed_connection_is_replaced(redis_client: Any) -> None:
    assert kv.run_script(COUNTER, ["kv:count"], [1]) == 1
    killed = redis_client.client_kill_filter(_type="normal", skipme=True)
    assert killed >= 1
    assert kv.run_script(COUNTER, ["kv:count"], [1]) == 2


def test_each_thread_counts_on_its_own_connection(redis_client: Any) -> None:
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            for _ in range(200):
                kv.run_script(COUNTER, ["kv:count"], [1])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert int(redis_client.get("kv:count")) == 1600


def test_script_errors_are_redis_errors(redis_client: Any) -> None:
    redis_client.set("kv:count", "not a number")
    with pytest.raises(redis.ResponseError):
        kv.run_script(COUNTER, ["kv:count"], [1])
    assert kv.run_script(COUNTER, ["kv:other"], [1]) == 1  # the connection is still usable


def test_unreachable_redis_raises_a_connection_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    set_settings(None)
    kv.close_redis()
    with pytest.raises(redis.ConnectionError):
        limits.hit(bucket="api", key="someone", rate=limits.Rate(10, 60))
