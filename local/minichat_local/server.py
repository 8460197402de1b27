"""Local mode: the REST API (Chalice), the stream app (ASGI) and the web client on one origin."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from minichat_local.functions import load_function, repo_root
from minichat_local.gateway import ChaliceBridge

__all__ = ["LocalApp", "build_app"]

_STREAM_ROUTE = re.compile(r"^/api/generations/[^/]+/stream/?$")


class LocalApp:
    """One ASGI app dispatching by path, the way API Gateway and CloudFront split the traffic on AWS."""

    def __init__(self, *, api: Any, stream: Any, web: Any) -> None:
        self.api = api
        self.stream = stream
        self.web = web

    async def drain(self) -> None:
        """Before connections close: running generations end and their streams get `done`."""
        engine = getattr(self.stream.state, "engine", None)
        if engine is not None:
            await engine.drain()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.stream(scope, receive, send)  # the stream app owns the async resources
            return
        path: str = scope.get("path", "")
        if _STREAM_ROUTE.match(path):
            await self.stream(scope, receive, send)
        elif path == "/api" or path.startswith("/api/"):
            await self.api(scope, receive, send)
        else:
            await self.web(scope, receive, send)


def build_app(*, web_dir: Path | None = None, threads: int = 4) -> LocalApp:
    """The local-mode ASGI app, built from the same function code Lambda runs."""
    api = load_function("api").app
    stream = load_function("stream").app
    web_dir = web_dir or repo_root() / "web"
    return LocalApp(
        api=ChaliceBridge(api, threads=threads),
        stream=stream,
        # Inside a Starlette app, so a missing file is an ordinary 404 (bare StaticFiles would raise).
        web=Starlette(routes=[Mount("/", StaticFiles(directory=str(web_dir), html=True, check_dir=False))]),
    )
