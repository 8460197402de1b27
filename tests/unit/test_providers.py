"""The mock provider, prompt building and the provider registry (no network)."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time
from collections.abc import AsyncGenerator

import pytest

from minichat.config import Settings
from minichat.errors import ConfigError, ProviderError, UnknownModel
from minichat.providers import (
    ChatMessage,
    Delta,
    Finish,
    ProviderRegistry,
    ProviderRequest,
    StreamItem,
    Usage,
    build_prompt,
    estimate_prompt_tokens,
    estimate_tokens,
)
from minichat.providers.base import MESSAGE_OVERHEAD_TOKENS, Role
from minichat.providers.mock import MockProvider, split_words


def _request(
    model: str, text: str, *, history: list[ChatMessage] | None = None, max_tokens: int | None = None
) -> ProviderRequest:
    return ProviderRequest(
        model=model, messages=[*(history or []), ChatMessage("user", text)], max_tokens=max_tokens
    )


async def _drain(stream: AsyncGenerator[StreamItem, None]) -> list[StreamItem]:
    return [item async for item in stream]


def _collect(request: ProviderRequest, provider: MockProvider | None = None) -> list[StreamItem]:
    return asyncio.run(_drain((provider or MockProvider()).stream(request)))


# --- split_words / mock-echo ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "hello",
        "  Hello,  world!\n\tHow are\r\nyou?  ",
        "  ",
        "\n",
        "one",
        "日本語 テキスト 🌍 ok",
        "a b c d e",
    ],
)
def test_split_words_concatenates_back_to_the_text(text: str) -> None:
    pieces = split_words(text)
    assert "".join(pieces) == text
    assert all(pieces)


def test_split_words_pieces() -> None:
    assert split_words("  Hello,  world!\n") == ["  Hello,", "  world!\n"]
    assert split_words("") == []
    assert split_words("   ") == ["   "]


def test_mock_echo_streams_the_last_user_message_word_by_word() -> None:
    history = [ChatMessage("user", "an older question"), ChatMessage("assistant", "an older answer")]
    text = "  Hello,  world!\n\tsecond line  "
    request = _request("mock-echo", text, history=history)
    items = _collect(request)
    deltas = [item.text for item in items if isinstance(item, Delta)]
    assert deltas == ["  Hello,", "  world!", "\n\tsecond", " line  "]
    assert "".join(deltas) == text
    assert items[-2:] == [
        Finish("stop"),
        Usage(input_tokens=estimate_prompt_tokens(request.messages), output_tokens=4),
    ]
    assert sum(isinstance(item, Usage) for item in items) == 1


def test_mock_echo_has_no_artificial_delay() -> None:
    text = " ".join(f"w{i}" for i in range(2000))
    started = time.perf_counter()
    items = _collect(_request("mock-echo", text))
    assert time.perf_counter() - started < 0.5
    assert len(items) == 2002  # 2000 deltas, Finish, Usage


def test_mock_echo_without_a_user_message_sends_only_usage() -> None:
    request = ProviderRequest(model="mock-echo", messages=[ChatMessage("system", "be brief")])
    assert _collect(request) == [
        Finish("stop"),
        Usage(input_tokens=estimate_prompt_tokens(request.messages), output_tokens=0),
    ]


def test_mock_says_why_it_ended_stop_or_length_when_max_tokens_cut_it() -> None:
    whole = _collect(_request("mock-echo", "one two three"))
    assert whole[-2:] == [Finish("stop"), Usage(whole[-1].input_tokens, 3)]  # type: ignore[union-attr]
    cut = _collect(_request("mock-echo", "one two three", max_tokens=2))
    assert [i for i in cut if isinstance(i, Delta)] == [Delta("one"), Delta(" two")]
    assert cut[-2:] == [Finish("length"), Usage(cut[-1].input_tokens, 2)]  # type: ignore[union-attr]


def test_mock_slow_waits_200_ms_between_words() -> None:
    async def timed() -> list[tuple[float, StreamItem]]:
        started = time.perf_counter()
        return [(time.perf_counter() - started, item) async for item in MockProvider().stream(request)]

    request = _request("mock-slow", "one two three")
    stamps = asyncio.run(timed())
    assert [item for _, item in stamps][:3] == [Delta("one"), Delta(" two"), Delta(" three")]
    assert stamps[0][0] < 0.1
    assert 0.19 <= stamps[1][0] - stamps[0][0] < 0.35
    assert 0.19 <= stamps[2][0] - stamps[1][0] < 0.35
    assert stamps[-1][1] == Usage(input_tokens=estimate_prompt_tokens(request.messages), output_tokens=3)


def test_mock_stall_sends_one_word_then_nothing_until_closed() -> None:
    async def scenario() -> tuple[StreamItem, bool]:
        stream = MockProvider().stream(_request("mock-stall", "first second third"))
        first = await anext(stream)
        try:
            await asyncio.wait_for(anext(stream), 0.3)
            stalled = False
        except TimeoutError:
            stalled = True
        await stream.aclose()
        return first, stalled

    first, stalled = asyncio.run(scenario())
    assert first == Delta("first")
    assert stalled


def test_mock_stall_ends_promptly_when_the_consumer_is_cancelled() -> None:
    async def scenario() -> tuple[list[StreamItem], float]:
        seen: list[StreamItem] = []

        async def consume() -> None:
            async for item in MockProvider().stream(_request("mock-stall", "only words here")):
                seen.append(item)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return seen, time.perf_counter() - started

    seen, took = asyncio.run(scenario())
    assert seen == [Delta("only")]
    assert took < 0.05


@pytest.mark.parametrize(
    ("text", "expected"),
    [("one two three four five", ["one", " two", " three"]), ("just two", ["just", " two"])],
)
def test_mock_error_fails_after_three_words(text: str, expected: list[str]) -> None:
    async def scenario() -> tuple[list[StreamItem], ProviderError]:
        seen: list[StreamItem] = []
        with pytest.raises(ProviderError) as caught:
            async for item in MockProvider().stream(_request("mock-error", text)):
                seen.append(item)
        return seen, caught.value

    seen, error = asyncio.run(scenario())
    assert seen == [Delta(word) for word in expected]
    assert error.code == "provider_error"
    assert error.status == 502


def test_mock_refuses_a_model_it_does_not_serve() -> None:
    with pytest.raises(ProviderError):
        _collect(_request("gpt-4o", "hi"))


# --- estimates and build_prompt ------------------------------------------------------------------


@pytest.mark.parametrize(("text", "tokens"), [("", 0), ("a", 1), ("abcd", 1), ("abcde", 2), ("x" * 400, 100)])
def test_estimate_tokens(text: str, tokens: int) -> None:
    assert estimate_tokens(text) == tokens


def test_estimate_prompt_tokens_counts_a_per_message_overhead() -> None:
    messages = [ChatMessage("system", "abcd"), ChatMessage("user", "abcdefgh")]
    assert estimate_prompt_tokens(messages) == 1 + 2 + 2 * MESSAGE_OVERHEAD_TOKENS


def _turns(count: int, *, chars: int = 40) -> list[ChatMessage]:
    """Alternating user/assistant turns, each costing chars/4 + overhead tokens, ending with a user turn."""
    roles: list[Role] = ["user", "assistant"]
    start = 0 if count % 2 else 1
    return [ChatMessage(roles[(start + i) % 2], f"{i:02d}" + "x" * (chars - 2)) for i in range(count)]


def test_build_prompt_keeps_everything_that_fits() -> None:
    history = _turns(5)
    prompt = build_prompt("You are terse.", history, context_tokens=10_000)
    assert prompt == [ChatMessage("system", "You are terse."), *history]


def test_build_prompt_without_system_prompt() -> None:
    history = _turns(3)
    assert build_prompt(None, history, context_tokens=10_000) == history
    assert build_prompt("", history, context_tokens=10_000) == history


def test_build_prompt_drops_the_oldest_turns_first() -> None:
    history = _turns(9)  # each turn: 10 tokens + 4 overhead = 14
    system = "s" * 40  # 14 with overhead
    # Room for the system prompt and exactly three turns (55 < 14 * 4 = 56).
    prompt = build_prompt(system, history, context_tokens=14 * 4 + 13)
    assert prompt == [ChatMessage("system", system), *history[-3:]]
    assert [m.content[:2] for m in prompt[1:]] == ["06", "07", "08"]


def test_build_prompt_keeps_a_contiguous_tail() -> None:
    history = [
        ChatMessage("user", "tiny"),
        ChatMessage("assistant", "tiny"),
        ChatMessage("user", "y" * 4000),  # too big for the budget
        ChatMessage("assistant", "short answer"),
        ChatMessage("user", "last question"),
    ]
    prompt = build_prompt(None, history, context_tokens=100)
    # The huge message stops the walk: the older tiny turns do not jump over it.
    assert prompt == history[-2:]


def test_build_prompt_truncates_a_too_long_last_user_message_from_the_front() -> None:
    text = "".join(f"{i:05d}" for i in range(2000))  # 10,000 characters, 2,500 tokens
    history = [ChatMessage("assistant", "earlier"), ChatMessage("user", text)]
    prompt = build_prompt("sys", history, context_tokens=500)
    assert prompt[0] == ChatMessage("system", "sys")
    assert len(prompt) == 2
    kept = prompt[1]
    assert kept.role == "user"
    room = 500 - (1 + MESSAGE_OVERHEAD_TOKENS) - MESSAGE_OVERHEAD_TOKENS
    assert kept.content == text[-room * 4 :]
    assert text.endswith(kept.content)
    assert estimate_prompt_tokens(prompt) == 500


def test_build_prompt_always_keeps_some_of_the_last_user_message() -> None:
    prompt = build_prompt("s" * 8000, [ChatMessage("user", "what is the answer?")], context_tokens=100)
    assert prompt[0].content == "s" * 8000
    assert prompt[1].role == "user"
    assert prompt[1].content and "what is the answer?".endswith(prompt[1].content)


def test_build_prompt_keeps_the_last_user_message_even_if_an_answer_follows() -> None:
    history = [ChatMessage("user", "q" * 40), ChatMessage("assistant", "a" * 4000)]
    assert build_prompt(None, history, context_tokens=50) == history[:1]


def test_build_prompt_stays_within_budget_for_random_histories() -> None:
    rng = random.Random(1234)
    for _ in range(300):
        count = rng.randint(1, 12)
        roles: list[Role] = ["user", "assistant"]
        history = [ChatMessage(roles[i % 2], "z" * rng.randint(0, 900)) for i in range(count)]
        history[-1] = ChatMessage("user", "q" * rng.randint(1, 3000))
        context = rng.randint(60, 1200)
        prompt = build_prompt("system prompt", history, context_tokens=context)
        assert estimate_prompt_tokens(prompt) <= context
        assert prompt[-1].role == "user"
        assert history[-1].content.endswith(prompt[-1].content)
        # What stays is the system prompt plus a contiguous tail of the history, in order.
        body = prompt[1:-1]
        assert body == history[len(history) - 1 - len(body) : -1]


# --- registry ------------------------------------------------------------------------------------


def test_registry_without_openai_serves_the_mock_models() -> None:
    registry = ProviderRegistry.from_settings(Settings())
    assert registry.default_model == "mock-echo"
    limits = {"contextTokens": 16_000, "maxOutputTokens": 4096}  # MINICHAT_CONTEXT_TOKENS, the default
    assert registry.list_models() == [
        {"id": "mock-echo", "provider": "mock", **limits},
        {"id": "mock-slow", "provider": "mock", **limits},
        {"id": "mock-stall", "provider": "mock", **limits},
        {"id": "mock-error", "provider": "mock", **limits},
    ]
    assert registry.resolve("mock-stall").name == "mock"


def test_registry_with_an_openai_key_serves_the_configured_models_first() -> None:
    settings = Settings(openai_api_key="sk-test", openai_models=("gpt-4o-mini", "gpt-4o"))
    registry = ProviderRegistry.from_settings(settings)
    assert registry.default_model == "gpt-4o-mini"
    assert registry.resolve("gpt-4o").name == "openai"
    assert registry.resolve("gpt-4o").models() == ["gpt-4o-mini", "gpt-4o"]
    assert registry.resolve("mock-echo").name == "mock"
    assert [m["id"] for m in registry.list_models()][:3] == ["gpt-4o-mini", "gpt-4o", "mock-echo"]
    assert registry.list_models()[1] == {
        "id": "gpt-4o",
        "provider": "openai",
        "contextTokens": 128_000,
        "maxOutputTokens": 16_384,
    }


def test_registry_with_only_a_base_url_serves_the_openai_models() -> None:
    settings = Settings(openai_base_url="http://127.0.0.1:9/v1", openai_models=("local-llama",))
    registry = ProviderRegistry.from_settings(settings)
    assert registry.resolve("local-llama").name == "openai"
    assert registry.default_model == "local-llama"


def test_registry_ignores_openai_models_when_openai_is_not_configured() -> None:
    registry = ProviderRegistry.from_settings(Settings(openai_models=("gpt-4o",)))
    assert registry.default_model == "mock-echo"
    with pytest.raises(UnknownModel):
        registry.resolve("gpt-4o")


def test_registry_honours_the_configured_default_model() -> None:
    settings = Settings(openai_api_key="sk-test", openai_models=("gpt-4o",), default_model="mock-slow")
    assert ProviderRegistry.from_settings(settings).default_model == "mock-slow"


def test_registry_refuses_an_unknown_default_model_at_cold_start() -> None:
    with pytest.raises(ConfigError):
        ProviderRegistry.from_settings(Settings(default_model="gpt-4o"))


def test_registry_refuses_a_model_served_twice() -> None:
    with pytest.raises(ConfigError):
        ProviderRegistry.from_settings(Settings(openai_api_key="k", openai_models=("mock-echo",)))


def test_resolve_unknown_model() -> None:
    registry = ProviderRegistry.from_settings(Settings())
    with pytest.raises(UnknownModel) as caught:
        registry.resolve("no-such-model")
    assert caught.value.code == "unknown_model"
    assert caught.value.status == 400
    assert "no-such-model" in caught.value.message


def test_the_openai_package_is_not_imported_until_a_stream_needs_it() -> None:
    # A fresh interpreter: this test session may have imported `openai` already.
    code = (
        "import sys\n"
        "from minichat.config import Settings\n"
        "from minichat.providers import ProviderRegistry\n"
        "r = ProviderRegistry.from_settings(Settings(openai_api_key='k', openai_models=('m',)))\n"
        "assert r.resolve('m').name == 'openai'\n"
        "assert 'openai' not in sys.modules, 'imported too early'\n"
        "ProviderRegistry.from_settings(Settings(openai_api_key='k', openai_models=('m',)), preload=True)\n"
        "assert 'openai' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
