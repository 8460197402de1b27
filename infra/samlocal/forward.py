"""TCP forwarding from the Docker bridge to this machine's loopback services, for `sam local`.

    python3 infra/samlocal/forward.py 5432 6379 5672     # the bridge's gateway port N → 127.0.0.1:N

PostgreSQL, Redis and RabbitMQ listen on 127.0.0.1 only; a function in a `sam local` container reaches the
host through the bridge's gateway address (host.docker.internal, mapped by samconfig.toml). This relays
those connections without reconfiguring the services. The tests use `Forwarder` on ephemeral ports.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterable

__all__ = ["Forwarder", "bridge_gateway"]


def bridge_gateway() -> str:
    """The Docker bridge's gateway address (docker0), what host.docker.internal maps to."""
    docker = shutil.which("docker") or "docker"
    out = subprocess.run(  # noqa: S603 (fixed arguments)
        [docker, "network", "inspect", "bridge", "--format", "{{range .IPAM.Config}}{{.Gateway}}{{end}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return out or "172.17.0.1"


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


class Forwarder:
    """Listens on `host` and relays each connection to 127.0.0.1, in a daemon thread of its own."""

    def __init__(self, host: str) -> None:
        self.host = host
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="forwarder", daemon=True)
        self._thread.start()
        self._servers: list[asyncio.Server] = []

    def add(self, target_port: int, listen_port: int = 0) -> int:
        """Relay `host:listen_port` (0: any free port) to 127.0.0.1:target_port; returns the port."""

        async def start() -> int:
            async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                try:
                    up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
                except OSError:
                    writer.close()
                    return
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

            server = await asyncio.start_server(relay, self.host, listen_port, family=socket.AF_INET)
            self._servers.append(server)
            port: int = server.sockets[0].getsockname()[1]
            return port

        return asyncio.run_coroutine_threadsafe(start(), self._loop).result(timeout=10)

    def close(self) -> None:
        for server in self._servers:
            self._loop.call_soon_threadsafe(server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)


def main(ports: Iterable[str]) -> None:
    forwarder = Forwarder(bridge_gateway())
    for port in ports:
        forwarder.add(int(port), int(port))
        print(f"forwarding {forwarder.host}:{port} -> 127.0.0.1:{port}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main(sys.argv[1:] or ["5432", "6379", "5672"])
