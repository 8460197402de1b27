"""Benchmark: list-messages of a branched chat's active path, beside a flat chat, in the same run.

    python bench/bench_branches.py            # ~60 s
    python bench/bench_branches.py --quick    # ~25 s, fewer and shorter rounds (noisier)

What it does: starts local mode on a free port against its own database (`minichat_bench_branches`,
recreated each run, dropped at the end), Redis db 12 and the RabbitMQ vhost `minichat_test_branches`
(MINICHAT_BENCH_BRANCHES_REDIS_DB / _VHOST override them; the vhost must exist); seeds
- a flat chat of 50 messages (POST /messages, as bench_api.py does), and
- a branched chat of 2,000 messages over 50 branches (inserted with SQL: the first branch is 40 messages
  from a root, each other one forks at a random earlier message, as a regenerate or an edit does, and
  runs 40 messages; the chat's active leaf is the end of the deepest branch, the longest path to walk);
then runs GET /api/chats/{id}/messages (the first page, 50 messages, as a client opens the chat) with 20
clients in a closed loop, as interleaved pairs of rounds (flat, then branched, repeated), so both see the
machine at the same speed, and reports each round and the medians. Last, one client in-process: the bare
SELECT of each chat (what PostgreSQL costs).

The HTTP client, the closed loop and the server process are bench_api.py's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import psycopg
from bench_api import (
    PASSWORD,
    Figure,
    Server,
    _event_loop_run,
    build_request,
    call,
    load,
    server_env,
    spawn,
    timed_loop,
)

import benchlib
from benchlib import BenchError, cpu_probe, free_port

PG_ADMIN_URL = os.environ.get("MINICHAT_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
BENCH_DB = "minichat_bench_branches"
DATABASE_URL = psycopg.conninfo.make_conninfo(PG_ADMIN_URL, dbname=BENCH_DB)
REDIS_URL = f"redis://127.0.0.1:6379/{os.environ.get('MINICHAT_BENCH_BRANCHES_REDIS_DB', '12')}"
VHOST = os.environ.get("MINICHAT_BENCH_BRANCHES_VHOST", "minichat_test_branches")
BROKER_URL = f"amqp://guest:guest@127.0.0.1:5672/{VHOST}"

FLAT_MESSAGES = 50
BRANCHES = 50
BRANCH_LENGTH = 40  # 50 x 40 = 2,000 messages
PAGE = 50
TARGET_P50_MS = 10.0
TARGET_P99_MS = 50.0
PROBE_FAST_MS = 16.0  # benchlib.cpu_probe() at this machine's usual speed (bench_api.py)
FILLER = "The quick brown fox jumps over the lazy dog; "


@dataclass(frozen=True)
class Plan:
    clients: int
    rounds: int  # interleaved pairs
    warmup: float
    seconds: float
    solo_seconds: float


DEFAULT = Plan(clients=20, rounds=5, warmup=0.5, seconds=3.0, solo_seconds=2.0)
QUICK = Plan(clients=20, rounds=3, warmup=0.3, seconds=1.2, solo_seconds=0.7)


@dataclass
class Report:
    plan: Plan
    flat: list[Figure] = field(default_factory=list)
    branched: list[Figure] = field(default_factory=list)
    solo: dict[str, Figure] = field(default_factory=dict)
    path_length: int = 0
    forks_on_path: int = 0


def _text(i: int) -> str:
    return f"Message {i + 1}: " + FILLER * (4 + i % 8)  # 190-510 characters, as bench_api.py


def seed_branched(conn: psycopg.Connection[Any], chat_id: str) -> tuple[int, int]:
    """2,000 messages in 50 branches; the deepest leaf is made active. Returns (its path length, the
    number of messages on that path that have siblings)."""
    rng = random.Random(14)
    rows: list[tuple[str, str | None, str, str]] = []  # id, parent, role, content
    depth: dict[str, int] = {}
    parent_of: dict[str, str | None] = {}
    role_of: dict[str, str] = {}
    for branch in range(BRANCHES):
        fork = None if branch == 0 else rng.choice(rows)[0]
        parent = fork
        for _ in range(BRANCH_LENGTH):
            message_id = str(uuid.uuid4())
            role = "user" if parent is None or role_of[parent] == "assistant" else "assistant"
            rows.append((message_id, parent, role, _text(len(rows))))
            depth[message_id] = 1 if parent is None else depth[parent] + 1
            parent_of[message_id], role_of[message_id] = parent, role
            parent = message_id
    leaf = max(depth, key=lambda m: (depth[m], m))
    children: dict[tuple[str | None, str], int] = {}
    for _, p, r, _ in rows:
        children[(p, r)] = children.get((p, r), 0) + 1
    # `segment_id` as chats.insert_message sets it: a parent's first child continues its segment.
    segment: dict[str, str] = {}
    has_child: set[str] = set()
    for m, p, _, _ in rows:
        segment[m] = m if p is None or p in has_child else segment[p]
        if p is not None:
            has_child.add(p)
    with conn.transaction(), conn.cursor() as cur:
        # `forked` as chats.insert_message sets it: the message has siblings.
        cur.executemany(
            "INSERT INTO messages (id, chat_id, parent_id, role, content, forked, segment_id)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s)",
            [(m, chat_id, p, r, c, children[(p, r)] > 1, segment[m]) for m, p, r, c in rows],
        )
        cur.execute("UPDATE chats SET active_leaf_id = %s WHERE id = %s", (leaf, chat_id))
    path: list[str] = []
    node: str | None = leaf
    while node is not None:
        path.append(node)
        node = parent_of[node]
    return len(path), sum(1 for m in path if children[(parent_of[m], role_of[m])] > 1)


async def phases(report: Report, api: Server) -> None:
    plan = report.plan
    port = api.port
    user = await call(
        port, "POST", "/api/auth/register", 201, body={"email": "branches@example.com", "password": PASSWORD}
    )
    token = user["accessToken"]
    flat = await call(port, "POST", "/api/chats", 201, token=token, body={"title": "flat"})
    branched = await call(port, "POST", "/api/chats", 201, token=token, body={"title": "branched"})
    for i in range(FLAT_MESSAGES):
        await call(
            port, "POST", f"/api/chats/{flat['id']}/messages", 201, token=token, body={"content": _text(i)}
        )
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        report.path_length, report.forks_on_path = seed_branched(conn, branched["id"])
        total = conn.execute("SELECT count(*) FROM messages WHERE chat_id = %s", (branched["id"],)).fetchone()
    print(
        f"seeded: flat chat {FLAT_MESSAGES} messages; branched chat {total[0] if total else 0} messages in"
        f" {BRANCHES} branches, active path {report.path_length} messages ({report.forks_on_path} with"
        " siblings)",
        flush=True,
    )
    chats = {"flat": flat["id"], "branched": branched["id"]}
    for name, chat_id in chats.items():
        page = await call(port, "GET", f"/api/chats/{chat_id}/messages", 200, token=token)
        expected = min(PAGE, FLAT_MESSAGES if name == "flat" else report.path_length)
        if len(page["items"]) != expected:
            raise BenchError(f"the {name} chat lists {len(page['items'])} messages, not {expected}")
    requests = {
        name: [build_request("GET", f"/api/chats/{chat_id}/messages", port, token=token)] * plan.clients
        for name, chat_id in chats.items()
    }
    print(f"{plan.rounds} interleaved pairs of rounds at {plan.clients} clients:", flush=True)
    for i in range(plan.rounds):
        for name, figures in (("flat", report.flat), ("branched", report.branched)):
            figure = await load(
                f"{name} {i + 1}",
                port,
                requests[name],
                expect=200,
                warmup=plan.warmup,
                seconds=plan.seconds,
                server_pid=api.proc.pid,
                database=BENCH_DB,
            )
            api.check_alive()
            figures.append(figure)
            print(
                f"  round {i + 1} {name:<9} {figure.n:>6} req  p50 {figure.pct(50):6.2f} ms"
                f"  p99 {figure.pct(99):6.2f} ms  CPU ms/req srv/pg/cli {figure.cpu_cols()}"
                f"  cores us/others {figure.busy()}  probe {figure.probe_ms or 0:.1f} ms",
                flush=True,
            )

    from minichat.chats import _LIST_PATH

    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        for name, chat_id in chats.items():
            params = {
                "after": 0,
                "limit": PAGE,
                "chat_id": chat_id,
                "user_id": user["user"]["id"],
                "leaf_id": None,
            }
            report.solo[name] = timed_loop(
                f"bare SELECT, {name}",
                lambda params=params: conn.execute(_LIST_PATH, params).fetchall(),
                warmup=plan.warmup,
                seconds=plan.solo_seconds,
            )


def run(report: Report) -> None:
    benchlib.drop_database(PG_ADMIN_URL, BENCH_DB)
    from minichat.migrate import ensure_database

    ensure_database(DATABASE_URL)
    benchlib.flush_redis(REDIS_URL)
    benchlib.ensure_vhost(BROKER_URL, VHOST, purge=False)
    env = server_env(DATABASE_URL, REDIS_URL, BROKER_URL)
    port = free_port()
    api = spawn("local mode", [sys.executable, "-m", "minichat_local", "--port", str(port)], env, port)
    failure: BaseException | None = None
    try:

        async def main() -> None:
            await api.wait_ready("/api/health")
            await phases(report, api)

        _event_loop_run(main)
    except BaseException as exc:
        failure = exc
        raise
    finally:
        status = api.stop()
        with contextlib.suppress(Exception):
            benchlib.drop_database(PG_ADMIN_URL, BENCH_DB)
        with contextlib.suppress(Exception):
            benchlib.flush_redis(REDIS_URL)
        if failure is None and status != 0:
            raise BenchError(f"local mode did not stop cleanly on SIGTERM (status {status}):\n{api.tail()}")


def print_table(report: Report) -> None:
    def med(figures: list[Figure], q: float) -> float:
        return statistics.median(f.pct(q) for f in figures)

    def rate(figures: list[Figure]) -> float:
        return statistics.median(f.rate for f in figures)

    def cpu(figures: list[Figure]) -> str:
        """Median CPU ms per request of the server, PostgreSQL and this client."""
        columns = []
        for part in ("server", "postgres", "client"):
            values = [
                getattr(f.cpu, part) / f.n * 1000
                for f in figures
                if f.cpu and getattr(f.cpu, part) is not None
            ]
            columns.append(f"{statistics.median(values):.2f}" if values else "-")
        return "/".join(columns)

    flat50, flat99 = med(report.flat, 50), med(report.flat, 99)
    br50, br99 = med(report.branched, 50), med(report.branched, 99)
    probes = [f.probe_ms for f in report.flat + report.branched if f.probe_ms is not None]
    slow = [p for p in probes if p > PROBE_FAST_MS]
    rule = "-" * 100
    print()
    pairs = len(report.flat)
    print(f"list-messages, first page of {PAGE}, {report.plan.clients} clients, medians of {pairs} pairs")
    print(rule)
    print(f"{'chat':<58}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}  {'CPU ms/req srv/pg/cli':<22}")
    print(rule)
    print(
        f"{f'branched: 2,000 msgs / {BRANCHES} branches, path {report.path_length}':<58}"
        f"{rate(report.branched):>9.0f}{br50:>9.2f}{br99:>9.2f}  {cpu(report.branched):<22}"
        f"  target p50 <= {TARGET_P50_MS:.0f} {'ok' if br50 <= TARGET_P50_MS else 'MISSED'},"
        f" p99 <= {TARGET_P99_MS:.0f} {'ok' if br99 <= TARGET_P99_MS else 'MISSED'}"
    )
    flat_label = f"  base: flat chat of {FLAT_MESSAGES} msgs, same run"
    print(f"{flat_label:<58}{rate(report.flat):>9.0f}{flat50:>9.2f}{flat99:>9.2f}  {cpu(report.flat):<22}")
    print(f"{'  branched / flat p50':<58}{'':>9}{br50 / flat50:>8.2f}x")
    for name, figure in report.solo.items():
        label = f"  one client: bare SELECT of the page, {name}"
        print(f"{label:<58}{figure.rate:>9.0f}{figure.pct(50):>9.2f}{figure.pct(99):>9.2f}")
    print(rule)
    print(
        f"probe (ms of a fixed loop around each round; <= {PROBE_FAST_MS:.0f} at this machine's usual speed):"
        f" {min(probes):.1f}-{max(probes):.1f}"
        + (f", {len(slow)} of {len(probes)} rounds slow" if slow else "")
        if probes
        else "probe: -"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    parser.add_argument("--clients", type=int, default=20, help="concurrent clients (default 20)")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else DEFAULT
    report = Report(Plan(**{**base.__dict__, "clients": args.clients}))
    started = time.monotonic()
    try:
        run(report)
    except (BenchError, psycopg.Error, OSError) as exc:
        print(f"\nbench_branches: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print_table(report)
    kind = "quick" if args.quick else "default"
    print(f"({kind} run, {time.monotonic() - started:.0f} s; cpu probe now {cpu_probe():.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
