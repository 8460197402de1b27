"""Benchmark: POST /api/chats/{id}/generations (the create), MiniChat against a baseline commit.

    python bench/bench_create.py                   # 5 interleaved pairs, ~2 min
    python bench/bench_create.py --quick           # 3 pairs, shorter rounds
    python bench/bench_create.py --baseline none   # this tree only

What it does:
- exports the baseline (default: bb38acd, main before the create path was cut down) with `git archive`
  into a temporary directory, and runs it exactly as this tree: `python -m minichat_local` with that
  tree's code first on PYTHONPATH, against the same database (`minichat_bench`, bench_api's, recreated
  for every round), Redis db 13 (flushed) and RabbitMQ vhost `minichat_bench_api`;
- round trips: in a subprocess per tree, the in-process app serves a few creates and then one more is
  counted with minichat_local.roundtrips (libpq's protocol trace for PostgreSQL, the packed sends for
  Redis), with the daily budget on and off;
- rounds: `--clients` closed-loop clients (default 20), each create for a user of its own (users and
  chats inserted straight into the database, access tokens signed with the server's key: one
  generation in flight per user, and nothing but creates measured), the generations left queued;
  rate limits on but high, the daily budget on (MINICHAT_DAILY_TOKEN_BUDGET, high): the create as the
  issue counted it. Per round: create p50/p99 latency, creates/s, CPU ms per create of the server
  (local mode's processes: the workers serving the requests and the supervisor relaying each create's
  audit event to RabbitMQ and consuming it), PostgreSQL (the bench database's backends) and the client;
- the rounds alternate baseline / this tree in pairs (which goes first alternates too), with
  benchlib.cpu_probe() before each: this machine's speed swings, so the verdict is the median of the
  pairs, each pair measured on the same machine state.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bench_api
import psycopg
from bench_api import CpuMeter, Figure, HttpConn, build_request

import benchlib
from benchlib import BenchError, cpu_probe, free_port

ROOT = benchlib.ROOT
DEFAULT_BASELINE = "bb38acd"
BUDGET = 10**9  # on, never reached
TARGET_ROUND_TRIPS = 3


@dataclass(frozen=True)
class Plan:
    pairs: int
    clients: int
    warmup: float
    seconds: float


DEFAULT = Plan(pairs=5, clients=20, warmup=1.0, seconds=4.0)
QUICK = Plan(pairs=3, clients=20, warmup=0.5, seconds=2.0)


@dataclass
class Side:
    name: str  # "baseline" | "this tree"
    tree: Path
    round_trips: dict[str, Any] = field(default_factory=dict)  # "budget" / "no budget" -> counts
    rounds: list[Figure] = field(default_factory=list)
    events_cpu: list[float] = field(default_factory=list)  # per round: ms per create in the supervisor


def export_baseline(rev: str, into: Path) -> Path:
    """The baseline's files (git archive: nothing of this checkout's git state changes)."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=False, timeout=120
    )
    if archive.returncode != 0:
        raise BenchError(f"git archive {rev} failed: {archive.stderr.decode(errors='replace')[-500:]}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True, timeout=120)
    return into


def tree_env(tree: Path, **extra: str) -> dict[str, str]:
    """Local mode's environment (bench_api's), running `tree`'s code."""
    env = bench_api.server_env()
    env.update(
        {
            "MINICHAT_ROOT": str(tree),
            "PYTHONPATH": os.pathsep.join(str(tree / p) for p in ("layers/core", "local")),
            "MINICHAT_RATE_GENERATIONS": bench_api.HIGH_RATE,
            "MINICHAT_DAILY_TOKEN_BUDGET": str(BUDGET),
            **extra,
        }
    )
    return env


# --- round trips (a subprocess per tree) ------------------------------------------------------------------


def count_round_trips(side: Side) -> None:
    for label, budget in (("budget", str(BUDGET)), ("no budget", "0")):
        reset_services()
        done = benchlib.run_checked(
            [sys.executable, __file__, "--count-round-trips"],
            f"counting {side.name}'s round trips",
            cwd=side.tree,
            env=tree_env(side.tree, MINICHAT_DAILY_TOKEN_BUDGET=budget, MINICHAT_ENV="test"),
            timeout=180,
        )
        side.round_trips[label] = json.loads(done.stdout.strip().splitlines()[-1])


def _count_round_trips_here() -> None:
    """In the subprocess: the app in-process, a few creates to warm it, then one create counted."""
    import importlib.util
    import threading

    import httpx
    import uvicorn

    spec = importlib.util.spec_from_file_location(
        "roundtrips", Path(__file__).resolve().parents[1] / "local" / "minichat_local" / "roundtrips.py"
    )
    assert spec is not None and spec.loader is not None
    roundtrips = importlib.util.module_from_spec(spec)
    sys.modules["roundtrips"] = roundtrips
    spec.loader.exec_module(roundtrips)

    from minichat.migrate import apply_migrations, ensure_database
    from minichat_local.server import build_app

    ensure_database(os.environ["DATABASE_URL"])
    apply_migrations(os.environ["DATABASE_URL"])
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(build_app(), host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    reply = http.post("/api/auth/register", json={"email": "rt@example.com", "password": bench_api.PASSWORD})
    headers = {"Authorization": "Bearer " + reply.json()["accessToken"]}

    def create(chat_id: str) -> httpx.Response:
        return http.post(f"/api/chats/{chat_id}/generations", headers=headers, json={"content": "hello"})

    for _ in range(8):  # warm: pools, scripts known to Redis, prepared statements
        chat_id = http.post("/api/chats", headers=headers, json={}).json()["id"]
        generation = create(chat_id).json()["generationId"]
        http.post(f"/api/generations/{generation}/cancel", headers=headers)
    chat_id = http.post("/api/chats", headers=headers, json={}).json()["id"]
    with roundtrips.recording() as trips:
        status = create(chat_id).status_code
    server.should_exit = True
    if status != 201:
        raise SystemExit(f"the counted create answered {status}")
    print(json.dumps({"postgres": trips.postgres, "redis": trips.redis, "total": trips.total}))


# --- the load rounds --------------------------------------------------------------------------------------


def reset_services() -> None:
    bench_api.drop_database()
    bench_api.flush_redis()


def provision(count: int, env: dict[str, str]) -> list[tuple[str, str]]:
    """`count` users with a chat each, straight into the database; (access token, chat id) of each."""
    from minichat import auth
    from minichat.config import Settings

    settings = Settings.from_env(env)
    users = [str(uuid.uuid4()) for _ in range(count)]
    chats = [str(uuid.uuid4()) for _ in range(count)]
    with psycopg.connect(bench_api.DATABASE_URL, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO users (id, email, password_hash)"
            " SELECT u, u || '@bench.example.com', 'not-a-hash' FROM unnest(%s::uuid[]) AS u",
            (users,),
        )
        conn.execute(
            "INSERT INTO chats (id, user_id) SELECT * FROM unnest(%s::uuid[], %s::uuid[])", (chats, users)
        )
        conn.execute("ANALYZE")
    return [(auth.issue_access_token(u, settings=settings), c) for u, c in zip(users, chats, strict=True)]


async def create_round(
    name: str, port: int, requests: list[bytes], plan: Plan, server_pid: int, supervisor: list[float]
) -> Figure:
    """Closed loop: each client sends the next create (a user of its own) as soon as the last answered.

    `supervisor` gets local mode's supervisor process's own CPU seconds at the start and the end: with
    several workers it serves no request, it relays the outbox and consumes the events.
    """
    figure = Figure(name, clients=plan.clients, cpu=CpuMeter(server_pid))
    pending = iter(requests)
    conns = [HttpConn(port) for _ in range(plan.clients)]
    await asyncio.gather(*(c.connect() for c in conns))
    start = time.perf_counter()
    kept_from = start + plan.warmup
    stop_at = kept_from + plan.seconds
    last_done = kept_from
    ran_out = False

    async def client(conn: HttpConn) -> None:
        nonlocal last_done, ran_out
        for raw in pending:
            sent = time.perf_counter()
            if sent >= stop_at:
                return
            status, body = await conn.request(raw)
            done = time.perf_counter()
            figure.statuses[status] += 1
            if status != 201:
                raise BenchError(f"{name}: a create answered {status}: {body[:300]!r}")
            if sent >= kept_from:
                figure.latencies.append(done - sent)
                last_done = max(last_done, done)
        ran_out = True

    async def meter() -> None:
        await asyncio.sleep(max(0.0, kept_from - time.perf_counter()))
        assert figure.cpu is not None
        figure.cpu.start()
        supervisor.append(bench_api._proc_cpu(server_pid))

    try:
        await asyncio.wait_for(
            asyncio.gather(meter(), *(client(c) for c in conns)), timeout=plan.warmup + plan.seconds + 60
        )
    finally:
        await asyncio.gather(*(c.close() for c in conns))
    assert figure.cpu is not None
    figure.cpu.stop()
    supervisor.append(bench_api._proc_cpu(server_pid))
    figure.wall = last_done - kept_from
    if ran_out:
        raise BenchError(f"{name}: ran out of provisioned users; provision more")
    if not figure.n:
        raise BenchError(f"{name}: no create was measured")
    return figure


def run_round(side: Side, plan: Plan, users: int) -> Figure:
    reset_services()
    port = free_port()
    env = tree_env(side.tree)
    server = bench_api.Server.spawn(
        f"local mode ({side.name})",
        [sys.executable, "-m", "minichat_local", "--port", str(port)],
        env,
        port,
        cwd=side.tree,
    )
    try:
        bench_api._event_loop_run(lambda: server.wait_ready("/api/health"))
        pairs = provision(users, env)
        requests = [
            build_request(
                "POST", f"/api/chats/{chat}/generations", port, token=token, body={"content": "hello"}
            )
            for token, chat in pairs
        ]
        probe = cpu_probe()
        figure: Figure | None = None
        supervisor: list[float] = []

        async def main() -> None:
            nonlocal figure
            figure = await create_round(side.name, port, requests, plan, server.proc.pid, supervisor)

        bench_api._event_loop_run(main)
        assert figure is not None
        side.events_cpu.append((supervisor[1] - supervisor[0]) / figure.n * 1000)
        figure.probe_ms = max(probe, cpu_probe())
        server.check_alive()
        return figure
    finally:
        server.stop()


def _round_retried(side: Side, plan: Plan, users: int, attempts: int = 3) -> Figure:
    """A round again when a service went away under it (other sessions on this machine restart the
    shared PostgreSQL and Redis in their fault tests): a 503 says nothing about the code measured."""
    for attempt in range(attempts):
        try:
            return run_round(side, plan, users)
        except BenchError as exc:
            if " 503" not in str(exc) or attempt == attempts - 1:
                raise
            print(f"  a service was away ({exc}); again in 5 s", flush=True)
            time.sleep(5)
    raise AssertionError("unreachable")


# --- the report -------------------------------------------------------------------------------------------


def _per_create(figure: Figure, which: str) -> float:
    assert figure.cpu is not None
    value = getattr(figure.cpu, which)
    return value / figure.n * 1000 if value is not None else float("nan")


def print_report(sides: list[Side], plan: Plan) -> None:
    print()
    print(
        f"POST /api/chats/{{id}}/generations — {bench_api.CORES} cores shared by server, PostgreSQL"
        " and client"
    )
    print("round trips of one create (in-process, counted at the drivers):")
    for side in sides:
        for label, trips in side.round_trips.items():
            verdict = "ok" if trips["total"] <= TARGET_ROUND_TRIPS else "MISSED"
            print(
                f"  {side.name:<10} daily budget {label:<10} {trips['total']:>3}"
                f" ({trips['postgres']} PostgreSQL, {trips['redis']} Redis)"
                f"  target <= {TARGET_ROUND_TRIPS}: {verdict}"
            )
    head = (
        f"{'pair':<5}{'tree':<11}{'creates/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'CPU ms/create srv':>19}{'(events)':>9}{'pg':>7}{'cli':>7}{'others':>8}{'probe':>7}"
    )
    print(
        f"\nload: {plan.clients} clients, closed loop, {plan.seconds:.0f} s a round"
        f" after {plan.warmup} s warm-up"
    )
    print(head)
    print("-" * len(head))
    for i in range(plan.pairs):
        for side in sides:
            f = side.rounds[i]
            assert f.cpu is not None
            others = f.cpu.cores()[1]
            print(
                f"{i + 1:<5}{side.name:<11}{f.rate:>10.0f}{f.pct(50):>9.2f}{f.pct(99):>9.2f}"
                f"{_per_create(f, 'server'):>19.2f}{side.events_cpu[i]:>9.2f}"
                f"{_per_create(f, 'postgres'):>7.2f}"
                f"{_per_create(f, 'client'):>7.2f}{'-' if others is None else f'{others:.2f}':>8}"
                f"{f.probe_ms or 0:>7.1f}"
            )
    print("-" * len(head))
    medians: dict[str, dict[str, float]] = {}
    for side in sides:
        rounds = side.rounds
        medians[side.name] = {
            "rate": statistics.median(f.rate for f in rounds),
            "p50": statistics.median(f.pct(50) for f in rounds),
            "p99": statistics.median(f.pct(99) for f in rounds),
            "srv": statistics.median(_per_create(f, "server") for f in rounds),
            "pg": statistics.median(_per_create(f, "postgres") for f in rounds),
            "events": statistics.median(side.events_cpu),
        }
        m = medians[side.name]
        print(
            f"{'med':<5}{side.name:<11}{m['rate']:>10.0f}{m['p50']:>9.2f}{m['p99']:>9.2f}"
            f"{m['srv']:>19.2f}{m['events']:>9.2f}{m['pg']:>7.2f}"
        )
    if len(sides) == 2:
        base, ours = (side.rounds for side in sides)
        ratios = {
            "p50": statistics.median(o.pct(50) / b.pct(50) for b, o in zip(base, ours, strict=True)),
            "server CPU": statistics.median(
                _per_create(o, "server") / _per_create(b, "server") for b, o in zip(base, ours, strict=True)
            ),
            "PostgreSQL CPU": statistics.median(
                _per_create(o, "postgres") / _per_create(b, "postgres")
                for b, o in zip(base, ours, strict=True)
            ),
        }
        print(
            "this tree / baseline, median of the pairs' ratios: "
            + ", ".join(f"{name} {value:.2f}x" for name, value in ratios.items())
        )
    print(
        "CPU ms/create: server = local mode's processes (workers + the supervisor's relay and consumer;"
        " (events): the supervisor's part),"
        " pg = the bench database's PostgreSQL backends, cli = this client; others: cores other processes"
        " kept busy. probe: benchlib.cpu_probe() ms (about 16 or less when the machine runs at its usual"
        " speed)."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="3 pairs of shorter rounds")
    parser.add_argument("--pairs", type=int, help="pairs of rounds (default 5)")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="a git revision, or 'none'")
    parser.add_argument("--count-round-trips", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.count_round_trips:
        _count_round_trips_here()
        return 0
    base = QUICK if args.quick else DEFAULT
    plan = Plan(
        pairs=args.pairs or base.pairs, clients=args.clients, warmup=base.warmup, seconds=base.seconds
    )
    users = int(plan.clients * 60 * (plan.warmup + plan.seconds)) + 2000  # up to ~1,200 creates/s
    workdir = Path(tempfile.mkdtemp(prefix="minichat-bench-create-"))
    started = time.monotonic()
    try:
        sides = [Side("this tree", ROOT)]
        if args.baseline.lower() != "none":
            sides.insert(0, Side("baseline", export_baseline(args.baseline, workdir)))
        bench_api.ensure_vhost()
        for side in sides:
            print(f"round trips: {side.name} ...", flush=True)
            count_round_trips(side)
        for i in range(plan.pairs):
            order = sides if i % 2 == 0 else list(reversed(sides))
            for side in order:
                print(f"pair {i + 1}: {side.name} ...", flush=True)
                side.rounds.append(_round_retried(side, plan, users))
        print_report(sides, plan)
    except BenchError as exc:
        print(f"\nbench_create: FAILED: {exc}", file=sys.stderr)
        return 1
    except (psycopg.Error, OSError) as exc:
        print(f"\nbench_create: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        with contextlib.suppress(Exception):
            reset_services()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
