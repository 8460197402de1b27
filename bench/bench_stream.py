"""Benchmark 2: streaming through MiniChat local mode, side by side with the same upstream read directly.

    python bench/bench_stream.py               # ~3 min
    python bench/bench_stream.py --quick       # ~40 s: 2 pairs, no 500-stream round, fewer samples
    python bench/bench_stream.py --workers 2   # local mode with MINICHAT_WORKERS=2
    python bench/bench_stream.py --quick --profile /tmp/p.txt --profile-phase setup   # py-spy, raw stacks

What it does, in one run:
- starts the OpenAI-compatible stub (`python -m minichat_local.openai_stub`, idle connections kept 60 s)
  and local mode (`python -m minichat_local`), each in its own session (setsid) so signals meant for this
  terminal never reach them, local mode against its own database (`minichat_bench_stream`, recreated each
  run, dropped at the end), Redis db 11 (flushed) and RabbitMQ vhost `minichat_bench_stream` (created when
  missing, its queues purged);
- registers 100 users (500 with the 500-stream round), one chat each (one generation in flight per user);
- after a warm-up pair, 5 interleaved pairs of rounds (2 with --quick): a burst of 100 concurrent streams
  of `stub-tokens-100-rate-50` (100 tokens at 50 tokens/s) read (a) straight from the stub, then (b)
  through MiniChat: POST /api/chats/{id}/generations, GET its streamUrl, read the SSE to `done`. Every
  stream's text is compared with the stub's `stub_text(100)`. This machine's CPU speed swings by up to 2x
  from one minute to the next, so each pair is compared within itself, the figures are the median of the
  pairs, and benchlib.cpu_probe() before each pair says how fast the machine was;
- setup bursts: 100 generations of one token created (one CPU phase), then their 100 streams read (a
  second phase): the stream function's setup and finish apart from the create;
- three interleaved pairs of 500 concurrent streams of the same model (not with --quick), judged by their
  median as the 100-stream pairs are (one pair swings by ±0.15x from run to run), with the load client's CPU,
  after a cold pair (shown, not in the median) in which 400 users stream for the first time: MiniChat opens
  400 more upstream and Redis connections and writes their chats' first rows;
- cancel-to-`done`: streams of a slow model, each cancelled at a random moment mid-stream (so the cancels
  are spread over a second, not one synchronized burst); the time from sending the cancel to the `done`;
- one stream at a time of 256 tokens sent as fast as the stub can: time-to-first-token, direct vs MiniChat;
- the CPU time of the MiniChat server (/proc/<pid>/stat of its processes, every thread) per phase; the
  pairs' MiniChat rounds, less 100 creates and stream setups, give the cost of relaying one token.

Times: time-to-first-token (TTFT) runs from the client's first request (the POST that creates the
generation, for MiniChat) to the first text delta; whole-stream time to the last event (`done`, or the
upstream's [DONE]). For MiniChat the table also shows when the create's 201 and the stream's response
headers arrived (p50, from the same start): where the time to the first token goes.

The load client shares the two cores with the stub, the server, PostgreSQL, Redis and RabbitMQ, so it is
kept cheap: aiohttp on uvloop with a hand-rolled SSE reader (one JSON parse per event). The CPU table shows
what the client, the stub, the services and everything else on the machine used during each phase:
figures taken while other work ran ("others") are noisier.

Exit status: 0 when every target holds, 3 when a target is missed, 1 when the run could not give figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psycopg

import benchlib
from benchlib import BenchError, ServerProcess, free_port
from minichat_local.openai_stub import stub_text

ROOT = Path(__file__).resolve().parents[1]

PG_ADMIN_URL = os.environ.get("MINICHAT_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
BENCH_DB = "minichat_bench_stream"
DATABASE_URL = psycopg.conninfo.make_conninfo(PG_ADMIN_URL, dbname=BENCH_DB)
REDIS_URL = f"redis://127.0.0.1:6379/{os.environ.get('MINICHAT_BENCH_REDIS_DB', '11')}"
VHOST = "minichat_bench_stream"
BROKER_URL = os.environ.get("MINICHAT_BENCH_RABBITMQ_URL", f"amqp://guest:guest@127.0.0.1:5672/{VHOST}")
PASSWORD = "bench-password-1234"

TOKENS = 100
RATE = 50
STREAM_MODEL = f"stub-tokens-{TOKENS}-rate-{RATE}"
FAST_TOKENS = 256
FAST_MODEL = f"stub-tokens-{FAST_TOKENS}-rate-0"  # rate 0: as fast as the socket takes them
SETUP_MODEL = "stub-tokens-1"
SLOW_MODEL = "stub-tokens-5000-rate-20"  # runs minutes unless cancelled
MODELS = (STREAM_MODEL, FAST_MODEL, SETUP_MODEL, SLOW_MODEL)
PROMPT = "Tell me something, token by token."

# Issue 15's targets.
TARGET_WHOLE_RATIO = 1.15
AIM_WHOLE_RATIO = 1.10
TARGET_TTFT_EXTRA_MS = 250.0
AIM_TTFT_EXTRA_MS = 150.0
TARGET_BIG_WHOLE_RATIO = 1.5
TARGET_CANCEL_P99_MS = 250.0
TARGET_FAST_TTFT_OVERHEAD_MS = 15.0
TARGET_STREAM_SETUP_MS = 2.0  # the stream function's CPU to set up and finish one stream
TARGET_TOKEN_US = 80.0  # the server's CPU per relayed token
SETTLE_S = 0.5  # inside a CPU phase after its streams end: the background work they caused is counted


@dataclass(frozen=True)
class Plan:
    users: int
    pairs: int  # interleaved pairs of rounds: direct, then MiniChat
    big: int  # concurrent streams of the large rounds (0: none)
    big_pairs: int  # interleaved pairs of them
    cancel_waves: int
    cancel_per_wave: int
    fast_reps: int
    setup_bursts: int


FULL = Plan(
    users=100, pairs=5, big=500, big_pairs=3, cancel_waves=2, cancel_per_wave=50, fast_reps=30, setup_bursts=3
)
QUICK = Plan(
    users=100, pairs=2, big=0, big_pairs=0, cancel_waves=1, cancel_per_wave=40, fast_reps=12, setup_bursts=3
)


# --- CPU accounting (/proc) ------------------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int | str) -> tuple[int, float]:
    """(parent pid, user + system CPU seconds) of one process (all its threads)."""
    with open(f"/proc/{pid}/stat") as handle:
        data = handle.read()
    fields = data[data.rindex(")") + 2 :].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _CLK_TCK


def thread_cpu(pid: int) -> float:
    """CPU seconds of a process's main thread alone (where its event loop runs)."""
    with open(f"/proc/{pid}/task/{pid}/stat") as handle:
        data = handle.read()
    fields = data[data.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def system_busy() -> float:
    """CPU seconds the whole machine spent busy (or stolen) since boot."""
    with open("/proc/stat") as handle:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (
            int(v) for v in handle.readline().split()[1:9]
        )
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


@dataclass
class Cpu:
    """CPU seconds used during a phase: the MiniChat server (its processes; `loop`: their main threads,
    where the event loops run), the stub, this client, the services MiniChat uses (PostgreSQL backends of
    the bench database, Redis, RabbitMQ; the last two are shared with anything else on the machine), and
    everything else (other work on the machine: figures taken while it runs are noisier)."""

    wall: float = 0.0
    server: float = 0.0
    server_loop: float = 0.0
    background: float = 0.0  # the supervisor process (relay, consumer, reaper) when workers serve
    stub: float = 0.0
    client: float = 0.0
    pg: float = 0.0
    redis: float = 0.0
    mq: float = 0.0
    others: float = 0.0

    @property
    def services(self) -> float:
        return self.pg + self.redis + self.mq


class CpuMeter:
    """Reads /proc before and after a phase."""

    def __init__(self, server_pid: int, stub_pid: int) -> None:
        self.server_pid = server_pid
        self.stub_pid = stub_pid
        self._kinds: dict[int, str] = {}  # pid → "pg" | "redis" | "mq" | "" (by command line, read once)

    def _kind(self, pid: int) -> str:
        kind = self._kinds.get(pid)
        if kind is None:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    title = handle.read(300)
            except OSError:
                title = b""
            if title.startswith(b"postgres: ") and f" {BENCH_DB} ".encode() in title:
                kind = "pg"
            elif title.startswith(b"redis-server"):
                kind = "redis"
            elif b"beam.smp" in title:
                kind = "mq"
            else:
                kind = ""
            self._kinds[pid] = kind
        return kind

    def _read(self) -> tuple[float, ...]:
        wall = time.perf_counter()
        server = loop = supervisor = 0.0
        services = {"pg": 0.0, "redis": 0.0, "mq": 0.0}
        serving: list[int] = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            try:
                parent, cpu = _stat(pid)
                if pid == self.server_pid or parent == self.server_pid:
                    # Local mode with MINICHAT_WORKERS > 1: forked workers serve, the parent supervises.
                    server += cpu
                    if parent == self.server_pid:
                        serving.append(pid)
                    else:
                        supervisor = cpu
                elif kind := self._kind(pid):
                    services[kind] += cpu
            except (OSError, ValueError, IndexError):
                continue  # exited meanwhile
        for pid in serving or [self.server_pid]:
            with contextlib.suppress(OSError, ValueError, IndexError):
                loop += thread_cpu(pid)
        background = supervisor if serving else 0.0
        stub = _stat(self.stub_pid)[1]
        pg, redis, mq = services.values()
        return wall, server, loop, background, stub, time.process_time(), pg, redis, mq, system_busy()

    @contextlib.asynccontextmanager
    async def phase(self, cpu: Cpu) -> Any:
        start = self._read()
        try:
            yield cpu
        finally:
            end = self._read()
            wall, srv, loop, bg, stub, cli, pg, redis, mq, busy = (
                b - a for a, b in zip(start, end, strict=True)
            )
            cpu.wall, cpu.server, cpu.server_loop, cpu.stub, cpu.client = wall, srv, loop, stub, cli
            cpu.background = bg
            cpu.pg, cpu.redis, cpu.mq = pg, redis, mq
            cpu.others = max(0.0, busy - srv - stub - cli - cpu.services)


# --- results ----------------------------------------------------------------------------------


@dataclass
class StreamResult:
    ok: bool = False
    ttft: float | None = None  # seconds from the first request to the first text delta
    total: float | None = None  # seconds from the first request to the end of the stream
    text: str = ""
    status: str | None = None  # MiniChat's done status
    error: str | None = None
    cancel_to_done: float | None = None
    created: float | None = None  # MiniChat: seconds from the first request to the create's 201
    opened: float | None = None  # MiniChat: ... to the stream's response headers


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def delivered_tokens(text: str, expected: str) -> int:
    """How many of the expected tokens arrived, in order and intact."""
    if text == expected:
        return len(expected.split())
    got, want = text.split(" "), expected.split(" ")
    count = 0
    for a, b in zip(got, want, strict=False):
        if a != b:
            break
        count += 1
    return count


@dataclass
class Burst:
    name: str
    results: list[StreamResult]
    expected: str
    cpu: Cpu = field(default_factory=Cpu)

    @property
    def completed(self) -> int:
        return sum(1 for r in self.results if r.ok and r.text == self.expected)

    @property
    def tokens(self) -> int:
        return sum(delivered_tokens(r.text, self.expected) for r in self.results)

    def ttfts(self) -> list[float]:
        return [r.ttft for r in self.results if r.ttft is not None]

    def totals(self) -> list[float]:
        return [r.total for r in self.results if r.total is not None and r.ok]

    def errors(self) -> list[str]:
        return sorted({r.error or f"text mismatch / status {r.status}" for r in self.results if not r.ok})


# --- the load client: aiohttp and a small SSE reader --------------------------------------------


async def sse_events(response: aiohttp.ClientResponse) -> Any:
    """(id, data) of each event as bytes, comments skipped; LF-delimited (both servers send LF)."""
    buffer = b""
    async for chunk in response.content.iter_any():
        buffer += chunk
        while True:
            end = buffer.find(b"\n\n")
            if end < 0:
                break
            block, buffer = buffer[:end], buffer[end + 2 :]
            event_id = data = None
            for line in block.split(b"\n"):
                if line.startswith(b"data:"):
                    data = line[6:] if line[5:6] == b" " else line[5:]
                elif line.startswith(b"id:"):
                    event_id = line[3:].strip()
            if data is not None:
                yield event_id, data


class Client:
    """The benchmark's HTTP side: one aiohttp session per target, keep-alive, no connection limit."""

    def __init__(self, *, upstream: str, minichat: str) -> None:
        self.upstream = upstream  # http://127.0.0.1:<port>/v1
        self.minichat = minichat  # http://127.0.0.1:<port>
        self.api = minichat  # where creates and cancels go: the same origin (a profiling run may split it)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)
        # Idle connections are dropped before the servers drop them (uvicorn: 5 s): a request sent on a
        # connection the server is closing fails (ServerDisconnectedError), and a cancel lost that way
        # left its stream running for minutes.
        self.direct_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=2.0),
            timeout=timeout,
            auto_decompress=False,
        )
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=2.0),
            timeout=timeout,
            auto_decompress=False,
        )

    async def close(self) -> None:
        await self.direct_session.close()
        await self.session.close()

    async def call(
        self, method: str, path: str, expect: int, *, token: str | None = None, body: Any = None
    ) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.session.request(method, self.minichat + path, json=body, headers=headers) as response:
            payload = await response.read()
            if response.status != expect:
                raise BenchError(
                    f"{method} {path}: expected {expect}, got {response.status}: {payload[:300]!r}"
                )
            return json.loads(payload) if payload else None

    async def direct(self, model: str) -> StreamResult:
        """One stream read straight from the upstream, as MiniChat's provider asks for it."""
        result = StreamResult()
        body = {
            "model": model,
            "messages": [{"role": "user", "content": PROMPT}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        parts: list[str] = []
        started = time.perf_counter()
        try:
            async with self.direct_session.post(
                self.upstream + "/chat/completions", json=body, headers={"Authorization": "Bearer sk-bench"}
            ) as response:
                if response.status != 200:
                    result.error = f"HTTP {response.status}"
                    return result
                async for _, data in sse_events(response):
                    if data == b"[DONE]":
                        result.ok = True
                        break
                    choices = json.loads(data).get("choices")
                    if choices:
                        text = choices[0]["delta"].get("content")
                        if text:
                            if result.ttft is None:
                                result.ttft = time.perf_counter() - started
                            parts.append(text)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            result.error = type(exc).__name__
        result.total = time.perf_counter() - started
        result.text = "".join(parts)
        return result

    async def create(self, user: User, model: str, result: StreamResult, started: float) -> Any:
        """POST the generation; its reply, or None (the error noted in `result`)."""
        async with self.session.post(
            f"{self.api}/api/chats/{user.chat_id}/generations",
            json={"content": PROMPT, "model": model},
            headers={"Authorization": f"Bearer {user.token}"},
        ) as response:
            created = await response.read()
            if response.status != 201:
                result.error = f"create HTTP {response.status}: {created[:120]!r}"
                return None
        result.created = time.perf_counter() - started
        return json.loads(created)

    async def minichat_stream(
        self,
        user: User,
        model: str,
        *,
        cancel_after: Callable[[], float] | None = None,
    ) -> StreamResult:
        """Create a generation, open its streamUrl and read to `done`; optionally cancel mid-stream."""
        result = StreamResult()
        started = time.perf_counter()
        try:
            reply = await self.create(user, model, result, started)
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
            result.error = type(exc).__name__
            reply = None
        if reply is None:
            result.total = time.perf_counter() - started
            return result
        return await self.read_stream(user, reply, result, started, cancel_after=cancel_after)

    async def read_stream(
        self,
        user: User,
        reply: Any,
        result: StreamResult,
        started: float,
        *,
        cancel_after: Callable[[], float] | None = None,
    ) -> StreamResult:
        """Open a created generation's streamUrl and read it to `done`."""
        parts: list[str] = []
        canceller: asyncio.Task[float] | None = None
        try:
            async with self.session.get(self.minichat + reply["streamUrl"]) as response:
                if response.status != 200:
                    result.error = f"stream HTTP {response.status}"
                    return result
                result.opened = time.perf_counter() - started
                async for _, data in sse_events(response):
                    event = json.loads(data)
                    kind = event["type"]
                    if kind == "delta":
                        if result.ttft is None:
                            result.ttft = time.perf_counter() - started
                            if cancel_after is not None:
                                canceller = asyncio.create_task(
                                    self._cancel_later(user, reply["generationId"], cancel_after())
                                )
                        parts.append(event["delta"])
                    elif kind == "done":
                        done_at = time.perf_counter()
                        result.status = event["status"]
                        result.ok = result.status == ("canceled" if cancel_after else "succeeded")
                        if canceller is not None:
                            sent = await canceller
                            result.cancel_to_done = done_at - sent
                            canceller = None
                        break
                    elif kind == "error":
                        result.error = f"error event {event.get('code')}"
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
            result.error = type(exc).__name__
        finally:
            if canceller is not None:
                canceller.cancel()
        result.total = time.perf_counter() - started
        result.text = "".join(parts)
        if result.ok and cancel_after is None and result.text == "":
            result.ok = False
        return result

    async def _cancel_later(self, user: User, generation_id: str, delay: float) -> float:
        """Cancel after `delay` seconds; the moment the cancel request was sent."""
        await asyncio.sleep(delay)
        sent = time.perf_counter()
        async with self.session.post(
            f"{self.api}/api/generations/{generation_id}/cancel",
            headers={"Authorization": f"Bearer {user.token}"},
        ) as response:
            await response.read()
            if response.status != 200:
                raise BenchError(f"cancel: HTTP {response.status}")
        return sent


@dataclass(frozen=True)
class User:
    token: str
    chat_id: str


# --- processes --------------------------------------------------------------------------------


class Server(ServerProcess):
    async def wait_ready(self, url: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while True:
                self.check_alive()
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with session.get(url) as response:
                        if response.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"{self.name} did not answer {url} within {timeout:.0f} s:\n{self.tail()}"
                    )
                await asyncio.sleep(0.1)


def spawn(name: str, argv: list[str], env: dict[str, str], port: int) -> Server:
    return Server.spawn(name, argv, env, port)


def base_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MINICHAT_", "AWS_", "OPENAI_"))
        and k not in ("DATABASE_URL", "REDIS_URL", "RABBITMQ_URL")
    }


def server_env(upstream: str, workers: int | None = None, root: Path = ROOT) -> dict[str, str]:
    env = base_env()
    if root != ROOT:  # another checkout's code (an A/B comparison): its packages first on the path
        env["PYTHONPATH"] = f"{root / 'layers' / 'core'}:{root / 'local'}"
    env.update(
        {
            "MINICHAT_ENV": "local",
            "MINICHAT_ROOT": str(root),
            "DATABASE_URL": DATABASE_URL,
            "REDIS_URL": REDIS_URL,
            "RABBITMQ_URL": BROKER_URL,
            "MINICHAT_JWT_SECRET": "bench-" + secrets.token_urlsafe(48),
            "MINICHAT_LOG_LEVEL": "WARNING",
            "OPENAI_BASE_URL": upstream,
            "OPENAI_API_KEY": "sk-bench",
            "MINICHAT_OPENAI_MODELS": ",".join(MODELS),
            "MINICHAT_DEFAULT_MODEL": STREAM_MODEL,
            # 100 users register from one address within seconds; registration is not what is measured.
            "MINICHAT_RATE_LOGIN_IP": "100000/60",
        }
    )
    if workers:
        env["MINICHAT_WORKERS"] = str(workers)
    return env


def drop_database() -> None:
    benchlib.drop_database(PG_ADMIN_URL, BENCH_DB)


def ensure_vhost() -> None:
    benchlib.ensure_vhost(BROKER_URL, VHOST, purge=True)


def flush_redis() -> None:
    benchlib.flush_redis(REDIS_URL)


# --- the phases -------------------------------------------------------------------------------


@dataclass
class Round:
    number: int
    direct: Burst
    minichat: Burst
    probe_ms: float = 0.0  # benchlib.cpu_probe() just before the pair: the machine's speed then

    @property
    def ratio(self) -> float:
        return pct(self.minichat.totals(), 50) / pct(self.direct.totals(), 50)

    @property
    def ttft_extra_ms(self) -> float:
        return (pct(self.minichat.ttfts(), 50) - pct(self.direct.ttfts(), 50)) * 1000

    @property
    def lost(self) -> int:
        """Streams and tokens MiniChat lost (or garbled), or that the direct read lost."""
        lost = 0
        for b in (self.direct, self.minichat):
            lost += len(b.results) - b.completed + len(b.results) * TOKENS - b.tokens
        return lost


@dataclass
class Setup:
    """A burst of 1-token generations: all created first, then all their streams opened."""

    create: Burst
    open: Burst


@dataclass
class Report:
    plan: Plan
    workers: int | None = None
    rounds: list[Round] = field(default_factory=list)
    big: list[Round] = field(default_factory=list)
    big_cold: Round | None = None  # the first 500-stream pair: warms MiniChat's pools, not in the median
    cancel: list[StreamResult] = field(default_factory=list)
    cancel_cpu: Cpu = field(default_factory=Cpu)
    fast_direct: list[StreamResult] = field(default_factory=list)
    fast_minichat: list[StreamResult] = field(default_factory=list)
    setup: list[Setup] = field(default_factory=list)


async def burst(name: str, meter: CpuMeter, expected: str, runs: list[Awaitable[StreamResult]]) -> Burst:
    cpu = Cpu()
    async with meter.phase(cpu):
        results = await asyncio.gather(*runs)
        await asyncio.sleep(SETTLE_S)
    return Burst(name, list(results), expected, cpu)


async def setup_burst(client: Client, meter: CpuMeter, users: list[User]) -> Setup:
    """Create a 1-token generation per user (one CPU phase), then read all their streams (another): the
    second phase is the stream function's setup and finish, apart from the create."""
    expected = stub_text(1)
    starts = [StreamResult() for _ in users]
    create_cpu, open_cpu = Cpu(), Cpu()

    async def create(user: User, result: StreamResult) -> Any:
        try:
            return await client.create(user, SETUP_MODEL, result, time.perf_counter())
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
            result.error = type(exc).__name__
            return None

    async with meter.phase(create_cpu):
        replies = await asyncio.gather(*(create(u, r) for u, r in zip(users, starts, strict=True)))
        await asyncio.sleep(SETTLE_S)
    for result, reply in zip(starts, replies, strict=True):
        result.ok = reply is not None

    async def read(user: User, reply: Any, result: StreamResult) -> StreamResult:
        if reply is None:
            return result
        return await client.read_stream(user, reply, StreamResult(), time.perf_counter())

    async with meter.phase(open_cpu):
        results = await asyncio.gather(
            *(read(u, reply, r) for u, reply, r in zip(users, replies, starts, strict=True))
        )
        await asyncio.sleep(SETTLE_S)
    opened = Burst("open", list(results), expected, open_cpu)
    return Setup(Burst("create", starts, expected, create_cpu), opened)


async def register(client: Client, count: int) -> list[User]:
    """`count` users, one chat each (registration hashes a password: a few at a time)."""
    semaphore = asyncio.Semaphore(4)

    async def one(i: int) -> User:
        async with semaphore:
            auth = await client.call(
                "POST",
                "/api/auth/register",
                201,
                body={"email": f"stream{i}-{secrets.token_hex(3)}@example.com", "password": PASSWORD},
            )
            chat = await client.call(
                "POST", "/api/chats", 201, token=auth["accessToken"], body={"title": "bench"}
            )
            return User(token=auth["accessToken"], chat_id=chat["id"])

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def pair(client: Client, meter: CpuMeter, users: list[User], number: int) -> Round:
    """A direct round, then a MiniChat round, of concurrent streams of STREAM_MODEL (one per user)."""
    expected = stub_text(TOKENS)
    probe = benchlib.cpu_probe()
    direct = await burst("direct", meter, expected, [client.direct(STREAM_MODEL) for _ in users])
    minichat = await burst(
        "minichat", meter, expected, [client.minichat_stream(u, STREAM_MODEL) for u in users]
    )
    return Round(number, direct, minichat, probe)


async def run_phases(
    plan: Plan,
    client: Client,
    meter: CpuMeter,
    report: Report,
    log: Callable[[str], None],
    profile: Callable[[], Any] | None = None,
    profile_phase: str = "rounds",
) -> None:
    everyone = await register(client, max(plan.users, plan.big))
    users = everyone[: plan.users]
    log(f"registered {len(everyone)} users")

    # One stream each way first: the server is up and both paths work before anything is timed.
    for check in (await client.direct(SETUP_MODEL), await client.minichat_stream(users[0], SETUP_MODEL)):
        if not check.ok or check.text != stub_text(1):
            raise BenchError(f"a first stream failed: {check}")
    # A warm-up pair, not reported: connection pools, the first claims and finishes.
    await pair(client, meter, users, 0)

    def profiled(phase: str) -> Any:
        return profile() if profile is not None and profile_phase == phase else None

    def stop(profiler: Any) -> None:
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)  # py-spy writes its profile on SIGINT
            profiler.wait(timeout=60)

    profiler = profiled("rounds")
    for number in range(1, plan.pairs + 1):
        r = await pair(client, meter, users, number)
        report.rounds.append(r)
        log(
            f"pair {number} (probe {r.probe_ms:.1f} ms): whole p50 {pct(r.direct.totals(), 50):.3f}s /"
            f" {pct(r.minichat.totals(), 50):.3f}s, ttft p50 {pct(r.direct.ttfts(), 50) * 1000:.0f}ms /"
            f" {pct(r.minichat.ttfts(), 50) * 1000:.0f}ms,"
            f" completed {r.direct.completed}/{r.minichat.completed}"
        )
    stop(profiler)

    # Setup cost: bursts of 1-token generations, created first, then streamed (create + open + claim +
    # one token + finish), each step its own CPU phase.
    profiler = profiled("setup")
    for _ in range(plan.setup_bursts):
        report.setup.append(await setup_burst(client, meter, users))
    stop(profiler)
    log("setup bursts done")

    for number in range(0 if plan.big_pairs else 1, plan.big_pairs + 1):
        await asyncio.sleep(1.0)
        b = await pair(client, meter, everyone[: plan.big], number)
        if number == 0:
            report.big_cold = b
        else:
            report.big.append(b)
        log(
            f"{plan.big} streams, pair {number} (probe {b.probe_ms:.1f} ms): whole p50 ratio {b.ratio:.3f},"
            f" completed {b.minichat.completed}"
        )

    # 256 tokens as fast as the upstream sends them, one stream at a time, the two paths alternating.
    fast = stub_text(FAST_TOKENS)
    for i in range(plan.fast_reps):
        d = await client.direct(FAST_MODEL)
        m = await client.minichat_stream(users[i % len(users)], FAST_MODEL)
        for one in (d, m):
            if one.text != fast:
                one.ok = False
        report.fast_direct.append(d)
        report.fast_minichat.append(m)
        await asyncio.sleep(0.02)
    log("fast streams done")

    # Cancel-to-done: slow streams, each cancelled 0.3-1.3 s after its first delta.
    rng = random.Random(7)
    async with meter.phase(report.cancel_cpu):
        for _ in range(plan.cancel_waves):
            wave = await asyncio.gather(
                *(
                    client.minichat_stream(u, SLOW_MODEL, cancel_after=lambda: rng.uniform(0.3, 1.3))
                    for u in users[: plan.cancel_per_wave]
                )
            )
            report.cancel.extend(wave)
            await asyncio.sleep(0.3)
    log("cancels done")


