"""Benchmark: the stream function's Redis calls, CPU of the event loop's process, ours beside a baseline.

    python bench/bench_redis.py            # 15 interleaved pairs per figure, about a minute
    python bench/bench_redis.py --pairs 5

Three figures, each measured as interleaved pairs (baseline, then ours, on the same asyncio client and
Redis db `MINICHAT_BENCH_REDIS_DB`, default 10, flushed before and after), medians reported with
benchlib.cpu_probe() before and after (this machine's speed swings):

- a stream's small commands (its connection's slot taken, its cancel flag read, its lock released, its
  slot given back): each through redis-py's client (the baseline) or through `kv.Coalescing`, for one
  stream at a time and for 100 streams at once;
- the engine's keep-alive for 250 runs (one worker's share of 500 streams): an `MGET` of the cancel
  flags and then one lock-renewal script call per run (the baseline, the calls it replaced, kept here)
  or `limits.renew_runs_async`;
- the event buffer's writer, 250-event batches: a pipeline of `XADD` + `EXPIRE` per event (the
  baseline) or `buffer.Writer`'s one script call;
- the event buffer's writer at a steady 2,500 events a second (a worker's share of 100 streams at 50
  tokens/s) for 2 s, the whole process's CPU (the writer's task, its timer and wake-ups, and the feeder
  that appends the events) an event: batches gathered for 10 ms (the baseline, the window before) or
  for `buffer.BATCH_S`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio

import benchlib
from minichat import accounts, buffer, kv, limits
from minichat.sse import encode_delta

REDIS_URL = f"redis://127.0.0.1:6379/{os.environ.get('MINICHAT_BENCH_REDIS_DB', '10')}"
RUNS = 250
BATCH = 250
RATE_STREAMS, RATE_TICK_S, RATE_PER_TICK, RATE_S = 50, 0.004, 10, 2.0  # 2,500 events a second for 2 s

# The per-run renewal the keep-alive called before renew_runs_async (its baseline here).
_RENEW_ONE = kv.Script("""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
""")


async def cpu_us(body: Callable[[], Awaitable[None]], *, divide: int) -> float:
    started = time.process_time()
    await body()
    return (time.process_time() - started) * 1e6 / divide


async def pairs(
    count: int, base: Callable[[], Awaitable[float]], ours: Callable[[], Awaitable[float]]
) -> tuple[float, float, int]:
    """Medians of `count` interleaved pairs, and in how many pairs ours used less CPU."""
    a, b = [], []
    for _ in range(count):
        a.append(await base())
        b.append(await ours())
    return statistics.median(a), statistics.median(b), sum(1 for x, y in zip(a, b, strict=True) if y < x)


async def stream_commands(client: Any) -> None:
    user_id, generation_id, slot = str(uuid.uuid4()), str(uuid.uuid4()), uuid.uuid4().hex
    await limits.open_stream_async(
        client, user_id=user_id, connection_id=slot, limit=8, unless_exists=accounts.deleted_key(user_id)
    )
    await client.exists(f"generation:{generation_id}:cancel")
    await asyncio.sleep(0.002)  # the stream runs
    await limits.release_inflight_async(client, user_id=user_id, generation_id=generation_id)
    await limits.close_stream_async(client, user_id=user_id, connection_id=slot)


async def steady_writes(client: Any, batch_s: float) -> float:
    """CPU µs an event of this process while a buffer.Writer gathering for `batch_s` takes a steady
    stream of events (RATE_STREAMS buffers, RATE_PER_TICK events every RATE_TICK_S), until all is written."""
    writer = buffer.Writer(client, ttl=60, batch_s=batch_s)
    task = asyncio.create_task(writer.run())
    tag = uuid.uuid4().hex
    runs: list[tuple[str, list[bytes]]] = [(f"bench-{tag}-{i}", []) for i in range(RATE_STREAMS)]
    loop = asyncio.get_running_loop()
    events = 0
    started, cpu = loop.time(), time.process_time()
    while loop.time() - started < RATE_S:
        for _ in range(RATE_PER_TICK):
            generation_id, frames = runs[events % RATE_STREAMS]
            frames.append(encode_delta(len(frames) + 1, " tok"))
            writer.append(generation_id, frames, end=False)
            events += 1
        await asyncio.sleep(RATE_TICK_S)
    if not await writer.written(timeout=10):
        raise benchlib.BenchError("the writer did not write everything in 10 s")
    used = time.process_time() - cpu
    task.cancel()
    await client.delete(*(buffer.key(generation_id) for generation_id, _ in runs))
    return used * 1e6 / events


async def main_async(count: int) -> list[str]:
    client = redis.asyncio.Redis.from_url(REDIS_URL, max_connections=200, driver_info=None)
    commands = kv.Coalescing(client)
    rows: list[str] = []
    try:
        # 1. a stream's four small commands
        for streams, repeat in ((1, 100), (100, 1)):

            def through(target: Any, streams: int = streams, repeat: int = repeat) -> Any:
                async def body() -> None:
                    for _ in range(repeat):
                        await asyncio.gather(*(stream_commands(target) for _ in range(streams)))

                return lambda: cpu_us(body, divide=streams * repeat)

            base, ours, won = await pairs(count, through(client), through(commands))
            rows.append(
                f"a stream's 4 small commands, {streams} stream(s) at once: kv.Coalescing {ours:,.0f} µs"
                f" | redis-py's client {base:,.0f} µs | ours less in {won} of {count} pairs"
            )

        # 2. the keep-alive of RUNS runs
        runs = [(str(uuid.uuid4()), str(uuid.uuid4())) for _ in range(RUNS)]
        for user_id, generation_id in runs:
            await client.set(limits.inflight_key(user_id), generation_id, px=600_000)
        flags = [f"generation:{g}:cancel" for _, g in runs]

        async def one_by_one() -> None:
            await client.mget(flags)
            for user_id, generation_id in runs:
                await kv.run_script_async(
                    client, _RENEW_ONE, [limits.inflight_key(user_id)], [generation_id, limits.LOCK_TTL_MS]
                )

        async def together() -> None:
            await limits.renew_runs_async(client, [(u, g, f) for (u, g), f in zip(runs, flags, strict=True)])

        base, ours, won = await pairs(
            count, lambda: cpu_us(one_by_one, divide=1), lambda: cpu_us(together, divide=1)
        )
        rows.append(
            f"the keep-alive of {RUNS} runs: one call {ours / 1000:.1f} ms | a call per run after an MGET"
            f" {base / 1000:.1f} ms | ours less in {won} of {count} pairs"
        )

        # 3. the buffer writer, BATCH-event batches
        writer = buffer.Writer(client, ttl=3600)
        number = 0

        def batch(tag: str) -> list[buffer.Entry]:
            entries: list[buffer.Entry] = []
            for i in range(BATCH):
                frames = [encode_delta(n, f" tok{n}") for n in range(1, number + 1)]
                entries.append((f"bench-{tag}-{i:04d}", number, frames[-1], False, frames))
            return entries

        async def pipelined() -> float:
            entries = batch("pipeline")
            started = time.process_time()
            pipe = client.pipeline(transaction=False)
            for generation_id, n, frame, _, _ in entries:
                pipe.xadd(buffer.key(generation_id), {"f": frame}, id=f"0-{n}")
                pipe.expire(buffer.key(generation_id), 3600)
            await pipe.execute()
            return (time.process_time() - started) * 1e6 / BATCH

        async def scripted() -> float:
            entries = batch("script")
            started = time.process_time()
            unsent = await writer._send(entries)
            if unsent:
                raise benchlib.BenchError(f"the writer left {len(unsent)} events unsent")
            return (time.process_time() - started) * 1e6 / BATCH

        async def pipelined_next() -> float:
            nonlocal number
            number += 1
            return await pipelined()

        base, ours, won = await pairs(count, pipelined_next, scripted)
        rows.append(
            f"the buffer writer, {BATCH}-event batches: one script call {ours:.1f} µs an event"
            f" | a pipeline of XADD + EXPIRE {base:.1f} µs | ours less in {won} of {count} pairs"
        )

        # 4. the buffer writer at a steady rate, two batching windows
        steady = max(3, count // 3)  # 4 s a pair
        base, ours, won = await pairs(
            steady, lambda: steady_writes(client, 0.01), lambda: steady_writes(client, buffer.BATCH_S)
        )
        rate = RATE_PER_TICK / RATE_TICK_S
        rows.append(
            f"the buffer writer at about {rate:,.0f} events a second (the process's CPU, feeder included):"
            f" batches of {buffer.BATCH_S * 1000:.0f} ms {ours:.1f} µs an event"
            f" | batches of 10 ms {base:.1f} µs | ours less in {won} of {steady} pairs"
        )
    finally:
        await client.aclose()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=15, help="interleaved pairs per figure (default 15)")
    args = parser.parse_args()
    benchlib.flush_redis(REDIS_URL)
    before = benchlib.cpu_probe()
    try:
        rows = asyncio.run(main_async(args.pairs))
    finally:
        benchlib.flush_redis(REDIS_URL)
    after = benchlib.cpu_probe()
    print(
        f"The stream function's Redis calls: CPU of this process (the event loop's, client side), medians of"
        f" {args.pairs} interleaved pairs; probe {before:.1f} ms before, {after:.1f} ms after"
        " (benchlib.cpu_probe(): higher is slower)"
    )
    for row in rows:
        print("  " + row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
