"""kv.run_script (the per-thread EVALSHA path the rate limits take on every request) and kv.Coalescing (the
stream function's small commands, sent together), against real Redis."""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import pytest
import redis
import redis.asyncio

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


# --- kv.Coalescing: the stream function's small commands, sent together -----------------------------


def _coalescing(url: str, body: Any) -> Any:
    async def main() -> Any:
        client = redis.asyncio.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
        round_trips = 0
        pipeline = client.pipeline

        def counted(**kwargs: Any) -> Any:
            nonlocal round_trips
            round_trips += 1
            return pipeline(**kwargs)

        client.pipeline = counted  # type: ignore[method-assign]
        try:
            return await body(kv.Coalescing(client)), round_trips
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_commands_asked_together_share_round_trips_and_each_gets_its_reply(redis_client: Any) -> None:
    for i in range(0, 200, 2):
        redis_client.set(f"kv:flag:{i}", b"1")

    async def body(commands: kv.Coalescing) -> list[Any]:
        return list(
            await asyncio.gather(
                *(commands.exists(f"kv:flag:{i}") for i in range(200)),
                *(kv.run_script_async(commands, COUNTER, ["kv:count"], [1]) for _ in range(50)),
            )
        )

    replies, round_trips = _coalescing(os.environ["REDIS_URL"], body)
    assert replies[:200] == [1 - i % 2 for i in range(200)]
    assert sorted(replies[200:]) == list(range(1, 51))  # each increment's own result
    assert 1 <= round_trips <= 3, round_trips  # not 250


def test_a_command_alone_goes_at_once_and_a_failing_one_fails_only_its_caller(redis_client: Any) -> None:
    redis_client.script_flush()  # EVALSHA says NOSCRIPT: run_script_async sends the text
    redis_client.set("kv:text", "not a sorted set")

    async def body(commands: kv.Coalescing) -> list[Any]:
        async with asyncio.timeout(1):
            alone = await commands.exists("kv:text")
        outcomes = await asyncio.gather(
            commands.zrem("kv:text", "x"),  # WRONGTYPE
            kv.run_script_async(commands, COUNTER, ["kv:count"], [5]),
            commands.exists("kv:text"),
            return_exceptions=True,
        )
        return [alone, *outcomes]

    (alone, wrong, counted, exists), _ = _coalescing(os.environ["REDIS_URL"], body)
    assert alone == 1
    assert isinstance(wrong, redis.ResponseError) and "WRONGTYPE" in str(wrong)
    assert (counted, exists) == (5, 1)


def test_a_caller_that_stops_waiting_leaves_the_others_their_replies(redis_client: Any) -> None:
    async def body(commands: kv.Coalescing) -> list[Any]:
        gave_up = asyncio.get_running_loop().create_task(commands.exists("kv:none"))
        others = [asyncio.get_running_loop().create_task(commands.exists("kv:none")) for _ in range(5)]
        await asyncio.sleep(0)
        gave_up.cancel()
        replies = await asyncio.gather(*others)
        return [*replies, await commands.exists("kv:none")]

    replies, _ = _coalescing(os.environ["REDIS_URL"], body)
    assert replies == [0] * 6


def test_unreachable_redis_fails_each_command_and_the_next_ones_too() -> None:
    async def body(commands: kv.Coalescing) -> list[Any]:
        first = await asyncio.gather(*(commands.exists("kv:x") for _ in range(3)), return_exceptions=True)
        async with asyncio.timeout(10):  # never left waiting
            later = await asyncio.gather(commands.zrem("kv:y", "a"), return_exceptions=True)
        return [*first, *later]

    outcomes, _ = _coalescing("redis://127.0.0.1:1/0", body)
    assert len(outcomes) == 4
    assert all(isinstance(o, redis.ConnectionError) for o in outcomes), outcomes
