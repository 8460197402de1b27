"""What the benchmarks share: free ports, server processes they start and stop, their own services."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

__all__ = [
    "ROOT",
    "BenchError",
    "ServerProcess",
    "cpu_probe",
    "drop_database",
    "ensure_vhost",
    "flush_redis",
    "free_port",
]

ROOT = Path(__file__).resolve().parents[1]


class BenchError(Exception):
    """The run cannot give figures (a server died, an unexpected reply): exit non-zero."""


def run_checked(
    argv: list[str], what: str, *, timeout: float, **options: Any
) -> subprocess.CompletedProcess[str]:
    """Run `argv` to its end (text output captured); BenchError with the end of its stderr if it fails."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **options)
    if done.returncode != 0:
        raise BenchError(f"{what} failed:\n{done.stderr[-3000:]}")
    return done


def cpu_probe() -> float:
    """Milliseconds of a fixed pure-Python loop, best of 3: how fast this machine runs right now.

    The cores of this (virtual) machine run at a speed that swings by up to 2x from one minute to the
    next, invisibly to /proc (no steal shows). Taken just before and after a figure, the probe says
    whether that figure was measured on a fast or a slow machine.
    """
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        total = 0
        for i in range(300_000):
            total += i * i
        best = min(best, time.perf_counter() - started)
    return best * 1000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """A server the bench started; its output goes to a temporary file, read back on failure."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Any

    @classmethod
    def spawn(
        cls, name: str, argv: list[str], env: dict[str, str], port: int, *, cwd: Path | None = None
    ) -> Any:
        log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server; read by tail()
        # Its own session: a signal sent to the terminal's process group (Ctrl-C, a harness cleaning
        # up) must not reach the servers mid-run; they are stopped by pid at the end.
        proc = subprocess.Popen(
            argv, env=env, cwd=cwd or ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        return cls(name, proc, port, log)

    def tail(self, lines: int = 25) -> str:
        self.log.flush()
        self.log.seek(0)
        return "\n".join(self.log.read().decode(errors="replace").splitlines()[-lines:])

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"{self.name} exited with status {self.proc.returncode}:\n{self.tail()}")

    def stop(self) -> int | None:
        """SIGTERM (by pid only), then wait; its exit status (None when it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        return self.proc.returncode


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def ensure_vhost(broker_url: str, vhost: str, *, purge: bool = False) -> None:
    """The bench's own RabbitMQ vhost, created with rabbitmqctl when missing; `purge` empties its queues
    (events an earlier run left would otherwise be consumed, and dead-lettered, on this run's CPU)."""
    import pika
    import pika.exceptions

    from minichat import broker

    try:
        connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    except pika.exceptions.AMQPError:
        for argv in (
            ["rabbitmqctl", "add_vhost", vhost],
            ["rabbitmqctl", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
        ):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(argv, capture_output=True, timeout=60, check=False)
        return
    try:
        for queue in broker.QUEUES if purge else ():
            for name in (queue, broker.dead_letter_queue(queue)):
                channel = connection.channel()
                try:
                    channel.queue_purge(name)
                    channel.close()
                except pika.exceptions.ChannelClosedByBroker:
                    pass  # not declared yet: nothing to purge
    finally:
        with contextlib.suppress(pika.exceptions.AMQPError):
            connection.close()


def flush_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.flushdb()
    finally:
        client.close()
