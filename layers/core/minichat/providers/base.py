"""The provider protocol: what the streaming run needs from any model backend, plus prompt building."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeAlias

__all__ = [
    "ChatMessage",
    "Delta",
    "Finish",
    "FinishReason",
    "Provider",
    "ProviderRequest",
    "Role",
    "StreamItem",
    "Usage",
    "build_prompt",
    "estimate_prompt_tokens",
    "estimate_tokens",
    "load_json",
]

_DECODE_JSON = json.JSONDecoder().decode


def load_json(payload: bytes) -> Any:
    """json.loads(payload) for an upstream event's UTF-8 bytes, as it reads them (a lone surrogate's bytes
    pass, to be repaired with the rest of the text; bytes that are not UTF-8 raise ValueError), without its
    encoding detection, a Python function: about 30% less CPU for a token's chunk (2.1 µs instead of 3.0)."""
    return _DECODE_JSON(payload.decode("utf-8", "surrogatepass"))


Role: TypeAlias = Literal["system", "user", "assistant"]
FinishReason: TypeAlias = Literal["stop", "length"]

# Chat formats spend a few tokens per message on role and separators; counting them keeps the
# budget on the safe side.
MESSAGE_OVERHEAD_TOKENS = 4
_CHARS_PER_TOKEN = 4


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message of the prompt."""

    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class ProviderRequest:
    """What a provider is asked to complete."""

    model: str
    messages: Sequence[ChatMessage]
    temperature: float | None = None
    max_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Delta:
    """A piece of the answer's text, in order."""

    text: str


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts as the provider reports them (exact)."""

    input_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class Finish:
    """Why the model ended: `stop` (it finished) or `length` (its output limit was reached)."""

    reason: FinishReason


StreamItem: TypeAlias = Delta | Finish | Usage


class Provider(Protocol):
    """A model backend. Errors surface as ProviderError / ProviderTimeout with messages safe to show."""

    name: str

    def models(self) -> list[str]:
        """The model ids this provider serves."""
        ...

    def stream(self, request: ProviderRequest) -> AsyncGenerator[StreamItem, None]:
        """Deltas, then at most one Finish and one Usage; closing it closes the upstream request."""
        ...

    async def aclose(self) -> None:
        """Release held connections (end of process, end of a test)."""
        ...


def estimate_tokens(text: str) -> int:
    """A cheap token estimate: about four characters a token, at least 1 for non-empty text."""
    return -(-len(text) // _CHARS_PER_TOKEN)


def estimate_prompt_tokens(messages: Sequence[ChatMessage]) -> int:
    """The estimated input tokens of a prompt, per-message overhead included."""
    return sum(estimate_tokens(m.content) + MESSAGE_OVERHEAD_TOKENS for m in messages)


def build_prompt(
    system_prompt: str | None, history: Sequence[ChatMessage], *, context_tokens: int
) -> list[ChatMessage]:
    """System prompt plus the newest history fitting `context_tokens`; the last user message always stays."""
    system = [ChatMessage("system", system_prompt)] if system_prompt else []
    budget = context_tokens - estimate_prompt_tokens(system)
    anchor = next((i for i in range(len(history) - 1, -1, -1) if history[i].role == "user"), None)

    kept: dict[int, ChatMessage] = {}
    if anchor is not None:
        message = history[anchor]
        room = budget - MESSAGE_OVERHEAD_TOKENS
        if estimate_tokens(message.content) > room:
            # Keep the end: the question usually comes last in a long paste. The system prompt (at most
            # 8,000 characters by contract) is never cut, so a tiny budget still keeps some of the message.
            message = ChatMessage("user", message.content[-max(room, 1) * _CHARS_PER_TOKEN :])
        kept[anchor] = message
        budget -= estimate_prompt_tokens([message])

    # Newest first; the first turn that does not fit ends the walk, so what stays is a contiguous tail
    # of the conversation (oldest dropped first) rather than scattered small messages.
    for i in range(len(history) - 1, -1, -1):
        if i == anchor:
            continue
        cost = estimate_tokens(history[i].content) + MESSAGE_OVERHEAD_TOKENS
        if cost > budget:
            break
        kept[i] = history[i]
        budget -= cost
    return system + [kept[i] for i in sorted(kept)]
