"""`python -m minichat_local`: migrate, then serve everything on 127.0.0.1:${PORT:-8000} until Ctrl-C.

`MINICHAT_WORKERS` processes (default: one per core, at most 4) serve the port, each a full local-mode
server (REST through Chalice, the stream app) with its own SO_REUSEPORT listening socket, so the kernel
spreads new connections over the workers. (One shared socket let whichever worker woke first accept a
whole burst: 20 keep-alive clients were seen split 18/2 and 20/0, one core busy and the other idle.) The
supervisor keeps the port bound meanwhile and runs the background services once: the outbox relay, the
reaper and the RabbitMQ consumer that feeds the worker.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import signal
import socket
import sys
import time
from types import FrameType
from typing import Any

__all__ = ["main"]

_PR_SET_PDEATHSIG = 1
# The youngest generation is collected after this many allocations (CPython's default: 700); see _settle.
_GC_YOUNG = 20_000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="minichat_local", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument("--workers", type=int, default=int(os.environ.get("MINICHAT_WORKERS") or 0))
    args = parser.parse_args(argv)
    workers = args.workers or min(4, os.cpu_count() or 1)

    from minichat_local.functions import repo_root

    # Local mode keeps a generated dev secret so restarts keep sessions.
    os.environ.setdefault("MINICHAT_JWT_SECRET_FILE", str(repo_root() / ".minichat" / "jwt-secret"))
    os.environ.setdefault("MINICHAT_DB_POOL_MAX", "16")

    from minichat.config import get_settings
    from minichat.errors import ConfigError
    from minichat.log import setup_logging
    from minichat.migrate import apply_migrations, ensure_database
    from minichat.providers import ProviderRegistry
    from minichat_local.preflight import check_services

    try:
        settings = get_settings()
        _ = settings.jwt_secret
        ProviderRegistry.from_settings(settings)  # a model served twice, an unknown default: refused now
    except ConfigError as exc:
        print(f"minichat: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)

    problems = check_services(settings)
    if problems:
        print("minichat: cannot start local mode.\n", file=sys.stderr)
        for problem in problems:
            print(problem.explain() + "\n", file=sys.stderr)
        return 1
    if ensure_database(settings.database_url):
        print("minichat: created the database", file=sys.stderr)
    for name in apply_migrations(settings.database_url):
        print(f"minichat: applied migration {name}", file=sys.stderr)

    address = (args.host, args.port)
    try:
        sock = _bind(address, workers=workers)
    except OSError as exc:
        print(f"minichat: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 1

    from minichat_local.services import Background

    background = Background()
    _settle()
    # Fork before any thread or pool exists in this process: children start clean.
    children = {_spawn(address, background) for _ in range(workers)} if workers > 1 else set()
    background.start()
    url = f"http://{args.host}:{args.port}"
    print(f"minichat: serving local mode on {url} with {workers} worker(s) (Ctrl-C stops)", file=sys.stderr)
    try:
        if children:
            _supervise(children, address, background)
        else:
            _serve(sock)
    finally:
        background.stop()
        sock.close()
    print("minichat: stopped", file=sys.stderr)
    return 0


def _bind(address: tuple[str, int], *, workers: int) -> socket.socket:
    """One worker: its listening socket. Several: the port, bound (not listening) for as long as we run.

    A first bind without SO_REUSEPORT fails when anything else holds the port (another local mode
    included), which joining its SO_REUSEPORT group would silently hide.
    """
    if workers == 1:
        return socket.create_server(address, backlog=2048)
    socket.create_server(address).close()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock


def _serve(sock: socket.socket) -> None:
    """One worker: the local-mode ASGI app under uvicorn on its listening socket."""
    import uvicorn

    from minichat_local.server import build_app

    app = build_app()
    _settle()
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    _server_class()(config).run(sockets=[sock])


def _settle() -> None:
    """The garbage collector's settings for a long-running process, once its code is loaded.

    - gc.freeze(): what exists now (modules, classes, the apps: about 65,000 objects in a worker) lives
      as long as the process; frozen, full collections never walk it again. Each of them stopped a worker's
      event loop for 60-350 ms (wall time, the machine busy) in a burst of 500 streams.
    - The youngest generation is collected after _GC_YOUNG allocations instead of 700: a stream's
      objects mostly die young, freed by their reference counts, so a collection that waits longer finds
      fewer survivors to walk. In one bench/bench_stream.py run of 500-stream rounds (about 2,100 streams),
      each worker made about 550 collections for 0.70-0.76 s of CPU before, 13-14 for 0.06-0.09 s after.
    """
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, _GC_YOUNG), middle, old)


def _spawn(address: tuple[str, int], background: Any) -> int:
    pid = os.fork()
    if pid:
        return pid
    # Child: die with the supervisor (even on SIGKILL), so no orphan keeps the port.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    background.in_worker()  # commits here wake the supervisor's relay
    code = 0
    try:
        _serve(socket.create_server(address, backlog=2048, reuse_port=True))
    except BaseException as exc:
        print(f"minichat: worker {os.getpid()} failed: {exc!r}", file=sys.stderr)
        code = 1
    os._exit(code)


def _supervise(children: set[int], address: tuple[str, int], background: Any) -> None:
    """Forward SIGINT/SIGTERM to the workers, replace a worker that dies, return when all have stopped."""
    stopping = False

    def stop(sig: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                children.discard(pid)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while children:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid not in children:
            continue
        children.discard(pid)
        if not stopping:
            print(f"minichat: worker {pid} exited ({status}); starting another", file=sys.stderr)
            time.sleep(0.5)
            children.add(_spawn(address, background))


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn, but a requested stop (SIGINT/SIGTERM) ends the process with status 0."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C skips the graceful wait
            else:
                self.should_exit = True

        async def shutdown(self, sockets: Any = None) -> None:
            # Running generations end first (persisted, `done` sent), then connections close.
            app = self.config.app
            if hasattr(app, "drain"):
                await app.drain()
            await super().shutdown(sockets)

    return Server


if __name__ == "__main__":
    sys.exit(main())
