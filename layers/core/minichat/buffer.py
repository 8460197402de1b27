"""A generation's event buffer: the Redis Stream `generation:{id}:events` of encoded SSE frames.

Entry ids are `0-<n>`, n the event number (1, 2, 3, ...); field `f` holds the frame and field `e` marks
the last one (`done`). This module owns the key, the event shapes (SPEC §3) and every write and read of
the buffer: the engine appends (batched, in order, retried until written), readers in other processes
follow it, the reaper and a chat deletion read the text already streamed and close the sequence, and a
stream opened after the buffer expired is rebuilt from the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterable
from typing import Any, Literal, TypedDict

import redis
import redis.asyncio
from redis.exceptions import RedisError

from minichat.chats import ASSISTANT_MAX_CHARS, repair_text
from minichat.log import get_logger
from minichat.sse import encode_event

__all__ = [
    "DeltaEvent",
    "DoneEvent",
    "ErrorEvent",
    "Event",
    "UsageEvent",
    "Writer",
    "close",
    "closing_events",
    "delta",
    "done",
    "entries",
    "error",
    "key",
    "read_text",
    "rebuilt",
    "usage",
]

log = get_logger("minichat.buffer")


def key(generation_id: str) -> str:
    return f"generation:{generation_id}:events"


# --- the events (SPEC §3) --------------------------------------------------------------------------------


class DeltaEvent(TypedDict):
    type: Literal["delta"]
    delta: str


class UsageEvent(TypedDict):
    type: Literal["usage"]
    inputTokens: int
    outputTokens: int
    estimated: bool


class ErrorEvent(TypedDict):
    type: Literal["error"]
    code: str
    message: str


class DoneEvent(TypedDict):
    type: Literal["done"]
    status: str


Event = DeltaEvent | UsageEvent | ErrorEvent | DoneEvent


def delta(text: str) -> DeltaEvent:
    return {"type": "delta", "delta": text}


def usage(*, input_tokens: int, output_tokens: int, estimated: bool) -> UsageEvent:
    return {
        "type": "usage",
        "inputTokens": input_tokens,
        "outputTokens": output_tokens,
        "estimated": estimated,
    }


def error(*, code: str, message: str) -> ErrorEvent:
    return {"type": "error", "code": code, "message": message}


def done(status: str) -> DoneEvent:
    return {"type": "done", "status": status}


def closing_events(row: dict[str, Any]) -> list[Event]:
    """What ends a sequence, from the generation's terminal row: error (when failed), usage, done."""
    events: list[Event] = []
    if row["status"] == "failed":
        events.append(error(code=row["error_code"] or "internal_error", message=row["error_message"] or ""))
    events.append(
        usage(
            input_tokens=row["input_tokens"],
            output_tokens=row["output_tokens"],
            estimated=row["usage_estimated"],
        )
    )
    events.append(done(row["status"]))
    return events


def rebuilt(row: dict[str, Any], text: str, *, first: int = 1) -> bytes:
    """A sequence from the database alone: the text as one delta (when there is any), then the closing
    events, numbered from `first`."""
    events: list[Event] = [delta(text)] if text else []
    events += closing_events(row)
    return b"".join(encode_event(first + i, e) for i, e in enumerate(events))


# --- reading -----------------------------------------------------------------------------------------------


def entries(items: Iterable[Any], last: int) -> tuple[bytes, int, bool]:
    """Frames of stream entries after event `last`: (joined frames, last event number, `done` among them)."""
    chunks: list[bytes] = []
    ended = False
    for entry_id, fields in items:
        number = int(entry_id.split(b"-")[1])
        if number <= last:
            continue
        if number != last + 1:
            # The writer never leaves one out (it retries in order); only a Redis that lost its data
            # (restarted empty) can. Nothing here can fill it: say so.
            log.warning("event buffer has a gap", after=last, next=number)
        last = number
        chunks.append(fields[b"f"])
        ended = ended or b"e" in fields
    return b"".join(chunks), last, ended


