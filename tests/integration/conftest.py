"""Local mode served for real (uvicorn on a free port) against the test database and Redis."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from helpers import Api


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def server(database_url: str) -> Iterator[str]:
    """The local-mode app on http://127.0.0.1:<port> for the whole session."""
    import uvicorn

    from minichat_local.server import build_app

    port = free_port()
    config = uvicorn.Config(build_app(), host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("local mode did not start")
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def api(server: str, db: Any, redis_client: Any) -> Iterator[Api]:
    """A client against a clean database."""
    client = Api(server)
    yield client
    client.http.close()
