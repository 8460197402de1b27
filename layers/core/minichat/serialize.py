"""Rows to the contract's camelCase shapes (SPEC §2 "Shapes"). One function per shape."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

__all__ = ["chat_out", "generation_out", "iso", "message_out", "public_path_prefix", "user_out", "utcnow"]


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(value: datetime | None) -> str | None:
    """ISO-8601 UTC with a `Z`, millisecond precision."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def public_path_prefix(*, stage: str | None, host: str, headers: Mapping[str, str]) -> str:
    """What goes before a path the API returns (`streamUrl`) so that the client can open it as it is.

    `/{stage}` when the request came through API Gateway's default host, whose paths start with the
    stage; nothing through a custom domain mapped at `/`, CloudFront's one origin, or local mode.
    CloudFront reaches the default host too, and says so with a header of its own (template.yaml,
    WebDistribution). `headers`: the request's, by lower-case name (or a case-insensitive mapping).
    """
    if not stage or ".execute-api." not in host or "x-minichat-origin" in headers:
        return ""
    return f"/{stage}"


def user_out(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": str(row["id"]), "email": row["email"], "createdAt": iso(row["created_at"])}


def chat_out(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "title": row["title"],
        "createdAt": iso(row["created_at"]),
        "updatedAt": iso(row["updated_at"]),
        "activeLeafId": _id(row["active_leaf_id"]),
    }


def message_out(row: dict[str, Any]) -> dict[str, Any]:
    """chats._LIST_PATH writes the same shape in SQL."""
    return {
        "id": str(row["id"]),
        "chatId": str(row["chat_id"]),
        "parentId": _id(row["parent_id"]),
        "role": row["role"],
        "content": row["content"],
        "generationId": _id(row.get("generation_id")),
        "createdAt": iso(row["created_at"]),
        "siblingIds": [str(sibling) for sibling in row["sibling_ids"]],
    }


def generation_out(row: dict[str, Any]) -> dict[str, Any]:
    """The contract's Generation shape."""
    return {
        "id": str(row["id"]),
        "chatId": str(row["chat_id"]),
        "status": row["status"],
        "model": row["model"],
        "systemPrompt": row["system_prompt"],
        "temperature": row["temperature"],
        "maxTokens": row["max_tokens"],
        "inputTokens": row["input_tokens"],
        "outputTokens": row["output_tokens"],
        "createdAt": iso(row["created_at"]),
        "startedAt": iso(row["started_at"]),
        "finishedAt": iso(row["finished_at"]),
        "errorCode": row["error_code"],
        "errorMessage": row["error_message"],
        "requestId": row["request_id"],
        "finishReason": row["finish_reason"],
    }


def _id(value: Any) -> str | None:
    return str(value) if value is not None else None
