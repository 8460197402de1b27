"""One error tree: each error knows its HTTP status and its contract `code`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

__all__ = [
    "ConfigError",
    "EmailTaken",
    "GenerationInFlight",
    "IdempotencyKeyReused",
    "InternalError",
    "InvalidCredentials",
    "InvalidJson",
    "InvalidToken",
    "MethodNotAllowed",
    "MiniChatError",
    "NotFound",
    "PayloadTooLarge",
    "ProviderError",
    "ProviderTimeout",
    "QuotaExceeded",
    "RateLimited",
    "ServiceUnavailable",
    "StreamNotOpened",
    "Unauthorized",
    "UnknownModel",
    "ValidationError",
    "WorkerLost",
]


class ConfigError(RuntimeError):
    """The environment does not describe a runnable MiniChat (raised at cold start)."""


class MiniChatError(Exception):
    """Base of every error a client may see; mapped to the envelope once at each edge."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    default_message: ClassVar[str] = "An internal error occurred."

    def __init__(self, message: str | None = None, **extra: Any) -> None:
        self.message = message or self.default_message
        self.extra = extra
        super().__init__(self.message)

    def headers(self) -> dict[str, str]:
        """Extra HTTP headers this error carries (Retry-After, Allow, ...)."""
        return {}

    def envelope(self, request_id: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message, "requestId": request_id}
        body.update(self.extra)
        return {"error": body}


class ValidationError(MiniChatError):
    status = 400
    code = "validation_error"
    default_message = "The request is not valid."

    def __init__(self, message: str, *, field: str | None = None) -> None:
        if field is None:
            super().__init__(message)
        else:
            super().__init__(message, field=field)


class InvalidJson(MiniChatError):
    status = 400
    code = "invalid_json"
    default_message = "The request body is not valid JSON."


class PayloadTooLarge(MiniChatError):
    status = 413
    code = "payload_too_large"
    default_message = "The request body is larger than 256 KiB."


class Unauthorized(MiniChatError):
    status = 401
    code = "unauthorized"
    default_message = "Authentication is required."

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="minichat"'}


class InvalidCredentials(MiniChatError):
    status = 401
    code = "invalid_credentials"
    default_message = "The email or password is wrong."


class InvalidToken(Unauthorized):
    code = "invalid_token"
    default_message = "The token is invalid or expired."


class NotFound(MiniChatError):
    status = 404
    code = "not_found"
    default_message = "Not found."


class MethodNotAllowed(MiniChatError):
    status = 405
    code = "method_not_allowed"
    default_message = "This method is not allowed on this route."

    def __init__(self, allowed: str) -> None:
        super().__init__()
        self.allowed = allowed

    def headers(self) -> dict[str, str]:
        return {"Allow": self.allowed}


class EmailTaken(MiniChatError):
    status = 409
    code = "email_taken"
    default_message = "An account with this email already exists."


class GenerationInFlight(MiniChatError):
    status = 409
    code = "generation_in_flight"
    default_message = "Another generation is still running; attach to it or cancel it first."

    def __init__(self, generation_id: str) -> None:
        super().__init__(generationId=generation_id)


class IdempotencyKeyReused(MiniChatError):
    status = 409
    code = "idempotency_key_reused"
    default_message = "This Idempotency-Key was used with a different request."


class RateLimited(MiniChatError):
    status = 429
    code = "rate_limited"
    default_message = "Too many requests."

    def __init__(self, retry_after: int, message: str | None = None) -> None:
        super().__init__(message or f"Too many requests; retry in {retry_after} s.", retryAfter=retry_after)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class QuotaExceeded(MiniChatError):
    status = 429
    code = "quota_exceeded"
    default_message = "The daily token budget is used up."

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message)
        now = datetime.now(UTC)
        midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
        self.retry_after = max(1, int((midnight - now).total_seconds()))  # the budget renews at 00:00 UTC

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class UnknownModel(MiniChatError):
    status = 400
    code = "unknown_model"
    default_message = "No provider serves this model."


class ProviderError(MiniChatError):
    status = 502
    code = "provider_error"
    default_message = "The model provider failed."


class ProviderTimeout(MiniChatError):
    status = 504
    code = "provider_timeout"
    default_message = "The model provider did not answer in time."


class WorkerLost(MiniChatError):
    """A generation whose streaming process went away (stopped, crashed, lost its heartbeat)."""

    status = 500
    code = "worker_lost"
    default_message = "The generation was interrupted; start it again."


class StreamNotOpened(MiniChatError):
    """A generation queued for too long with no stream connection to start it."""

    status = 408
    code = "stream_not_opened"
    default_message = "No stream was opened for this generation in time."


class ServiceUnavailable(MiniChatError):
    status = 503
    code = "service_unavailable"
    default_message = "A backing service is unavailable; retry shortly."

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class InternalError(MiniChatError):
    status = 500
    code = "internal_error"