def read_text(client: redis.Redis, generation_id: str) -> tuple[str, int]:
    """The text of the deltas already buffered (repaired and bounded as the engine does it) and the last
    event number (0 when none). Raises RedisError when the buffer cannot be read."""
    items: Any = client.xrange(key(generation_id))
    parts: list[str] = []
    last = 0
    for entry_id, fields in items:
        last = int(entry_id.split(b"-")[1])
        frame = fields[b"f"].decode()
        data = json.loads(frame.split("\ndata: ", 1)[1])
        if data.get("type") == "delta":
            parts.append(data["delta"])
    return repair_text("".join(parts))[:ASSISTANT_MAX_CHARS], last


def close(client: redis.Redis, row: dict[str, Any], *, after: int, ttl: int) -> None:
    """Append the closing events of a generation ended elsewhere (reaper, chat deletion) after event
    `after`, so that its followers see `done`; the buffer is kept `ttl` seconds from now."""
    name = key(str(row["id"]))
    pipe = client.pipeline(transaction=False)
    for number, event in enumerate(closing_events(row), start=after + 1):
        fields: dict[str, bytes] = {"f": encode_event(number, event)}
        if event["type"] == "done":
            fields["e"] = b"1"
        pipe.xadd(name, fields, id=f"0-{number}")  # type: ignore[arg-type]
    pipe.expire(name, ttl)
    pipe.execute(raise_on_error=False)


# --- writing (the engine) ------------------------------------------------------------------------------

# One call appends a batch of events to their buffers, its frames joined into one argument: the event
# loop's CPU per event is a fraction of a pipeline of XADDs' (redis-py packs each command and each of its
# arguments apart, and parses each reply; figures in docs/architecture.md). KEYS[i] is entry i's buffer;
# ARGV[1] the TTL; ARGV[2] the entries, each `<n><mark><length>,`: event number n, mark ("s" the
# generation's first event: the TTL is set; "e" its last: field e marks the end and the TTL is set again,
# so the buffer is kept at least ARGV[1] s after the end; "x" neither) and the length of its frame; the
# frames one after the other in ARGV[3].
# Each buffer's last id is read first (once per buffer and call, in the server): what is already there
# is skipped (a retry whose earlier reply was lost writes nothing twice), and a buffer that is gone
# although its first events were written (a Redis that restarted empty, even when the client's own
# reconnect hid it) is reported, so that its whole start is written again first. An entry that fails
# (OOM, ...) blocks the later entries of its buffer in this call: they come back and are sent again, in
# order, so a buffer never has a hole. Returns {failed indexes, indexes whose buffer was gone}.
_APPEND = """
local ttl, frames = ARGV[1], ARGV[3]
local blocked, top, failed, lost = {}, {}, {}, {}
local i, at = 0, 1
for number, mark, length in string.gmatch(ARGV[2], '(%d+)(%a)(%d+),') do
  i = i + 1
  local k, n = KEYS[i], tonumber(number)
  local frame = string.sub(frames, at, at + length - 1)
  at = at + length
  if top[k] == nil then
    local last = redis.call('XREVRANGE', k, '+', '-', 'COUNT', 1)
    top[k] = last[1] and tonumber(string.sub(last[1][1], 3)) or 0
    if top[k] == 0 and n > 1 then
      blocked[k] = true
      lost[#lost + 1] = i
    end
  end
  if blocked[k] then
    failed[#failed + 1] = i
  elseif n > top[k] then
    local r
    if mark == 'e' then
      r = redis.pcall('XADD', k, '0-' .. number, 'f', frame, 'e', '1')
    else
      r = redis.pcall('XADD', k, '0-' .. number, 'f', frame)
    end
    if type(r) == 'table' and r.err then
      blocked[k] = true
      failed[#failed + 1] = i
    else
      top[k] = n
      if mark ~= 'x' then
        redis.pcall('EXPIRE', k, ttl)
      end
    end
  end
end
return {failed, lost}
"""
# Events gather this long before they go out in one call (a `done` goes at once): with 100 streams that
# is one round trip for dozens of events instead of one for every few. Only readers in other processes
# wait for it; a reader in the engine's process takes events from memory. Each call costs the loop a
# fixed 150-200 µs (redis-py, the timer, the wake-ups) besides its events: at 2,500 events a second (a
# worker's share of 100 streams at 50 tokens/s) 10 ms cost about 15 µs an event, 25 ms about 11
# (bench/bench_redis.py); a reader elsewhere sees a token at most 25 ms later than its own process would.
BATCH_S = 0.025
_MAX_EVENTS = 1000  # events per script call
_RETRY_FIRST_S = 0.05
_RETRY_MAX_S = 1.0
# After this long failing without a break, what is still unsent is dropped (logged): past any outage
# worth waiting out, and a buffer that never takes its events must not hold the others back for good.
_GIVE_UP_S = 600.0

