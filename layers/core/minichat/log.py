"""Structured logs: a constant message plus fields, JSON lines, the request id bound once."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid
from typing import Any

__all__ = ["accept_request_id", "bind_request_id", "get_logger", "request_id", "setup_logging"]

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("minichat_request_id", default=None)


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def accept_request_id(incoming: str | None) -> str:
    """Echo a client's X-Request-Id of 1-128 safe characters, else make a new one."""
    if incoming and _REQUEST_ID.match(incoming):
        return incoming
    return uuid.uuid4().hex


def bind_request_id(value: str | None) -> contextvars.Token[str | None]:
    return _request_id.set(value)


def request_id() -> str | None:
    return _request_id.get()


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = _request_id.get()
        if rid:
            entry["requestId"] = rid
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class Logger:
    """`log.info("chat created", chat_id=...)`: fields become JSON keys."""

    def __init__(self, name: str) -> None:
        self._log = logging.getLogger(name)

    def _emit(self, level: int, msg: str, exc_info: bool, fields: dict[str, Any]) -> None:
        if self._log.isEnabledFor(level):
            self._log.log(level, msg, exc_info=exc_info, extra={"fields": fields}, stacklevel=3)

    def debug(self, msg: str, **fields: Any) -> None:
        self._emit(logging.DEBUG, msg, False, fields)

    def info(self, msg: str, **fields: Any) -> None:
        self._emit(logging.INFO, msg, False, fields)

    def warning(self, msg: str, **fields: Any) -> None:
        self._emit(logging.WARNING, msg, False, fields)

    def error(self, msg: str, *, exc_info: bool = False, **fields: Any) -> None:
        self._emit(logging.ERROR, msg, exc_info, fields)

    def exception(self, msg: str, **fields: Any) -> None:
        self._emit(logging.ERROR, msg, True, fields)


def get_logger(name: str) -> Logger:
    return Logger(name)


def setup_logging(level: str = "INFO") -> None:
    """JSON lines on stderr for the minichat loggers (Lambda ships them to CloudWatch as they are)."""
    root = logging.getLogger("minichat")
    root.setLevel(level)
    if not any(getattr(h, "_minichat", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_JsonFormatter())
        handler._minichat = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.propagate = False
