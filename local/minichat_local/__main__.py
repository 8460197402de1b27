"""`python -m minichat_local`: migrate, then serve everything on 127.0.0.1:${PORT:-8000} until Ctrl-C."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from types import FrameType
from typing import Any

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="minichat_local", description=__doc__)
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    args = parser.parse_args(argv)

    from minichat_local.functions import repo_root

    # Local mode keeps a generated dev secret so restarts keep sessions.
    os.environ.setdefault("MINICHAT_JWT_SECRET_FILE", str(repo_root() / ".minichat" / "jwt-secret"))
    os.environ.setdefault("MINICHAT_DB_POOL_MAX", "16")

    from minichat.config import get_settings
    from minichat.errors import ConfigError
    from minichat.log import setup_logging
    from minichat.migrate import apply_migrations, ensure_database
    from minichat_local.preflight import check_services

    try:
        settings = get_settings()
        _ = settings.jwt_secret
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

    import uvicorn

    from minichat_local.server import build_app

    _Server = _server_class()

    config = uvicorn.Config(
        build_app(),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    from minichat_local.services import Background

    background = Background()
    background.start()
    print(f"minichat: serving local mode on http://{args.host}:{args.port} (Ctrl-C stops)", file=sys.stderr)
    try:
        _Server(config).run()
    finally:
        background.stop()
    print("minichat: stopped", file=sys.stderr)
    return 0


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
            app = self.config.app
            if hasattr(app, "drain"):
                await app.drain()
            await super().shutdown(sockets)

    return Server


if __name__ == "__main__":
    sys.exit(main())
