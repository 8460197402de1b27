"""The event buffer writer (minichat.buffer.Writer) against a redis-server of the test's own: events are
written in order, retried until written, never twice, and a buffer Redis lost is written again whole."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio

from helpers import OwnRedis
from minichat import buffer
from minichat.sse import encode_event

GENERATION = "00000000-0000-0000-0000-000000000001"


def _numbers(server: OwnRedis) -> list[int]:
    client = server.client()
    try:
        return [int(entry_id.split(b"-")[1]) for entry_id, _ in client.xrange(buffer.key(GENERATION))]
    finally:
        client.close()


def _with_writer(server: OwnRedis, body: Callable[[buffer.Writer, list[bytes]], Awaitable[None]]) -> None:
    async def main() -> None:
        client = redis.asyncio.Redis(port=server.port, socket_timeout=2, socket_connect_timeout=1)
        writer = buffer.Writer(client, ttl=3600)
        task = asyncio.create_task(writer.run())
        try:
            await body(writer, [])
        finally:
            task.cancel()
            await client.aclose()

    asyncio.run(main())


def _emit(writer: buffer.Writer, frames: list[bytes], *, end: bool = False) -> None:
    event: Any = buffer.done("succeeded") if end else buffer.delta(f" w{len(frames)}")
    frames.append(encode_event(len(frames) + 1, event))
    writer.append(GENERATION, frames, end=end)


def test_writes_failing_for_a_while_are_retried_in_order(own_redis: OwnRedis) -> None:
    async def body(writer: buffer.Writer, frames: list[bytes]) -> None:
        admin = own_redis.client()
        for _ in range(5):
            _emit(writer, frames)
        assert await writer.written(timeout=2)
        admin.config_set("maxmemory", 1)  # every write fails (OOM), reads still work
        for _ in range(10):
            _emit(writer, frames)
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        assert _numbers(own_redis) == [1, 2, 3, 4, 5]  # nothing after a hole, nothing out of order
        admin.config_set("maxmemory", 0)
        _emit(writer, frames, end=True)
        assert await writer.written(timeout=5)
        admin.close()

    _with_writer(own_redis, body)
    assert _numbers(own_redis) == list(range(1, 17))
    client = own_redis.client()
    assert client.ttl(buffer.key(GENERATION)) > 3000
    client.close()


def test_a_buffer_lost_with_a_redis_restart_is_written_again_whole(own_redis: OwnRedis) -> None:
    async def body(writer: buffer.Writer, frames: list[bytes]) -> None:
        for _ in range(5):
            _emit(writer, frames)
        assert await writer.written(timeout=2)
        own_redis.stop()
        own_redis.start()  # empty: no persistence
        for _ in range(3):
            _emit(writer, frames)
        _emit(writer, frames, end=True)
        assert await writer.written(timeout=10)

    _with_writer(own_redis, body)
    assert _numbers(own_redis) == list(range(1, 10))


def test_an_event_already_written_is_not_written_twice(own_redis: OwnRedis) -> None:
    """A retry after a lost reply: the entries that did land are skipped, the rest written."""

    async def body(writer: buffer.Writer, frames: list[bytes]) -> None:
        for _ in range(3):
            _emit(writer, frames)
        assert await writer.written(timeout=2)
        writer.append(GENERATION, frames[:2], end=False)  # event 2 again
        writer.append(GENERATION, frames[:3], end=False)  # event 3 again
        _emit(writer, frames, end=True)
        assert await writer.written(timeout=2)

    _with_writer(own_redis, body)
    assert _numbers(own_redis) == [1, 2, 3, 4]


def test_a_batch_of_several_buffers_is_written_byte_for_byte(own_redis: OwnRedis) -> None:
    """One call carries the events of many generations, interleaved, whatever their frames hold."""
    generations = [f"00000000-0000-0000-0000-00000000010{i}" for i in range(3)]
    texts = [" é, 中文 1e5,", "😀\n\n", " x" * 3000, "", "0-1e2s3,"]
    sent: dict[str, list[bytes]] = {g: [] for g in generations}

    async def body(writer: buffer.Writer, _: list[bytes]) -> None:
        for text in texts:
            for generation_id in generations:  # one batch: the writer waits for more before it sends
                frames = sent[generation_id]
                frames.append(encode_event(len(frames) + 1, buffer.delta(text + generation_id[-1])))
                writer.append(generation_id, frames, end=False)
        for generation_id in generations:
            frames = sent[generation_id]
            frames.append(encode_event(len(frames) + 1, buffer.done("succeeded")))
            writer.append(generation_id, frames, end=True)
        assert await writer.written(timeout=2)

    _with_writer(own_redis, body)
    client = own_redis.client()
    try:
        for generation_id, frames in sent.items():
            entries = client.xrange(buffer.key(generation_id))
            assert [entry_id for entry_id, _ in entries] == [f"0-{n}".encode() for n in range(1, 7)]
            assert [fields[b"f"] for _, fields in entries] == frames
            assert [b"e" in fields for _, fields in entries] == [False] * 5 + [True]
            assert client.ttl(buffer.key(generation_id)) > 3000
    finally:
        client.close()
