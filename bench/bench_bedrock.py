"""Benchmark: Amazon Bedrock streams through MiniChat local mode, beside the same streams read with boto3.

    python bench/bench_bedrock.py            # 3 pairs of rounds, ~1 min
    python bench/bench_bedrock.py --pairs 5

What it does, in one run:
- starts the Bedrock stand-in (`python -m minichat_local.bedrock_stub`: AWS event-stream framing; the
  real boto3 client reads it directly, MiniChat's provider signs and sends its own requests), the
  OpenAI-compatible stub, and local mode configured with both
  (MINICHAT_BEDROCK_ENDPOINT_URL, dummy AWS credentials), each in its own session, on their own database
  (`minichat_bench_bedrock`, recreated, dropped at the end), Redis db (MINICHAT_BENCH_REDIS_DB, 11) and
  RabbitMQ vhost;
- registers 100 users, one chat each; one pair of rounds (below) unmeasured, to warm both sides' pools;
- interleaved pairs of rounds: 100 concurrent Bedrock streams of `stub-tokens-100-rate-50` (100 tokens at
  50 tokens/s) read (a) directly with boto3 `converse_stream` from this process (100 threads, one client,
  100 pooled connections), then (b) through MiniChat (create, open streamUrl, read SSE to `done`). Each
  pair gives a whole-stream p50 ratio; the verdict is the median of the pairs' ratios (target ≤ 1.25) and
  no stream lost (every text compared with the stand-in's);
- then one pair of the same 100 streams from the OpenAI-compatible stub (direct, then through MiniChat:
  the machine's state at that moment, for comparison), and a burst of 1-token
  streams on each path, for the server CPU per relayed token, Bedrock beside OpenAI: (CPU of a 100-token
  round - 100 x the CPU of one 1-token stream) / tokens relayed.

The bench client, the stand-ins, the server and PostgreSQL/Redis/RabbitMQ share the machine's cores: the
"others" column says how much CPU unrelated work took meanwhile (a busy machine gives noisier figures).
Exit status: 0 when the targets hold, 3 when one is missed, 1 when the run could not give figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import bench_stream
import psycopg
from bench_stream import Burst, Client, Cpu, CpuMeter, StreamResult, User, burst, pct, register

import benchlib
from benchlib import BenchError, free_port
from minichat_local.openai_stub import stub_text

PG_ADMIN_URL = bench_stream.PG_ADMIN_URL
BENCH_DB = "minichat_bench_bedrock"
DATABASE_URL = psycopg.conninfo.make_conninfo(PG_ADMIN_URL, dbname=BENCH_DB)
REDIS_URL = f"redis://127.0.0.1:6379/{os.environ.get('MINICHAT_BENCH_REDIS_DB', '11')}"
VHOST = "minichat_bench_bedrock"
BROKER_URL = os.environ.get("MINICHAT_BENCH_RABBITMQ_URL", f"amqp://guest:guest@127.0.0.1:5672/{VHOST}")
# CpuMeter counts the PostgreSQL backends of the bench database as "services".
bench_stream.BENCH_DB = BENCH_DB

TOKENS, RATE = bench_stream.TOKENS, bench_stream.RATE
STREAM_MODEL = bench_stream.STREAM_MODEL  # the same name on both stand-ins: "stub-tokens-100-rate-50"
SETUP_MODEL = bench_stream.SETUP_MODEL
BEDROCK_STREAM_MODEL = f"stub-tokens-{TOKENS}-rate-{RATE}-ttft-ms-0"  # one id, one provider
BEDROCK_SETUP_MODEL = "stub-tokens-1-ttft-ms-0"
PROMPT = bench_stream.PROMPT
REGION = "us-east-1"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "AKIDBENCHBEDROCK",
    "AWS_SECRET_ACCESS_KEY": "bench-secret-not-real",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
}
TARGET_WHOLE_RATIO = 1.25


class DirectBedrock:
    """The baseline: boto3 `converse_stream` straight to the stand-in, one thread per stream (what AWS's
    SDK gives a Python program)."""

    def __init__(self, endpoint_url: str, streams: int) -> None:
        os.environ.update(CREDENTIALS)
        import boto3
        from botocore.config import Config

        # The client MiniChat's provider used to build (pool, timeouts, retries) before it signed and sent
        # the requests itself from the event loop.
        self.client = boto3.session.Session().client(
            "bedrock-runtime",
            region_name=REGION,
            endpoint_url=endpoint_url,
            config=Config(
                connect_timeout=10,
                read_timeout=65,
                max_pool_connections=streams,
                tcp_keepalive=True,
                retries={"mode": "standard", "total_max_attempts": 2},
                parameter_validation=False,
            ),
        )
        self.executor = ThreadPoolExecutor(max_workers=streams, thread_name_prefix="direct-bedrock")

    def read(self, model: str) -> StreamResult:
        result = StreamResult()
        parts: list[str] = []
        started = time.perf_counter()
        try:
            response = self.client.converse_stream(
                modelId=model, messages=[{"role": "user", "content": [{"text": PROMPT}]}]
            )
            for event in response["stream"]:
                block = event.get("contentBlockDelta")
                if block is not None:
                    text = block["delta"].get("text")
                    if text:
                        if result.ttft is None:
                            result.ttft = time.perf_counter() - started
                        parts.append(text)
                elif "metadata" in event:
                    result.ok = True
        except Exception as exc:  # a lost stream is counted, whatever ended it
            result.error = type(exc).__name__
        result.total = time.perf_counter() - started
        result.text = "".join(parts)
        return result

    async def stream(self, model: str) -> StreamResult:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.read, model)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.client.close()


async def keep_alive_below_the_servers(client: Client) -> None:
    """Pooled connections are not reused after 3 s idle. uvicorn closes a connection idle for 5 s, and a
    create's connection sits idle about that long here (its stream, a direct round, two pauses): reused
    as the server closes it, a request fails with ServerDisconnectedError, a stream lost to the client
    and not to MiniChat."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)
    for name in ("session", "direct_session"):
        await getattr(client, name).close()
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=3)
        setattr(
            client, name, aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)
        )


