"""Local mode's background services: the outbox relay, the reaper, the purge and the worker's RabbitMQ
consumer.

On AWS these are schedules (relay, reaper, purge) and the Amazon MQ event source mapping (the worker);
here they are threads of the one local process.
"""

from __future__ import annotations

import contextlib
import os
import threading

from minichat import events, purge, reaper
from minichat_local.consumer import Consumer

__all__ = ["Background"]


class Background:
    """Start and stop the relay and reaper threads and the consumer together."""

    def __init__(self, *, relay_interval: float = 1.0, purge_interval: float = 3600.0) -> None:
        self._stop = threading.Event()
        self._wake = threading.Event()
        # Worker processes wake this process's relay through a pipe (one byte per commit with events).
        self._pipe_r, self._pipe_w = os.pipe()
        os.set_blocking(self._pipe_w, False)
        self._relay_interval = relay_interval
        self._purge_interval = purge_interval
        self._threads: list[threading.Thread] = []
        self.consumer = Consumer()

    def in_worker(self) -> None:
        """In a forked worker process: after a commit with events, poke the supervisor's relay."""
        os.close(self._pipe_r)
        events.set_commit_listener(self._poke)

    def _poke(self) -> None:
        # A full pipe already means "wake up"; the timer covers a supervisor that is gone.
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(self._pipe_w, b"!")

    def _forward_pokes(self) -> None:
        while not self._stop.is_set():
            try:
                if not os.read(self._pipe_r, 4096):
                    return
            except OSError:
                return
            self._wake.set()

    def start(self) -> None:
        # A commit that wrote outbox rows wakes the relay at once (the fast path); the timer sweeps the rest.
        events.set_commit_listener(self._wake.set)
        self._threads = [
            threading.Thread(target=self._forward_pokes, name="minichat-relay-wake", daemon=True),
            threading.Thread(
                target=events.run_relay,
                args=(self._stop,),
                kwargs={"interval": self._relay_interval, "wake": self._wake},
                name="minichat-relay",
                daemon=True,
            ),
            threading.Thread(
                target=reaper.run_reaper, args=(self._stop,), name="minichat-reaper", daemon=True
            ),
            threading.Thread(
                target=purge.run_purger,
                args=(self._stop,),
                kwargs={"interval": self._purge_interval},
                name="minichat-purge",
                daemon=True,
            ),
        ]
        for thread in self._threads:
            thread.start()
        self.consumer.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        events.set_commit_listener(None)
        self.consumer.stop()
        os.close(self._pipe_w)  # ends _forward_pokes once no worker holds the pipe either
        for thread in self._threads:
            if thread.name != "minichat-relay-wake":
                thread.join(10)
        events.close_relay()
