"""Redis clients: lazy process-wide singletons (sync for the API, asyncio for the stream)."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Sequence
from typing import Any, TypeAlias

import redis
import redis.asyncio
from redis.exceptions import NoScriptError

from minichat.config import get_settings

__all__ = [
    "AsyncClient",
    "Coalescing",
    "Script",
    "close_redis",
    "get_redis",
    "run_script",
    "run_script_async",
]

_client: redis.Redis | None = None
_lock = threading.Lock()


def get_redis() -> redis.Redis:
    """The synchronous client (thread-safe; its pool hands each thread its own connection)."""
    global _client
    if _client is None:
        with _lock:
            if _client is None:
                _client = redis.Redis.from_url(
                    get_settings().redis_url,
                    socket_connect_timeout=1,
                    socket_timeout=2,
                    health_check_interval=30,
                    max_connections=64,
                    driver_info=None,  # no importlib.metadata lookup on every new connection
                )
    return _client


def close_redis() -> None:
    global _client
    with _lock:
        if _client is not None:
            _client.close()
            _client = None


class Script:
    """A Lua script, run by its SHA-1 (EVALSHA) once Redis knows it."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()


class _Lane(threading.local):
    client: redis.Redis | None = None
    connection: Any = None


_lane = _Lane()


def run_script(script: Script, keys: Sequence[str], args: Sequence[str | int]) -> Any:
    """Run a script on this thread's own connection to the `get_redis()` server.

    For the calls made on every request (rate limits): redis-py's pool, retry and telemetry wrapping
    cost more CPU than the command itself (figures: docs/architecture.md). The
    connection is made by the client's own connection class and settings (TLS, timeouts, health
    checks); a broken one is replaced and the call tried once more; errors are redis-py's.
    """
    client = get_redis()
    lane = _lane
    if lane.client is not client:  # first call on this thread, or the client was replaced
        pool = client.connection_pool
        lane.connection = pool.connection_class(**pool.connection_kwargs)
        lane.client = client
    try:
        return _evalsha(lane.connection, script, keys, args)
    except (redis.ConnectionError, redis.TimeoutError):
        lane.connection.disconnect()  # the next command connects again
        return _evalsha(lane.connection, script, keys, args)


def _evalsha(connection: Any, script: Script, keys: Sequence[str], args: Sequence[str | int]) -> Any:
    try:
        connection.send_command("EVALSHA", script.sha, len(keys), *keys, *args)
        return connection.read_response()
    except NoScriptError:  # a Redis that never saw it, or restarted since
        connection.send_command("EVAL", script.text, len(keys), *keys, *args)
        return connection.read_response()


class Coalescing:
    """An asyncio client's small commands, from any number of tasks, sent together: whatever is asked
    while a round trip is out goes in the next one, as one pipeline. A command asked while none is out
    goes at once, as the client would send it; a burst of them (streams opening or ending together)
    shares round trips, where redis-py's path for each command costs the event loop several times what
    the command's own bytes do (figures: docs/architecture.md).

    Each command gets its own reply or error; a connection lost mid-way fails that round trip's commands
    (redis-py's retry policy applies first, as for a single command). Offers the few commands the stream
    function sends this way (the rest go through the client itself).
    """

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._client = client
        self._queued: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._sending = False
        self._sender: asyncio.Task[None] | None = None  # kept: the loop holds its tasks weakly

    async def execute_command(self, *args: Any) -> Any:
        if self._sending:
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._queued.append((args, future))
            return await future
        self._sending = True  # this one goes at once, from the caller's own task
        try:
            return await self._client.execute_command(*args)
        finally:
            self._next()

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        return await self.execute_command("EVALSHA", sha, numkeys, *keys_and_args)

    async def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> Any:
        return await self.execute_command("EVAL", script, numkeys, *keys_and_args)

    async def exists(self, *names: str) -> int:
        return int(await self.execute_command("EXISTS", *names))

    async def zrem(self, name: str, *values: str) -> int:
        return int(await self.execute_command("ZREM", name, *values))

    def _next(self) -> None:
        """After a round trip: what was asked meanwhile goes next, from a task of its own."""
        if self._queued:
            self._sender = asyncio.get_running_loop().create_task(self._send())
        else:
            self._sending = False

    async def _send(self) -> None:
        batch, self._queued = self._queued, []
        try:
            replies: list[Any]
            try:
                if len(batch) == 1:
                    replies = [await self._client.execute_command(*batch[0][0])]
                else:
                    pipe = self._client.pipeline(transaction=False)
                    for args, _ in batch:
                        pipe.execute_command(*args)
                    replies = await pipe.execute(raise_on_error=False)
            except Exception as exc:  # the round trip failed: each of its commands with it
                replies = [exc] * len(batch)
        except asyncio.CancelledError:  # the loop is stopping: nobody gets a reply
            for _, future in batch + self._queued:
                future.cancel()
            self._queued, self._sending = [], False
            raise
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue  # its caller stopped waiting
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)
        self._next()


AsyncClient: TypeAlias = redis.asyncio.Redis | Coalescing


async def run_script_async(
    client: AsyncClient, script: Script, keys: Sequence[str], args: Sequence[Any]
) -> Any:
    """Run a script with an asyncio client, by its SHA-1 once Redis knows it."""
    try:
        return await client.evalsha(script.sha, len(keys), *keys, *args)
    except NoScriptError:
        return await client.eval(script.text, len(keys), *keys, *args)