def server_env(*, openai_url: str, bedrock_url: str) -> dict[str, str]:
    env = bench_stream.base_env()
    env.update(bench_stream.server_env(openai_url))
    env.update(CREDENTIALS)
    env.update(
        {
            "DATABASE_URL": DATABASE_URL,
            "REDIS_URL": REDIS_URL,
            "RABBITMQ_URL": BROKER_URL,
            "MINICHAT_OPENAI_MODELS": f"{STREAM_MODEL},{SETUP_MODEL}",
            "MINICHAT_BEDROCK_MODELS": f"{BEDROCK_STREAM_MODEL},{BEDROCK_SETUP_MODEL}",
            "MINICHAT_BEDROCK_REGION": REGION,
            "MINICHAT_BEDROCK_ENDPOINT_URL": bedrock_url,
            "MINICHAT_DEFAULT_MODEL": BEDROCK_STREAM_MODEL,
        }
    )
    return env


def per_token_cpu(round_: Burst, setup: Burst) -> float:
    """Server CPU µs per relayed token: the round's, less its streams' setup and finish."""
    per_stream = setup.cpu.server / max(1, len(setup.results))
    tokens = max(1, round_.tokens)
    return (round_.cpu.server - per_stream * len(round_.results)) / tokens * 1e6


def cpu_line(name: str, cpu: Cpu) -> str:
    return (
        f"  {name:26} wall {cpu.wall:5.2f} s  server {cpu.server:5.2f} s (loops {cpu.server_loop:5.2f})  "
        f"stand-in {cpu.stub:5.2f}  client {cpu.client:5.2f}  services {cpu.services:5.2f}  "
        f"others {cpu.others:5.2f}"
    )


