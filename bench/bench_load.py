"""Load test (issue 7): open-loop mixed REST traffic at 200 req/s for 60 s while 50 users stream.

Starts local mode as its own process on its own database, Redis db and RabbitMQ vhost, then:
1. baseline: the same REST mix, one request at a time, nothing else running (unloaded latency);
2. load: 50 users each streaming mock-slow answers back to back, and 200 requests/s of the REST mix
   fired on a fixed schedule whatever the replies (open loop: a slow server cannot slow the offered load).
Prints p50/p95/p99 per route and overall, side by side with the baseline, the 5xx count and the targets
(zero 5xx, REST p99 <= 100 ms). `--quick`: 15 s instead of 60.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
from psycopg import sql

DB = "minichat_bench_load"
VHOST = "minichat_bench_load"
REDIS_DB = 6
REST_USERS = 100
STREAM_USERS = int(os.environ.get("BENCH_STREAM_USERS", "50"))
RATE = 200.0
TARGET_P99_MS = 100.0
# (weight, name): the mix of REST calls a chat client makes.
MIX = [
    (40, "list_chats"),
    (25, "list_messages"),
    (12, "post_message"),
    (8, "create_chat"),
    (8, "me"),
    (4, "usage"),
    (3, "get_chat"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def prepare_services() -> None:
    admin = "postgresql://postgres@127.0.0.1:5432/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DB)))
    subprocess.run(["rabbitmqctl", "add_vhost", VHOST], capture_output=True, check=False, timeout=60)
    subprocess.run(
        ["rabbitmqctl", "set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*"],
        capture_output=True,
        check=True,
        timeout=60,
    )
    subprocess.run(["redis-cli", "-n", str(REDIS_DB), "flushdb"], capture_output=True, check=True, timeout=10)


def start_server(port: int, log: Path) -> subprocess.Popen[bytes]:
    env = dict(
        os.environ,
        DATABASE_URL=f"postgresql://postgres@127.0.0.1:5432/{DB}",
        REDIS_URL=f"redis://127.0.0.1:6379/{REDIS_DB}",
        RABBITMQ_URL=f"amqp://guest:guest@127.0.0.1:5672/{VHOST}",
        MINICHAT_JWT_SECRET="bench-secret-" + "x" * 40,
        MINICHAT_LOG_LEVEL="WARNING",
        MINICHAT_RATE_API="1000000/60",
        MINICHAT_RATE_GENERATIONS="1000000/60",
        MINICHAT_RATE_LOGIN_IP="1000000/60",
        MINICHAT_RATE_LOGIN_EMAIL="1000000/60",
    )
    return subprocess.Popen(
        [sys.executable, "-m", "minichat_local", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
        start_new_session=True,
    )


class Client:
    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    async def call(
        self, method: str, path: str, token: str | None = None, body: Any = None
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.session.request(method, self.base + path, json=body, headers=headers) as r:
            data = await r.json(content_type=None) if r.status != 204 else None
            return r.status, data


async def setup_users(client: Client, count: int, prefix: str) -> list[dict[str, Any]]:
    users = []
    sem = asyncio.Semaphore(8)

    async def one(i: int) -> None:
        async with sem:
            status, body = await client.call(
                "POST",
                "/api/auth/register",
                body={"email": f"{prefix}{i}@bench.example", "password": "bench password"},
            )
            assert status == 201, body
            token = body["accessToken"]
            _, chat = await client.call("POST", "/api/chats", token, {"title": f"chat {i}"})
            for j in range(20):
                await client.call(
                    "POST", f"/api/chats/{chat['id']}/messages", token, {"content": f"message {j}"}
                )
            users.append({"token": token, "chat": chat["id"]})

    await asyncio.gather(*(one(i) for i in range(count)))
    return users


def request_for(name: str, user: dict[str, Any], n: int) -> tuple[str, str, Any]:
    chat = user["chat"]
    if name == "list_chats":
        return "GET", "/api/chats?limit=20", None
    if name == "list_messages":
        return "GET", f"/api/chats/{chat}/messages", None
    if name == "post_message":
        return "POST", f"/api/chats/{chat}/messages", {"content": f"load message {n}"}
    if name == "create_chat":
        return "POST", "/api/chats", {"title": f"load chat {n}"}
    if name == "me":
        return "GET", "/api/auth/me", None
    if name == "usage":
        return "GET", "/api/usage", None
    return "GET", f"/api/chats/{chat}", None


async def baseline(client: Client, users: list[dict[str, Any]], per_route: int) -> dict[str, list[float]]:
    lat: dict[str, list[float]] = defaultdict(list)
    for _, name in MIX:
        for n in range(per_route):
            method, path, body = request_for(name, users[n % len(users)], n)
            t0 = time.perf_counter()
            status, _ = await client.call(method, path, users[n % len(users)]["token"], body)
            lat[name].append((time.perf_counter() - t0) * 1000)
            assert status < 500
    return lat


async def streamer(client: Client, user: dict[str, Any], stop: asyncio.Event, counts: dict[str, int]) -> None:
    words = " ".join(f"w{i}" for i in range(15))  # ~3 s per answer at mock-slow's 200 ms a word
    while not stop.is_set():
        status, body = await client.call(
            "POST",
            f"/api/chats/{user['chat']}/generations",
            user["token"],
            {"content": words, "model": "mock-slow"},
        )
        if status != 201:
            counts[f"stream_create_{status}"] += 1
            await asyncio.sleep(0.5)
            continue
        async with client.session.get(client.base + body["streamUrl"]) as r:
            async for line in r.content:
                if line.startswith(b"data: ") and b'"type":"done"' in line:
                    counts["streams_done"] += 1
                    break
        await client.call("GET", f"/api/chats/{user['chat']}/messages?limit=5", user["token"])


async def load(
    client: Client, users: list[dict[str, Any]], stream_users: list[dict[str, Any]], seconds: float
) -> tuple[dict[str, list[float]], dict[str, int], int]:
    lat: dict[str, list[float]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    stop = asyncio.Event()
    streams = [asyncio.create_task(streamer(client, u, stop, counts)) for u in stream_users]
    await asyncio.sleep(2)  # the streams are up
    names = [name for weight, name in MIX for _ in range(weight)]
    rng = random.Random(7)
    pending: set[asyncio.Task[None]] = set()

    async def fire(name: str, user: dict[str, Any], n: int) -> None:
        method, path, body = request_for(name, user, n)
        t0 = time.perf_counter()
        try:
            status, _ = await client.call(method, path, user["token"], body)
        except aiohttp.ClientError:
            status = 0
        lat[name].append((time.perf_counter() - t0) * 1000)
        counts[f"status_{status}"] += 1

    start = time.perf_counter()
    n = 0
    interval = 1 / RATE
    while (now := time.perf_counter() - start) < seconds:
        due = n * interval
        if due > now:
            await asyncio.sleep(due - now)
        task = asyncio.create_task(fire(rng.choice(names), users[n % len(users)], n))
        pending.add(task)
        task.add_done_callback(pending.discard)
        n += 1
    await asyncio.gather(*pending)
    stop.set()
    if streams:
        await asyncio.wait(streams, timeout=15)
    for task in streams:
        task.cancel()
    return lat, counts, n


def row(name: str, base: list[float], loaded: list[float]) -> str:
    figures = [percentile(loaded, q) for q in (50, 95, 99)]
    return (
        f"{name:<14} {percentile(base, 50):>7.1f} {percentile(base, 99):>7.1f} |"
        f" {len(loaded):>6} {figures[0]:>7.1f} {figures[1]:>7.1f} {figures[2]:>7.1f}"
    )


async def run(seconds: float) -> int:
    prepare_services()
    port = free_port()
    log = Path(tempfile.mkdtemp()) / "server.log"
    server = start_server(port, log)
    base = f"http://127.0.0.1:{port}"
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=60)
        ) as session:
            client = Client(session, base)
            for _ in range(200):
                try:
                    if (await client.call("GET", "/api/health"))[0] == 200:
                        break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            else:
                print(log.read_text()[-3000:])
                return 1
            users = await setup_users(client, REST_USERS, "rest")
            stream_users = await setup_users(client, STREAM_USERS, "stream")
            base_lat = await baseline(client, users, 30)
            loaded, counts, sent = await load(client, users, stream_users, seconds)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    errors_5xx = sum(v for k, v in counts.items() if k.startswith("status_5") or k == "status_0")
    all_base = [v for values in base_lat.values() for v in values]
    all_loaded = [v for values in loaded.values() for v in values]
    achieved = sent / seconds
    print(
        f"\nREST mix at {RATE:.0f} req/s offered (open loop) for {seconds:.0f} s,"
        f" {STREAM_USERS} users streaming"
    )
    print(
        f"sent {sent} ({achieved:.0f}/s);"
        f" statuses {dict(sorted((k, v) for k, v in counts.items() if k.startswith('status')))}"
    )
    print(f"streams completed during the load: {counts['streams_done']}")
    print(
        f"\n{'route':<14} {'base p50':>7} {'p99':>7} | {'count':>6} {'p50':>7} {'p95':>7} {'p99':>7}   (ms)"
    )
    for _, name in MIX:
        print(row(name, base_lat[name], loaded[name]))
    print(row("ALL REST", all_base, all_loaded))
    p99 = percentile(all_loaded, 99)
    ok = errors_5xx == 0 and p99 <= TARGET_P99_MS
    print(
        f"\ntargets: zero 5xx -> {errors_5xx}; REST p99 <= {TARGET_P99_MS:.0f} ms"
        f" -> {p99:.1f} ms: {'MET' if ok else 'MISSED'}"
    )
    print(f"(median of the unloaded baseline over all routes: {statistics.median(all_base):.1f} ms)")
    return 0 if ok else 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="15 s instead of 60")
    args = parser.parse_args()
    return asyncio.run(run(15.0 if args.quick else 60.0))


if __name__ == "__main__":
    sys.exit(main())