# generation id, event number, frame, whether it is the last, and all the frames of its generation so far
# (the run's own list: a buffer Redis lost is written again from it)
Entry = tuple[str, int, bytes, bool, list[bytes]]


class Writer:
    """Appends events to their buffers from one task: batched, in order, and retried until written, so
    that a reader in another process never misses one (a Redis outage only delays them)."""

    def __init__(self, client: redis.asyncio.Redis, *, ttl: int, batch_s: float = BATCH_S) -> None:
        self._ttl = ttl
        self._batch_s = batch_s
        self._script = client.register_script(_APPEND)
        self._pending: list[Entry] = []
        self._ready = asyncio.Event()
        self._end = asyncio.Event()  # a `done` is waiting: write without the batching delay
        self._idle = asyncio.Event()
        self._idle.set()

    def append(self, generation_id: str, frames: list[bytes], *, end: bool) -> None:
        """Queue the last of `frames` (a generation's frames so far, event n at index n - 1) for its buffer;
        the loop's thread only, never blocks."""
        self._pending.append((generation_id, len(frames), frames[-1], end, frames))
        self._idle.clear()
        self._ready.set()
        if end:
            self._end.set()

    async def written(self, *, timeout: float) -> bool:
        """Wait until everything queued so far is in Redis (shutdown); False when it took too long."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        return self._idle.is_set()

    async def run(self) -> None:
        """The writing task (runs until cancelled)."""
        delay = _RETRY_FIRST_S
        retry = False  # the last call left events unsent: send them without the batching delay
        failing_since: float | None = None
        while True:
            await self._ready.wait()
            if not retry and not self._end.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._batch_s):
                        await self._end.wait()
            self._ready.clear()
            self._end.clear()
            batch, self._pending = self._pending, []
            unsent = await self._send(batch)
            if not unsent:
                if failing_since is not None:
                    log.warning(
                        "event buffer writes resumed", after_s=round(time.monotonic() - failing_since, 3)
                    )
                retry, delay, failing_since = False, _RETRY_FIRST_S, None
                if not self._pending:
                    self._idle.set()
                continue
            if failing_since is None:
                failing_since = time.monotonic()
                log.warning("event buffer write failed; retrying in order", events=len(unsent))
            elif time.monotonic() - failing_since > _GIVE_UP_S:
                log.error("event buffer writes given up", events=len(unsent))
                unsent = []
            # Ahead of what was queued meanwhile: each buffer keeps its order.
            self._pending = unsent + self._pending
            retry = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX_S)
            self._ready.set()

    async def _send(self, batch: list[Entry]) -> list[Entry]:
        """Write `batch`; what was not written (the failed entries and everything after them)."""
        for start in range(0, len(batch), _MAX_EVENTS):
            part = batch[start : start + _MAX_EVENTS]
            keys = [key(entry[0]) for entry in part]
            spec = "".join(
                f"{number}{'e' if end else 's' if number == 1 else 'x'}{len(frame)},"
                for _, number, frame, end, _ in part
            )
            frames = b"".join(entry[2] for entry in part)
            try:
                reply: Any = await self._script(keys=keys, args=[self._ttl, spec, frames])
            except (RedisError, OSError):
                return batch[start:]
            failed, lost = reply
            if failed:
                # The rest is not sent at all: it may hold later events of a buffer that just failed.
                unsent: list[Entry] = []
                for i in failed:
                    generation_id, number, _, _, frames = entry = part[i - 1]
                    if i in lost:
                        log.warning("event buffer lost; writing it again", generation_id=generation_id)
                        unsent += [(generation_id, n, frames[n - 1], False, frames) for n in range(1, number)]
                    unsent.append(entry)
                return unsent + batch[start + len(part) :]
        return []