async def run(args: argparse.Namespace) -> int:
    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    python = sys.executable
    bedrock_port, openai_port, api_port = free_port(), free_port(), free_port()
    benchlib.ensure_vhost(BROKER_URL, VHOST, purge=True)
    benchlib.drop_database(PG_ADMIN_URL, BENCH_DB)
    benchlib.flush_redis(REDIS_URL)
    stand_in_args = ["--tokens", str(TOKENS), "--rate", str(RATE)]
    bedrock = bench_stream.spawn(
        "bedrock-stand-in",
        [python, "-m", "minichat_local.bedrock_stub", "--port", str(bedrock_port), *stand_in_args],
        bench_stream.base_env(),
        bedrock_port,
    )
    openai = bench_stream.spawn(
        "openai-stub",
        [python, "-m", "minichat_local.openai_stub", "--port", str(openai_port), *stand_in_args],
        bench_stream.base_env(),
        openai_port,
    )
    bedrock_url = f"http://127.0.0.1:{bedrock_port}"
    openai_url = f"http://127.0.0.1:{openai_port}/v1"
    server: Any = None
    client: Client | None = None
    direct: DirectBedrock | None = None
    try:
        server = bench_stream.spawn(
            "minichat",
            [python, "-m", "minichat_local", "--port", str(api_port)],
            server_env(openai_url=openai_url, bedrock_url=bedrock_url),
            api_port,
        )
        await openai.wait_ready(openai_url + "/models")
        deadline = time.monotonic() + 30
        while True:  # the stand-in answers POSTs only: wait for its port
            bedrock.check_alive()
            try:
                socket.create_connection(("127.0.0.1", bedrock_port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise BenchError("the Bedrock stand-in did not start") from None
                await asyncio.sleep(0.1)
        await server.wait_ready(f"http://127.0.0.1:{api_port}/api/health")
        client = Client(upstream=openai_url, minichat=f"http://127.0.0.1:{api_port}")
        await keep_alive_below_the_servers(client)
        direct = DirectBedrock(bedrock_url, args.streams)
        bedrock_meter = CpuMeter(server.proc.pid, bedrock.proc.pid)
        openai_meter = CpuMeter(server.proc.pid, openai.proc.pid)
        probe_before = benchlib.cpu_probe()
        load_before = os.getloadavg()
        users: list[User] = await register(client, args.streams)
        log(f"registered {len(users)} users; probe {probe_before:.1f} ms, load {load_before[0]:.2f}")

        expected = stub_text(TOKENS)
        for check in (
            await direct.stream(BEDROCK_SETUP_MODEL),
            await client.minichat_stream(users[0], BEDROCK_SETUP_MODEL),
            await client.minichat_stream(users[0], SETUP_MODEL),
        ):
            if not check.ok or check.text != stub_text(1):
                raise BenchError(f"a first stream failed: {check}")

        # One pair unmeasured: both sides open their 100 connections and start their reader threads (a
        # process that serves traffic has them), so the first measured pair is not the odd one out.
        await burst("warm-up", bedrock_meter, expected, [direct.stream(BEDROCK_STREAM_MODEL) for _ in users])
        await burst(
            "warm-up",
            bedrock_meter,
            expected,
            [client.minichat_stream(u, BEDROCK_STREAM_MODEL) for u in users],
        )
        log("warm-up pair done")
        pairs: list[tuple[Burst, Burst]] = []
        for number in range(1, args.pairs + 1):
            plain = await burst(
                "direct", bedrock_meter, expected, [direct.stream(BEDROCK_STREAM_MODEL) for _ in users]
            )
            await asyncio.sleep(0.3)
            relayed = await burst(
                "minichat",
                bedrock_meter,
                expected,
                [client.minichat_stream(u, BEDROCK_STREAM_MODEL) for u in users],
            )
            pairs.append((plain, relayed))
            log(
                f"pair {number}: whole p50 {pct(plain.totals(), 50):.3f} s direct / "
                f"{pct(relayed.totals(), 50):.3f} s MiniChat, completed {plain.completed}/{relayed.completed}"
            )
            await asyncio.sleep(0.3)

        openai_direct = await burst(
            "openai direct", openai_meter, expected, [client.direct(STREAM_MODEL) for _ in users]
        )
        await asyncio.sleep(0.3)
        openai_round = await burst(
            "openai", openai_meter, expected, [client.minichat_stream(u, STREAM_MODEL) for u in users]
        )
        await asyncio.sleep(0.3)
        one = stub_text(1)
        bedrock_setup = await burst(
            "bedrock setup",
            bedrock_meter,
            one,
            [client.minichat_stream(u, BEDROCK_SETUP_MODEL) for u in users],
        )
        await asyncio.sleep(0.3)
        openai_setup = await burst(
            "openai setup", openai_meter, one, [client.minichat_stream(u, SETUP_MODEL) for u in users]
        )
        probe_after = benchlib.cpu_probe()
        load_after = os.getloadavg()
        if any(b.errors() for pair in pairs for b in pair) or openai_round.errors():
            print(f"minichat log (last lines):\n{server.tail(15)}", file=sys.stderr)
    finally:
        if direct is not None:
            direct.close()
        if client is not None:
            await client.close()
        if server is not None:
            server.stop()
        bedrock.stop()
        openai.stop()
        with contextlib.suppress(psycopg.Error):
            benchlib.drop_database(PG_ADMIN_URL, BENCH_DB)
        with contextlib.suppress(Exception):
            benchlib.flush_redis(REDIS_URL)

    ratios = [pct(m.totals(), 50) / pct(d.totals(), 50) for d, m in pairs]
    ratio = statistics.median(ratios)
    lost = sum(len(b.results) - b.completed for pair in pairs for b in pair)
    lost += len(openai_round.results) - openai_round.completed
    print(
        f"\n{args.streams} concurrent Bedrock streams, {TOKENS} tokens at {RATE} tokens/s from the stand-in"
    )
    print(
        f"{'pair':>4} {'direct p50':>11} {'MiniChat p50':>13} {'ratio':>6} "
        f"{'TTFT p50 d/M':>16} {'done d/M':>9}"
    )
    for number, ((d, m), r) in enumerate(zip(pairs, ratios, strict=True), 1):
        print(
            f"{number:>4} {pct(d.totals(), 50):9.3f} s {pct(m.totals(), 50):11.3f} s {r:6.3f} "
            f"{pct(d.ttfts(), 50) * 1000:6.0f}/{pct(m.ttfts(), 50) * 1000:.0f} ms "
            f"{d.completed:>4}/{m.completed}"
        )
    verdict = ratio <= TARGET_WHOLE_RATIO and lost == 0
    print(
        f"whole-stream p50, median of the pairs: {ratio:.3f}x direct (target <= {TARGET_WHOLE_RATIO}); "
        f"streams lost: {lost} -> {'met' if verdict else 'MISSED'}"
    )
    for d, m in pairs:
        if d.errors() or m.errors():
            print(f"  errors: direct {d.errors()} MiniChat {m.errors()}")
    openai_ratio = pct(openai_round.totals(), 50) / pct(openai_direct.totals(), 50)
    print(
        f"the OpenAI-compatible path in the same run (one pair, same stand-in pacing): whole p50 "
        f"{pct(openai_direct.totals(), 50):.3f} s direct / {pct(openai_round.totals(), 50):.3f} s MiniChat "
        f"= {openai_ratio:.3f}x, TTFT p50 {pct(openai_round.ttfts(), 50) * 1000:.0f} ms, "
        f"done {openai_round.completed}/{len(openai_round.results)}"
    )
    bedrock_rounds = [m for _, m in pairs]
    bedrock_token = statistics.median(per_token_cpu(m, bedrock_setup) for m in bedrock_rounds)
    openai_token = per_token_cpu(openai_round, openai_setup)
    print(
        f"server CPU per relayed token: Bedrock {bedrock_token:.0f} µs, "
        f"OpenAI-compatible {openai_token:.0f} µs; "
        f"per stream set-up and finish: Bedrock {bedrock_setup.cpu.server / len(users) * 1000:.1f} ms, "
        f"OpenAI {openai_setup.cpu.server / len(users) * 1000:.1f} ms"
    )
    print("CPU seconds per phase (server = all local-mode processes):")
    for (d, m), number in zip(pairs, range(1, len(pairs) + 1), strict=True):
        print(cpu_line(f"pair {number} direct boto3", d.cpu))
        print(cpu_line(f"pair {number} MiniChat Bedrock", m.cpu))
    print(cpu_line("MiniChat OpenAI", openai_round.cpu))
    print(cpu_line("1-token Bedrock x100", bedrock_setup.cpu))
    print(cpu_line("1-token OpenAI x100", openai_setup.cpu))
    print(
        f"machine: probe {probe_before:.1f} -> {probe_after:.1f} ms (13-15 ms when idle), "
        f"load average {load_before[0]:.2f} -> {load_after[0]:.2f} on {os.cpu_count()} cores"
    )
    return 0 if verdict else 3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3, help="interleaved direct/MiniChat rounds")
    parser.add_argument("--streams", type=int, default=100, help="concurrent streams per round")
    parser.add_argument("--quick", action="store_true", help="2 pairs")
    args = parser.parse_args()
    if args.quick:
        args.pairs = min(args.pairs, 2)
    try:
        return asyncio.run(run(args))
    except BenchError as exc:
        print(f"bench_bedrock: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
