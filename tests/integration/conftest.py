"""Local mode served for real (uvicorn on a free port) against the test database and Redis."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from helpers import Api, LocalProcess, free_port

# Models the OpenAI provider serves in the test server: the stub reads its behaviour from the name.
STUB_MODELS = ("stub-tokens-12", "stub-tokens-30-rate-20", "stub-error-500", "stub-stall-after-2")


@pytest.fixture(scope="session")
def openai_stub() -> Iterator[Any]:
    """An OpenAI-compatible server (the edge of the world) for the whole session."""
    from minichat_local.openai_stub import OpenAIStub, serve_stub

    stub = OpenAIStub()
    with serve_stub(stub) as base_url:
        stub.base_url = base_url  # type: ignore[attr-defined]
        yield stub


@pytest.fixture(scope="session")
def server(database_url: str, openai_stub: Any, broker_vhost: str) -> Iterator[str]:
    """The local-mode app on http://127.0.0.1:<port> for the whole session."""
    import uvicorn

    from minichat.config import set_settings
    from minichat_local.server import build_app

    os.environ.update(
        {
            "OPENAI_BASE_URL": openai_stub.base_url,
            "OPENAI_API_KEY": "sk-test-not-a-real-key",
            "MINICHAT_OPENAI_MODELS": ",".join(STUB_MODELS),
            "MINICHAT_DEFAULT_MODEL": "mock-echo",
        }
    )
    set_settings(None)  # re-read the environment, whatever an earlier test cached

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


@pytest.fixture
def local_process(
    database_url: str, broker_vhost: str, db: Any, redis_client: Any, tmp_path: Any
) -> Iterator[LocalProcess]:
    """A local-mode process on the test services (started by the test; stopped and its log shown after)."""
    process = LocalProcess(free_port(), tmp_path / "local-mode.log")
    try:
        yield process
    finally:
        process.stop()
        print(process.log())  # pytest shows it when the test failed


@pytest.fixture
def local_mode(local_process: LocalProcess) -> Iterator[Api]:
    """A running local-mode process and a client for it."""
    local_process.start()
    api = Api(local_process.base_url)
    yield api
    api.http.close()
