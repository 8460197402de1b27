"""The built-in mock provider: deterministic models for development, demos and client tests (SPEC §1)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator

from minichat.errors import ProviderError
from minichat.providers.base import (
    Delta,
    Finish,
    ProviderRequest,
    StreamItem,
    Usage,
    estimate_prompt_tokens,
)

__all__ = ["MOCK_MODELS", "MockProvider", "split_words"]

MOCK_MODELS = ("mock-echo", "mock-slow", "mock-stall", "mock-error")

_WORD = re.compile(r"\s*\S+")
_ERROR_AFTER_WORDS = 3


def split_words(text: str) -> list[str]:
    """Split text into word pieces (leading whitespace attached) whose concatenation is exactly `text`."""
    pieces = _WORD.findall(text)
    consumed = sum(map(len, pieces))
    if consumed < len(text):
        # Trailing whitespace (or a text that is only whitespace) rides on the last piece.
        if pieces:
            pieces[-1] += text[consumed:]
        else:
            pieces = [text]
    return pieces


class MockProvider:
    """Echoes the last user message back word by word; each model adds one behaviour to test against."""

    name = "mock"

    def __init__(self, *, slow_delay: float = 0.2, stall_tick: float = 3600.0) -> None:
        self._slow_delay = slow_delay
        self._stall_tick = stall_tick

    def models(self) -> list[str]:
        """The mock model ids."""
        return list(MOCK_MODELS)

    async def aclose(self) -> None:
        """Nothing to release."""

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[StreamItem, None]:
        """Stream the echo for `request.model`; raises ProviderError for a model it does not serve."""
        model = request.model
        if model not in MOCK_MODELS:
            raise ProviderError(f"the mock provider does not serve {model!r}")
        last_user = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
        words = split_words(last_user)
        if model == "mock-stall":
            words = words[:1]
        elif model == "mock-error":
            words = words[:_ERROR_AFTER_WORDS]
        # A word is a token here: maxTokens cuts the echo as it would cut a model's answer.
        cut = request.max_tokens is not None and len(words) > request.max_tokens
        if cut:
            words = words[: request.max_tokens]

        for index, word in enumerate(words):
            if model == "mock-slow" and index:
                await asyncio.sleep(self._slow_delay)
            yield Delta(word)

        if model == "mock-stall":
            # Sleeping in a loop (not awaiting a future nobody resolves) keeps the task cancellable and
            # visible; only the consumer's cancel or aclose ends it.
            while True:
                await asyncio.sleep(self._stall_tick)
        if model == "mock-error":
            raise ProviderError(f"mock-error failed after {len(words)} words")
        yield Finish("length" if cut else "stop")
        yield Usage(input_tokens=estimate_prompt_tokens(request.messages), output_tokens=len(words))