# --- the table --------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def mark(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def render(report: Report) -> tuple[str, bool]:
    lines: list[str] = []
    all_ok = True
    plan = report.plan
    out = lines.append

    def round_rows(r: Round, label: str) -> None:
        for b in (r.direct, r.minichat):
            n = len(b.results)
            created = [x.created for x in b.results if x.created is not None]
            opened = [x.opened for x in b.results if x.opened is not None]
            steps = f"{ms(pct(created, 50)):>9}{ms(pct(opened, 50)):>10}" if created else ""
            out(
                f"{label if b is r.direct else '':8}{b.name:10}"
                f"{b.completed:>5}/{n:<3}{b.tokens:>7}/{n * TOKENS:<6}"
                f"{ms(pct(b.ttfts(), 50)):>9}{ms(pct(b.ttfts(), 99)):>7}"
                f"{ms(pct(b.totals(), 50)):>11}{ms(pct(b.totals(), 99)):>7}{steps}"
            )
            if b.errors():
                out(f"{'':18}lost: {'; '.join(b.errors())[:200]}")
        out(
            f"{'':8}{'vs direct':10}{'lost ' + str(r.lost):>9}{'':14}"
            f"{r.ttft_extra_ms:>+7.0f}ms{'':7}{r.ratio:>10.3f}x"
            f"   probe {r.probe_ms:.1f} ms"
        )

    def header() -> None:
        out(
            f"{'':8}{'path':10}{'streams':>9}{'tokens':>14}{'TTFT p50':>9}{'p99':>7}{'whole p50':>11}"
            f"{'p99':>7}{'201 p50':>9}{'open p50':>10}"
        )
        out(f"{'':8}{'':10}{'':>9}{'':>14}{'ms':>9}{'ms':>7}{'ms':>11}{'ms':>7}{'ms':>9}{'ms':>10}")

    out("")
    out(
        f"Streaming: {plan.users} concurrent streams of {TOKENS} tokens at {RATE} tokens/s "
        f"({STREAM_MODEL}), direct vs through MiniChat local mode"
        f" ({f'MINICHAT_WORKERS={report.workers}' if report.workers else 'default workers: one per core'}),"
        f" {plan.pairs} interleaved pairs (direct round, then MiniChat round) after a warm-up pair;"
        " probe: benchlib.cpu_probe() before the pair (the machine's speed; higher is slower)"
    )
    header()
    for r in report.rounds:
        round_rows(r, f"pair {r.number}")
    extra = median([r.ttft_extra_ms for r in report.rounds])
    ratio = median([r.ratio for r in report.rounds])
    lost = sum(r.lost for r in report.rounds)
    lost_ok, ratio_ok, extra_ok = lost == 0, ratio <= TARGET_WHOLE_RATIO, extra <= TARGET_TTFT_EXTRA_MS
    all_ok = all_ok and lost_ok and ratio_ok and extra_ok
    out(
        f"  median of {len(report.rounds)} pairs: TTFT p50 direct {extra:+.0f} ms"
        f" (target ≤ +{TARGET_TTFT_EXTRA_MS:.0f}, aim +{AIM_TTFT_EXTRA_MS:.0f}: {mark(extra_ok)});"
        f" whole-stream p50 {ratio:.3f}x of direct (target ≤ {TARGET_WHOLE_RATIO}x, aim {AIM_WHOLE_RATIO}x:"
        f" {mark(ratio_ok)}); streams or tokens lost: {lost} ({mark(lost_ok)})"
    )

    if report.big:
        out("")
        out(
            f"{plan.big} concurrent streams of {STREAM_MODEL}: {len(report.big)} interleaved pairs after a"
            " cold one (400 users' first streams: MiniChat opens 400 more upstream and Redis connections)"
        )
        header()
        if report.big_cold is not None:
            round_rows(report.big_cold, "cold")
        for b in report.big:
            round_rows(b, f"pair {b.number}")
        ratio = median([b.ratio for b in report.big])
        lost = sum(b.lost for b in report.big) + (report.big_cold.lost if report.big_cold is not None else 0)
        big_ok = lost == 0 and ratio <= TARGET_BIG_WHOLE_RATIO
        all_ok = all_ok and big_ok
        client_cpu = median([b.minichat.cpu.client for b in report.big])
        wall = median([b.minichat.cpu.wall for b in report.big])
        out(
            f"  median of {len(report.big)} pairs: whole-stream p50 {ratio:.3f}x of direct, lost {lost};"
            f" target: nothing lost, ≤ {TARGET_BIG_WHOLE_RATIO}x: {mark(big_ok)}. The load client used"
            f" {client_cpu:.2f} s of CPU in {wall:.2f} s ({client_cpu / wall * 100:.0f}% of one core;"
            f" direct round {median([b.direct.cpu.client for b in report.big]):.2f} s); the server"
            f" {median([b.minichat.cpu.server for b in report.big]):.2f} s (medians)"
            + (f"; the cold pair {report.big_cold.ratio:.3f}x" if report.big_cold is not None else "")
        )

    out("")
    samples = [r.cancel_to_done for r in report.cancel if r.cancel_to_done is not None]
    bad = [r for r in report.cancel if not r.ok or r.cancel_to_done is None]
    cancel_ok = bool(samples) and not bad and pct(samples, 99) * 1000 <= TARGET_CANCEL_P99_MS
    all_ok = all_ok and cancel_ok
    out(
        f"Cancel → done ({SLOW_MODEL}, {plan.cancel_waves} wave(s) of {plan.cancel_per_wave}"
        " concurrent streams, each cancelled 0.3-1.3 s after its first delta)"
    )
    if samples:
        out(
            f"  samples {len(samples)}  p50 {pct(samples, 50) * 1000:.1f} ms"
            f"  p90 {pct(samples, 90) * 1000:.1f} ms  p99 {pct(samples, 99) * 1000:.1f} ms"
            f"  max {max(samples) * 1000:.1f} ms"
            f"   target p99 ≤ {TARGET_CANCEL_P99_MS:.0f} ms: {mark(cancel_ok)}"
        )
    if bad:
        reasons = sorted({r.error or f"status {r.status}" for r in bad})
        out(f"  {len(bad)} stream(s) did not end canceled: {'; '.join(reasons)[:200]}")

    out("")
    fd = [r.ttft for r in report.fast_direct if r.ttft is not None and r.ok]
    fm = [r.ttft for r in report.fast_minichat if r.ttft is not None and r.ok]
    fdw = [r.total for r in report.fast_direct if r.total is not None and r.ok]
    fmw = [r.total for r in report.fast_minichat if r.total is not None and r.ok]
    fast_lost = len(report.fast_direct) + len(report.fast_minichat) - len(fd) - len(fm)
    overhead = (pct(fm, 50) - pct(fd, 50)) * 1000
    paired = [
        (m.ttft - d.ttft) * 1000
        for d, m in zip(report.fast_direct, report.fast_minichat, strict=True)
        if d.ttft is not None and m.ttft is not None and d.ok and m.ok
    ]
    fast_ok = overhead <= TARGET_FAST_TTFT_OVERHEAD_MS and fast_lost == 0
    all_ok = all_ok and fast_ok
    out(
        f"One stream of {FAST_TOKENS} tokens as fast as the upstream sends ({FAST_MODEL}),"
        f" {plan.fast_reps} repetitions each, one at a time"
    )
    out(
        f"  TTFT p50 direct {pct(fd, 50) * 1000:.2f} ms, MiniChat {pct(fm, 50) * 1000:.2f} ms;"
        f" overhead p50 {overhead:.2f} ms (paired p50 {pct(paired, 50):.2f}, p90 {pct(paired, 90):.2f})"
        f"   target ≤ {TARGET_FAST_TTFT_OVERHEAD_MS:.0f} ms: {mark(fast_ok)}"
    )
    out(
        f"  whole stream p50 direct {pct(fdw, 50) * 1000:.1f} ms, MiniChat {pct(fmw, 50) * 1000:.1f} ms"
        + (f"; {fast_lost} stream(s) incomplete" if fast_lost else "")
    )

    out("")
    out(
        "CPU of the MiniChat server: 'serving' is its worker processes (all their threads: the stream"
        " function, the API, their database threads), 'loop' their main threads (the event loops),"
        " 'background' the supervisor (outbox relay, RabbitMQ consumer and worker handler, reaper)"
    )
    setup_lost = sum(len(s.open.results) - s.open.completed for s in report.setup)
    if setup_lost:
        reasons = sorted({e for s in report.setup for b in (s.create, s.open) for e in b.errors()})
        out(f"  setup bursts: {setup_lost} stream(s) lost: {'; '.join(reasons)[:300]}")

    def per(cpu_of: Callable[[Burst], float], bursts: list[Burst]) -> float:
        return median([cpu_of(b) / len(b.results) for b in bursts])

    def serving(b: Burst) -> float:
        return b.cpu.server - b.cpu.background

    opens = [s.open for s in report.setup]
    creates = [s.create for s in report.setup]
    stream_s, stream_loop, stream_bg = (
        per(serving, opens),
        per(lambda b: b.cpu.server_loop, opens),
        per(lambda b: b.cpu.background, opens),
    )
    create_s, create_bg = per(serving, creates), per(lambda b: b.cpu.background, creates)
    setup_ok = stream_s * 1000 <= TARGET_STREAM_SETUP_MS and setup_lost == 0
    out(
        f"  a stream's setup and finish (open, claim, one token, finish; {len(opens)} burst(s) of"
        f" {plan.users} 1-token streams, median): {stream_s * 1000:.2f} ms (loop {stream_loop * 1000:.2f} ms;"
        f" background {stream_bg * 1000:.2f} ms)   target ≤ {TARGET_STREAM_SETUP_MS:.0f} ms: {mark(setup_ok)}"
    )
    out(
        f"  a generation's create (POST, before its stream opens): {create_s * 1000:.2f} ms"
        f" (background {create_bg * 1000:.2f} ms)"
    )
    per_token = []
    per_token_loop = []
    for r in report.rounds:
        n = len(r.minichat.results)
        per_stream = create_s + stream_s
        per_stream_loop = per(lambda b: b.cpu.server_loop, creates) + stream_loop
        tokens = max(1, r.minichat.tokens - n)
        per_token.append((serving(r.minichat) - n * per_stream) / tokens)
        per_token_loop.append((r.minichat.cpu.server_loop - n * per_stream_loop) / tokens)
    token_ok = median(per_token) * 1e6 <= TARGET_TOKEN_US
    all_ok = all_ok and setup_ok and token_ok
    out(
        f"  one relayed token (the pairs' MiniChat rounds, serving processes, less {plan.users} creates and"
        f" setups): median {median(per_token) * 1e6:.0f} µs ("
        + ", ".join(f"{t * 1e6:.0f}" for t in per_token)
        + f"; loop {', '.join(f'{t * 1e6:.0f}' for t in per_token_loop)})"
        f"   target ≤ {TARGET_TOKEN_US:.0f} µs: {mark(token_ok)}"
    )
    out(
        f"  {'phase':22}{'wall s':>7}{'server':>8}{'loop':>7}{'bgnd':>7}{'stub':>7}{'client':>7}"
        f"{'pg':>6}{'redis':>6}{'mq':>6}{'others':>7}   (CPU seconds)"
    )

    def cpu_row(name: str, cpu: Cpu) -> None:
        out(
            f"  {name:22}{cpu.wall:>7.2f}{cpu.server:>8.2f}{cpu.server_loop:>7.2f}{cpu.background:>7.2f}"
            f"{cpu.stub:>7.2f}{cpu.client:>7.2f}{cpu.pg:>6.2f}{cpu.redis:>6.2f}{cpu.mq:>6.2f}{cpu.others:>7.2f}"
        )

    for r in report.rounds:
        cpu_row(f"pair {r.number} direct", r.direct.cpu)
        cpu_row(f"pair {r.number} minichat", r.minichat.cpu)
    for i, s in enumerate(report.setup, 1):
        cpu_row(f"setup {i}: creates", s.create.cpu)
        cpu_row(f"setup {i}: streams", s.open.cpu)
    for b in ([report.big_cold] if report.big_cold is not None else []) + report.big:
        cpu_row(f"{plan.big} #{b.number} direct", b.direct.cpu)
        cpu_row(f"{plan.big} #{b.number} minichat", b.minichat.cpu)
    cpu_row("cancel waves", report.cancel_cpu)
    out("")
    out(f"All targets: {'met' if all_ok else 'MISSED'}")
    return "\n".join(lines), all_ok


