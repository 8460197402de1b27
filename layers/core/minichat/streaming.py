"""The run of one generation: provider → event buffer → persistence; and the readers that follow it.

One `Engine` per process owns:
- the runs started here (the first stream connection claims a queued generation and starts its run in a
  task that does not depend on any connection);
- the event buffer writer (minichat.buffer): every event also goes to the generation's Redis Stream
  (batched, in order, retried), so a reader in another process, or after a restart, sees the same
  numbered sequence;
- the cancel listener (Redis pub/sub; a cancel reaches the run within milliseconds), a supervisor tick
  (idle timeouts, readers' pings) and the keep-alive (the database heartbeat, which never waits on Redis,
  then lock renewal and a cancel-flag poll in case a pub/sub message is lost).
Database work runs in a small thread pool through the same synchronous core functions the API uses (on
the event loop, psycopg's asyncio connections measured worse under load: see docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.asyncio
from redis.exceptions import RedisError

from minichat import buffer, generations, kv, limits
from minichat.chats import ASSISTANT_MAX_CHARS, repair_text
from minichat.config import Settings
from minichat.errors import (
    InternalError,
    MiniChatError,
    NotFound,
    ProviderError,
    ProviderTimeout,
    ServiceUnavailable,
    WorkerLost,
)
from minichat.generations import Outcome
from minichat.log import get_logger
from minichat.providers import (
    Delta,
    Finish,
    ProviderRegistry,
    ProviderRequest,
    estimate_prompt_tokens,
    estimate_tokens,
)
from minichat.sse import encode_comment, encode_delta, encode_event

__all__ = ["HEARTBEAT_S", "Engine", "Opened"]

log = get_logger("minichat.streaming")
T = TypeVar("T")

HEARTBEAT_S = 15.0  # a `: ping` at least this often while a stream is idle
COALESCE_S = 0.004  # deltas closer together than this go out as one event (never the first one)
_SUPERVISE_S = 0.5
_RENEW_EVERY_S = 5.0
_RELEASE_WAIT_S = 1.0  # a lock whose release cannot be confirmed is left behind: it never blocks anyone
_PING_DUE_S = HEARTBEAT_S - 2.0  # a reader of another process's run: a ping when idle this long
_PING = encode_comment("ping")
_SAVE_FAILED = InternalError("The answer could not be saved.")


@dataclass
class Run:
    """One generation executing in this process, and its in-memory event sequence."""

    row: dict[str, Any]
    frames: list[bytes] = field(default_factory=list)
    finished: bool = False
    waiters: list[asyncio.Future[None]] = field(default_factory=list)  # readers waiting for a change
    stop_reason: str | None = None  # "canceled" | "timeout" | "shutdown" | "length" (the message bound)
    finish_reason: str | None = None  # what the provider said, or "length" at the message bound
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    parts: list[str] = field(default_factory=list)
    chars: int = 0  # the length of the answer so far
    pending: list[str] = field(default_factory=list)
    last_emit: float = -1.0
    last_activity: float = 0.0
    last_wake: float = 0.0  # when readers were last woken (an event, or a heartbeat)
    first_token: bool = False
    task: asyncio.Task[None] | None = None

    @functools.cached_property
    def id(self) -> str:
        return str(self.row["id"])

    def stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            self.stop_requested.set()


@dataclass(frozen=True)
class Opened:
    """What a stream connection found: the generation row and whether it started the run here."""

    row: dict[str, Any]
    started_here: bool


class Engine:
    """Runs generations and serves their event sequences; one per process, started in the app's lifespan."""

    def __init__(self, settings: Settings, *, registry: ProviderRegistry | None = None) -> None:
        self.settings = settings
        # preload: the stream function pays the openai import at cold start, not on its first stream.
        self.registry = registry or ProviderRegistry.from_settings(settings, preload=True)
        self.runs: dict[str, Run] = {}
        # Claims and terminal commits are mostly waits on PostgreSQL; a few threads overlap them. More
        # would only share the GIL with the event loop, and a burst of stream opens would all finish late.
        self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="minichat-db")
        self._redis: redis.asyncio.Redis | None = None
        self._readers: redis.asyncio.Redis | None = None
        self._buffer: buffer.Writer | None = None
        self._commands: kv.Coalescing | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        url = self.settings.redis_url
        # driver_info=None: no CLIENT SETINFO on connect, whose library version lookup (importlib.metadata)
        # and round trip ran on the event loop for every connection a burst of streams opened
        # (docs/architecture.md).
        self._redis = redis.asyncio.Redis.from_url(
            url,
            socket_connect_timeout=2,
            socket_timeout=5,
            max_connections=200,
            health_check_interval=30,
            driver_info=None,
        )
        # Blocked XREADs each hold a connection for up to HEARTBEAT_S: their own pool, no read timeout
        # shorter than the block.
        self._readers = redis.asyncio.Redis.from_url(
            url,
            socket_connect_timeout=2,
            socket_timeout=HEARTBEAT_S + 10,
            max_connections=10_000,
            driver_info=None,
        )
        self._buffer = buffer.Writer(self._redis, ttl=self.settings.stream_buffer_ttl)
        self._commands = kv.Coalescing(self._redis)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._buffer.run(), name="minichat-buffer-writer"),
            loop.create_task(self._listen_for_cancels(), name="minichat-cancel-listener"),
            loop.create_task(self._supervise(), name="minichat-supervisor"),
            loop.create_task(self._keep_alive(), name="minichat-keep-alive"),
        ]

    async def drain(self, *, grace_s: float = 5.0) -> None:
        """Before the server closes connections: end every run here (`failed`, worker_lost, persisted)
        so that its readers see `done` and finish, instead of being cut off."""
        self._closing = True
        for run in list(self.runs.values()):
            run.stop("shutdown")
        pending = [r.task for r in self.runs.values() if r.task is not None]
        if pending:
            await asyncio.wait(pending, timeout=grace_s)
        if self._buffer is not None:
            await self._buffer.written(timeout=1.0)  # the last events, for readers elsewhere

    async def close(self, *, grace_s: float = 5.0) -> None:
        """Stop the engine (after drain, or in its place)."""
        await self.drain(grace_s=grace_s)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.registry.aclose()
        for client in (self._redis, self._readers):
            if client is not None:
                await client.aclose()
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def redis(self) -> redis.asyncio.Redis:
        assert self._redis is not None, "Engine.start() was not called"
        return self._redis

    @property
    def commands(self) -> kv.Coalescing:
        """For each stream's few small commands (its connection's slot, its lock, its cancel flag): sent
        together with those of the other streams opening or ending at the same moment."""
        assert self._commands is not None, "Engine.start() was not called"
        return self._commands

    async def _in_thread(self, fn: Callable[..., T], /, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(**kwargs))

    # --- opening a stream ---------------------------------------------------------------------------

    async def open(self, *, generation_id: str, user_id: str) -> Opened:
        """Load the generation (404 for another user's) and, if it is queued, claim it and start the run."""
        if generation_id in self.runs:
            run = self.runs[generation_id]
            if str(run.row["user_id"]) != user_id:
                raise NotFound("Generation not found.")
            return Opened(row=run.row, started_here=False)
        row, history = await self._in_thread(
            generations.open_for_stream, generation_id=generation_id, user_id=user_id
        )
        if history is None:
            return Opened(row=row, started_here=False)
        self._start_run(row, history)
        return Opened(row=row, started_here=True)

    def _start_run(self, row: dict[str, Any], history: list[tuple[str, str]]) -> None:
        run = Run(row=row)
        run.last_activity = run.last_wake = time.monotonic()
        self.runs[run.id] = run
        run.task = asyncio.get_running_loop().create_task(
            self._run(run, history), name=f"generation-{run.id}"
        )

    # --- the run ------------------------------------------------------------------------------------

    async def _run(self, run: Run, history: list[tuple[str, str]]) -> None:
        row = run.row
        messages = generations.prompt_for(
            row["system_prompt"],
            history,
            context_tokens=self.registry.prompt_tokens(row["model"], max_tokens=row["max_tokens"]),
        )
        prompt_estimate = estimate_prompt_tokens(messages)
        usage: list[Any] = []
        status, error = "succeeded", None
        try:
            provider = self.registry.resolve(row["model"])
            request = ProviderRequest(
                model=row["model"],
                messages=messages,
                temperature=row["temperature"],
                max_tokens=row["max_tokens"],
            )
            loop = asyncio.get_running_loop()
            pump = loop.create_task(self._pump(run, provider.stream(request), usage))
            stopper = loop.create_task(run.stop_requested.wait())
            try:
                # A cancel that arrived before the claim left only its flag. It is read while the model
                # call is already on its way, not before: one Redis round trip less before the first
                # token (in a burst, every await on that path waits behind the whole event loop).
                with contextlib.suppress(RedisError, OSError):
                    if await self.commands.exists(generations.cancel_key(run.id)):
                        run.stop("canceled")
                # Wait on the next token and the stop flag together: a cancel lands while the model is
                # silent.
                await asyncio.wait((pump, stopper), return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not pump.done():
                    pump.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await pump
                stopper.cancel()
            if pump.cancelled():
                status, error = _stopped(run.stop_reason, self.settings)
            elif (exc := pump.exception()) is not None:
                status, error = "failed", _as_error(exc, run.id)
        except MiniChatError as exc:
            status, error = "failed", exc
        except Exception as exc:  # the run must always end persisted, whatever broke
            status, error = "failed", _as_error(exc, run.id)
        self._flush(run)
        await self._finish(run, _outcome(run, status, error, usage, prompt_estimate))

    async def _pump(self, run: Run, stream: Any, usage: list[Any]) -> None:
        """Read the provider; the hot path, so it does as little as it can per token."""
        try:
            async for item in stream:
                if type(item) is Delta:
                    if item.text:
                        self._add_text(run, item.text)
                elif type(item) is Finish:
                    if run.stop_reason is None:  # the message bound's `length` stands
                        run.finish_reason = item.reason
                else:
                    usage.append(item)
        finally:
            await stream.aclose()  # closes the upstream request, also on cancel

    def _add_text(self, run: Run, text: str) -> None:
        text = repair_text(text)  # what is streamed is what is stored (SPEC §7.3)
        room = ASSISTANT_MAX_CHARS - run.chars
        if len(text) >= room:
            # The answer reached the message bound: it ends here, as if maxTokens were reached.
            text = text[:room]
            run.finish_reason = "length"
            run.stop("length")
            if not text:
                return
        run.chars += len(text)
        loop_now = time.monotonic()
        run.last_activity = loop_now
        run.first_token = True
        run.parts.append(text)
        if run.pending:
            run.pending.append(text)
            return
        if loop_now - run.last_emit >= COALESCE_S:
            run.last_emit = loop_now
            self._append(run, encode_delta(len(run.frames) + 1, text))
        else:
            run.pending.append(text)
            asyncio.get_running_loop().call_later(COALESCE_S, self._flush, run)

    def _flush(self, run: Run) -> None:
        if run.pending:
            text = "".join(run.pending)
            run.pending.clear()
            run.last_emit = time.monotonic()
            self._append(run, encode_delta(len(run.frames) + 1, text))

    def _emit(self, run: Run, event: buffer.Event, *, end: bool = False) -> None:
        self._append(run, encode_event(len(run.frames) + 1, event), end=end)

    def _append(self, run: Run, frame: bytes, *, end: bool = False) -> None:
        """The run's next frame (numbered len(run.frames) + 1): to memory, the buffer, the readers."""
        run.frames.append(frame)
        assert self._buffer is not None
        self._buffer.append(run.id, run.frames, end=end)
        _wake(run)

    async def _finish(self, run: Run, outcome: Outcome) -> None:
        """Commit the end, free the lock, then close the sequence (`done` only after the commit)."""
        final = await self._commit(run, outcome)
        if final is None:
            self._abandon(run)
            return
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(_RELEASE_WAIT_S):
                await limits.release_inflight_async(
                    self.commands, user_id=str(run.row["user_id"]), generation_id=run.id
                )
        events = buffer.closing_events(final)
        for event in events[:-1]:
            self._emit(run, event)
        self._emit(run, events[-1], end=True)
        run.finished = True
        self.runs.pop(run.id, None)
        log.info(
            "generation finished",
            generation_id=run.id,
            status=final["status"],
            output_tokens=final["output_tokens"],
            events=len(run.frames),
        )

    async def _commit(self, run: Run, outcome: Outcome) -> dict[str, Any] | None:
        """The terminal transaction; the row as committed, or None when nothing could be committed.

        A failure that is not an outage (an answer the database refuses, a bug) still ends the
        generation: `failed` with internal_error, counted, without the answer.
        """
        try:
            return await self._persist(run, outcome)
        except ServiceUnavailable:
            pass  # the database stayed away: the reaper ends it later, with the buffered text
        except Exception as exc:
            log.error("the answer could not be saved", generation_id=run.id, error=type(exc).__name__)
            fallback = Outcome.failed(
                _SAVE_FAILED,
                input_tokens=outcome.input_tokens,
                output_tokens=outcome.output_tokens,
                estimated=outcome.estimated,
            )
            try:
                return await self._persist(run, fallback)
            except Exception as exc:
                log.error("generation could not be ended", generation_id=run.id, error=type(exc).__name__)
        return None

    def _abandon(self, run: Run) -> None:
        """Nothing was committed: the run leaves without `done` (never sent while the row is in flight).
        Its heartbeat stops, so the reaper ends the generation with the buffered text, frees the user and
        closes the sequence; readers here end and, reconnecting, follow the buffer to that end."""
        run.finished = True
        _wake(run)
        self.runs.pop(run.id, None)

    async def _persist(self, run: Run, outcome: Outcome) -> dict[str, Any]:
        """Commit the terminal state; retried while the database is away (`done` waits for it)."""
        delay = 0.2
        deadline = time.monotonic() + 300
        while True:
            try:
                return await self._in_thread(
                    generations.persist_terminal, generation=run.row, outcome=outcome
                )
            except ServiceUnavailable:
                if time.monotonic() > deadline:
                    raise
                log.warning("database unavailable while finishing; retrying", generation_id=run.id)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    # --- background tasks -----------------------------------------------------------------------

    async def _listen_for_cancels(self) -> None:
        """Cancel requests arrive over pub/sub; reconnect with backoff when Redis goes away."""
        delay = 0.1
        while True:
            try:
                async with self.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(generations.CANCEL_CHANNEL)
                    delay = 0.1
                    async for message in pubsub.listen():
                        data = message.get("data")
                        generation_id = data.decode() if isinstance(data, bytes) else str(data)
                        run = self.runs.get(generation_id)
                        if run is not None:
                            run.stop("canceled")
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                log.warning("cancel listener lost Redis; reconnecting", error=type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _supervise(self) -> None:
        """Idle timeouts and readers' pings, every tick; never waits on I/O."""
        while True:
            await asyncio.sleep(_SUPERVISE_S)
            now = time.monotonic()
            for run in list(self.runs.values()):
                limit = (
                    self.settings.provider_idle_timeout
                    if run.first_token
                    else self.settings.provider_first_token_timeout
                )
                if now - run.last_activity > limit:
                    run.stop("timeout")
                if now - run.last_wake >= HEARTBEAT_S - 2 * _SUPERVISE_S:
                    _wake(run)  # its readers find nothing new and send a ping

    async def _keep_alive(self) -> None:
        """Every few seconds: the database heartbeat first, on its own (a Redis outage must never get a
        live run reaped), then the locks' renewal and a cancel-flag poll, bounded in time."""
        while True:
            await asyncio.sleep(_RENEW_EVERY_S)
            runs = list(self.runs.values())
            if not runs:
                continue
            try:
                await self._in_thread(generations.heartbeat, generation_ids=[r.id for r in runs])
            except ServiceUnavailable as exc:
                log.warning("database heartbeat failed", error=type(exc).__name__)
            try:
                async with asyncio.timeout(_RENEW_EVERY_S):
                    await self._renew_locks(runs)
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("lock renewal failed", error=type(exc).__name__)

    async def _renew_locks(self, runs: list[Run]) -> None:
        flags = await limits.renew_runs_async(
            self.redis, [(str(r.row["user_id"]), r.id, generations.cancel_key(r.id)) for r in runs]
        )
        for run, flag in zip(runs, flags, strict=True):
            if flag:
                run.stop("canceled")

    # --- readers ------------------------------------------------------------------------------------

    def frames(self, opened: Opened, *, after: int) -> AsyncIterator[bytes]:
        """The generation's SSE frames after event `after`, then live ones until `done`; pings when idle."""
        run = self.runs.get(str(opened.row["id"]))
        if run is not None:
            return _follow_local(run, after)
        return self._follow_buffer(opened.row, after)

    async def _follow_buffer(self, row: dict[str, Any], after: int) -> AsyncIterator[bytes]:
        """Follow a run in another process (or a finished one) through its event buffer."""
        assert self._readers is not None
        generation_id = str(row["id"])
        key = buffer.key(generation_id)
        last = after
        if row["status"] not in generations.TERMINAL:
            sent = time.monotonic()
            while not self._closing:
                # Block only until a ping is due: the reader hears from us at least every HEARTBEAT_S,
                # whatever the status check after a ping costs.
                wait_s = max(_PING_DUE_S - (time.monotonic() - sent), 0.05)
                try:
                    reply: Any = await self._readers.xread(
                        {key: f"0-{last}"}, count=1000, block=int(wait_s * 1000)
                    )
                except (RedisError, OSError) as exc:
                    raise ServiceUnavailable("The event buffer is unavailable.") from exc
                if reply:
                    chunk, last, ended = buffer.entries(reply[0][1], last)
                    if chunk:
                        yield chunk
                        sent = time.monotonic()
                    if ended:
                        return
                    continue
                yield _PING
                sent = time.monotonic()
                status = await self._in_thread(generations.status_of, generation_id=generation_id)
                if status is None or status in generations.TERMINAL:
                    break
            else:
                return
        # Terminal: the rest of the buffer, in one read.
        try:
            items: Any = await self.redis.xrange(key, min=f"0-{last + 1}")
            exists = bool(items) or bool(await self.redis.exists(key))
        except (RedisError, OSError):
            items, exists = [], False
        if not exists:
            # Expired: rebuilt whole from the database, numbered from 1.
            row, text = await self._in_thread(generations.final_state, generation_id=generation_id)
            yield buffer.rebuilt(row, text)
            return
        chunk, last, ended = buffer.entries(items, last)
        if not ended and not items:
            with contextlib.suppress(RedisError, OSError):  # resumed after the end: was `done` buffered?
                tail: Any = await self.redis.xrevrange(key, count=1)
                ended = bool(tail) and b"e" in tail[0][1]
        if not ended:
            # Ended by someone else (the reaper, a chat deletion): finish the sequence from the database.
            row, _ = await self._in_thread(generations.final_state, generation_id=generation_id)
            chunk += buffer.rebuilt(row, "", first=last + 1)
        if chunk:
            yield chunk


def _wake(run: Run) -> None:
    """Wake the run's readers (each compares what it has sent with run.frames)."""
    run.last_wake = time.monotonic()
    waiters = run.waiters
    if waiters:
        run.waiters = []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


async def _follow_local(run: Run, after: int) -> AsyncIterator[bytes]:
    """A run in this process: its frames from memory. No timer per wait: the supervisor wakes a run's
    readers when it has been quiet for almost HEARTBEAT_S, and a wake with nothing new sends a ping."""
    position = max(after, 0)
    while True:
        frames = run.frames
        if position < len(frames):
            chunk = b"".join(frames[position:]) if len(frames) - position > 1 else frames[position]
            position = len(frames)
            yield chunk
            continue
        if run.finished:
            return
        waiter = asyncio.get_running_loop().create_future()
        run.waiters.append(waiter)
        await waiter
        if position == len(run.frames) and not run.finished:
            yield _PING


def _stopped(reason: str | None, settings: Settings) -> tuple[str, MiniChatError | None]:
    if reason == "timeout":
        return "failed", ProviderTimeout(f"The model sent nothing for {settings.provider_idle_timeout:g} s.")
    if reason == "shutdown":
        return "failed", WorkerLost("The server stopped while generating.")
    if reason == "length":
        return "succeeded", None
    return "canceled", None


def _as_error(exc: BaseException, generation_id: str) -> MiniChatError:
    if isinstance(exc, ProviderError | ProviderTimeout):
        return exc
    if isinstance(exc, MiniChatError):
        return exc
    log.error("generation failed unexpectedly", generation_id=generation_id, error=type(exc).__name__)
    return ProviderError("The generation failed unexpectedly.")


def _outcome(
    run: Run, status: str, error: MiniChatError | None, usage: list[Any], prompt_estimate: int
) -> Outcome:
    """The run's end as the terminal transaction writes it."""
    text = "".join(run.parts)
    if usage and status == "succeeded":
        input_tokens, output_tokens, estimated = usage[-1].input_tokens, usage[-1].output_tokens, False
    elif usage:
        # Cut short after the provider counted: keep its input count, estimate what was produced.
        input_tokens, output_tokens, estimated = usage[-1].input_tokens, estimate_tokens(text), True
    else:
        input_tokens, output_tokens, estimated = prompt_estimate, estimate_tokens(text), True
    counts = {"input_tokens": input_tokens, "output_tokens": output_tokens, "estimated": estimated}
    if error is not None:
        return Outcome.failed(error, text=text, **counts)
    finish_reason = (run.finish_reason or "stop") if status == "succeeded" else None
    return Outcome(status=status, text=text, finish_reason=finish_reason, **counts)
