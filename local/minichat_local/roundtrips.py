"""Count the round trips a block of code makes to PostgreSQL and Redis (a development tool: the tests
that hold the create path to its budget, and the benchmarks that report it).

A round trip is a time the client sends and then has to wait for the server's answer:
- PostgreSQL: one `ReadyForQuery` from the server, read from libpq's own protocol trace. It answers
  every Sync (one per statement outside a pipeline, one per pipeline sync) and every simple query
  (BEGIN, COMMIT): statements pipelined together are one round trip, as they are on the wire;
- Redis: one packed send (a command, a script call, or a whole pipeline; a health-check PING too).

Only the drivers are patched (psycopg's `Connection.wait`, redis-py's `send_packed_command`), never
MiniChat's code, so the same counter measures any version of it. Everything the process does inside the
block is counted, whatever the thread: run it where nothing else talks to the services meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
import redis.connection
from psycopg import pq

__all__ = ["RoundTrips", "recording"]


@dataclass
class RoundTrips:
    """What a block sent: totals per service, and who sent each Redis command."""

    postgres: int = 0
    redis: int = 0
    postgres_statements: list[str] = field(default_factory=list)  # every statement sent, in order
    redis_callers: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return self.postgres + self.redis

    def summary(self) -> str:
        return f"{self.total} round trips ({self.postgres} PostgreSQL, {self.redis} Redis)"


_patch_lock = threading.Lock()


def _caller() -> str:
    """The innermost frame outside the drivers: who asked for this round trip."""
    for frame in reversed(traceback.extract_stack(limit=25)[:-2]):
        path = frame.filename.replace("\\", "/")
        if "/site-packages/" not in path and not path.endswith("roundtrips.py"):
            return f"{os.path.basename(path)}:{frame.name}"
    return "?"


@contextmanager
def recording() -> Iterator[RoundTrips]:
    """Count the round trips made inside the block (every thread of this process)."""
    trips = RoundTrips()
    traced: dict[int, tuple[Any, Any]] = {}  # id(pgconn) -> (pgconn, its trace file)
    original_wait = psycopg.Connection.wait
    original_send = redis.connection.AbstractConnection.send_packed_command

    def wait(self: psycopg.Connection[Any], gen: Any, *args: Any, **kwargs: Any) -> Any:
        pgconn = self.pgconn
        if id(pgconn) not in traced:
            log = tempfile.TemporaryFile()  # noqa: SIM115 - read back and closed below
            pgconn.trace(os.dup(log.fileno()))  # libpq closes its own copy on untrace()
            pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
            traced[id(pgconn)] = (pgconn, log)
        return original_wait(self, gen, *args, **kwargs)

    def send_packed_command(self: Any, command: Any, check_health: bool = True) -> Any:
        trips.redis += 1
        trips.redis_callers[_caller()] += 1
        return original_send(self, command, check_health)

    with _patch_lock:
        psycopg.Connection.wait = wait  # type: ignore[method-assign]
        redis.connection.AbstractConnection.send_packed_command = send_packed_command  # type: ignore[method-assign]
        try:
            yield trips
        finally:
            psycopg.Connection.wait = original_wait  # type: ignore[method-assign]
            redis.connection.AbstractConnection.send_packed_command = original_send  # type: ignore[method-assign]
            for pgconn, log in traced.values():
                # A connection closed meanwhile has nothing left to flush.
                with contextlib.suppress(Exception):
                    pgconn.untrace()  # flushes libpq's buffer into the file
                log.seek(0)
                for line in log.read().decode(errors="replace").splitlines():
                    parts = line.split("\t")
                    if len(parts) < 3:
                        continue
                    if parts[0] == "B" and parts[2].startswith("ReadyForQuery"):
                        trips.postgres += 1
                    elif parts[0] == "F" and parts[2] in ("Parse", "Query", "Bind"):
                        text = parts[3].strip() if len(parts) > 3 else ""
                        if parts[2] != "Bind":
                            trips.postgres_statements.append(text)
                        elif not text.startswith('"" ""'):  # a prepared statement's execution
                            trips.postgres_statements.append("(prepared) " + text.split(" ")[1])
                log.close()