# --- main -------------------------------------------------------------------------------------


async def main_async(plan: Plan, args: argparse.Namespace) -> int:
    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    python = sys.executable
    stub_port, api_port = free_port(), free_port()
    ensure_vhost()
    drop_database()
    flush_redis()
    stub = spawn(
        "stub",
        [
            python,
            "-m",
            "minichat_local.openai_stub",
            "--port",
            str(stub_port),
            "--tokens",
            str(TOKENS),
            "--rate",
            str(RATE),
            # Idle connections kept a minute (as the Bedrock stub keeps them, after AWS's endpoints), not
            # uvicorn's 5 s: both paths reuse their connections from one round to the next, as they do with
            # a server under steady traffic, instead of opening hundreds each round.
            "--keep-alive",
            "60",
        ],
        base_env(),
        stub_port,
    )
    upstream = f"http://127.0.0.1:{stub_port}/v1"
    server: Server | None = None
    client: Client | None = None
    try:
        server = spawn(
            "minichat",
            [python, "-m", "minichat_local", "--port", str(api_port)],
            server_env(upstream, args.workers, Path(args.root).resolve() if args.root else ROOT),
            api_port,
        )
        await stub.wait_ready(upstream + "/models")
        await server.wait_ready(f"http://127.0.0.1:{api_port}/api/health")
        log(f"stub pid {stub.proc.pid} on {stub_port}, minichat pid {server.proc.pid} on {api_port}")
        client = Client(upstream=upstream, minichat=f"http://127.0.0.1:{api_port}")
        meter = CpuMeter(server.proc.pid, stub.proc.pid)
        report = Report(plan, workers=args.workers)
        profile_path = args.profile
        try:
            pid = server.proc.pid

            def profile() -> subprocess.Popen[bytes]:
                # The server's Python stacks during the rounds, the thread holding the GIL only (where
                # the one core a server process can use goes). Sampling pauses the process: the rounds'
                # figures are not comparable with an unprofiled run.
                spy = str(Path(sys.executable).with_name("py-spy"))
                argv = [spy, "record", "--pid", str(pid), "--subprocesses", "--rate", "100", "--gil"]
                argv += ["--format", "raw"]
                return subprocess.Popen([*argv, "-o", str(profile_path)], stdout=subprocess.DEVNULL)

            await run_phases(
                plan, client, meter, report, log, profile if profile_path else None, args.profile_phase
            )
        finally:
            server.check_alive()
            stub.check_alive()
        text, ok = render(report)
        print(text, flush=True)
        if any(r.lost for r in report.rounds) or any(
            s.open.completed < len(s.open.results) for s in report.setup
        ):
            print(f"\nminichat log (last lines):\n{server.tail(15)}", file=sys.stderr)
        return 0 if ok else 3
    finally:
        if client is not None:
            await client.close()
        if server is not None:
            server.stop()
        stub.stop()
        if not args.keep:
            with contextlib.suppress(psycopg.Error):
                drop_database()
            with contextlib.suppress(Exception):
                flush_redis()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer cancel and fast-stream samples (< 60 s)")
    parser.add_argument("--keep", action="store_true", help="keep the database and Redis data afterwards")
    parser.add_argument(
        "--profile", metavar="PATH", help="record the server with py-spy (raw stacks, every process)"
    )
    parser.add_argument(
        "--profile-phase",
        choices=("rounds", "setup"),
        default="rounds",
        help="what --profile records: the pairs' rounds, or the setup bursts (1-token streams)",
    )
    parser.add_argument(
        "--root",
        metavar="DIR",
        help="serve another checkout's code (e.g. `git archive main | tar -x -C DIR`), for A/B runs",
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="MINICHAT_WORKERS for local mode (default: unset: local mode's default, one per core)",
    )
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    import uvloop  # comes with uvicorn[standard]; the load client runs on it, as the servers do

    try:
        return uvloop.run(main_async(plan, args))
    except BenchError as exc:
        print(f"bench_stream: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
