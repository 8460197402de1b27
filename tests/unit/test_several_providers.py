"""Several providers (SPEC §7.2): the configuration forms, one provider per model id, per-model limits."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from minichat.config import OpenAIServer, Settings
from minichat.errors import ConfigError
from minichat.providers import ChatMessage, ProviderRegistry
from minichat.providers.bedrock import converse_messages
from minichat.providers.models import ModelLimits, known_limits, limits_for

BEDROCK_ENV = {
    "MINICHAT_BEDROCK_MODELS": "anthropic.claude-3-5-haiku-20241022-v1:0, us.amazon.nova-lite-v1:0"
}


def test_bedrock_settings_and_the_region_default() -> None:
    s = Settings.from_env({**BEDROCK_ENV, "AWS_REGION": "eu-west-3"})
    assert s.bedrock_models == ("anthropic.claude-3-5-haiku-20241022-v1:0", "us.amazon.nova-lite-v1:0")
    assert s.bedrock_region == "eu-west-3" and s.bedrock_endpoint_url is None
    s = Settings.from_env(
        {
            **BEDROCK_ENV,
            "AWS_REGION": "eu-west-3",
            "MINICHAT_BEDROCK_REGION": "us-west-2",
            "MINICHAT_BEDROCK_ENDPOINT_URL": "https://vpce-1.bedrock-runtime.us-west-2.vpce.amazonaws.com",
        }
    )
    assert s.bedrock_region == "us-west-2" and s.bedrock_endpoint_url.startswith("https://vpce-")  # type: ignore[union-attr]


def test_bedrock_without_a_region_is_refused() -> None:
    with pytest.raises(ConfigError, match="MINICHAT_BEDROCK_REGION"):
        ProviderRegistry.from_settings(Settings.from_env(BEDROCK_ENV))


def test_the_list_form_of_openai_servers() -> None:
    servers = [
        {"name": "openai", "apiKey": "sk-1", "models": ["gpt-4o-mini"]},
        {"name": "vllm", "baseUrl": "http://10.0.0.5:8000/v1", "models": ["llama-3.1-8b", "qwen"]},
    ]
    s = Settings.from_env({"MINICHAT_OPENAI_SERVERS": json.dumps(servers)})
    assert s.openai_servers == (
        OpenAIServer(name="openai", models=("gpt-4o-mini",), api_key="sk-1"),
        OpenAIServer(name="vllm", models=("llama-3.1-8b", "qwen"), base_url="http://10.0.0.5:8000/v1"),
    )
    assert "sk-1" not in repr(s.openai_servers)
    registry = ProviderRegistry.from_settings(s)
    assert registry.default_model == "gpt-4o-mini"
    assert registry.resolve("qwen") is not registry.resolve("gpt-4o-mini")
    assert {registry.resolve(m).name for m in ("qwen", "gpt-4o-mini")} == {"openai"}


def test_the_single_form_and_the_list_form_together() -> None:
    servers = [{"name": "ollama", "baseUrl": "http://127.0.0.1:11434/v1", "models": ["llama3.2"]}]
    s = Settings.from_env(
        {
            "OPENAI_API_KEY": "sk-1",
            "MINICHAT_OPENAI_MODELS": "gpt-4o",
            "MINICHAT_OPENAI_SERVERS": json.dumps(servers),
        }
    )
    ids = [m["id"] for m in ProviderRegistry.from_settings(s).list_models()]
    assert ids[:2] == ["gpt-4o", "llama3.2"]


@pytest.mark.parametrize(
    ("raw", "complaint"),
    [
        ("{not json", "not valid JSON"),
        ('{"name": "x"}', "JSON list"),
        ('[{"name": "x", "models": []}]', "non-empty list"),
        ('[{"name": "x", "models": ["m"], "apiKey": "a", "apiKeySecretArn": "arn:x"}]', "both"),
        ('[{"name": "x", "models": ["m"], "key": "a"}]', "unknown fields: key"),
        ('[{"name": "x", "models": ["m"]}, {"name": "x", "models": ["n"]}]', "twice"),
        ('[{"name": "bad name!", "models": ["m"]}]', "name"),
        ('[{"name": "x", "models": ["m"], "baseUrl": 5}]', "baseUrl"),
    ],
)
def test_a_malformed_server_list_is_refused(raw: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        Settings.from_env({"MINICHAT_OPENAI_SERVERS": raw})


def test_a_server_key_from_secrets_manager_is_read_when_the_client_is_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from minichat.providers import openai as openai_provider

    asked: list[str] = []

    def fetch(arn: str, *, key: str, variable: str) -> str:
        asked.append(arn)
        return "sk-from-secret"

    monkeypatch.setattr(openai_provider, "fetch_secret_value", fetch)
    arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:k"
    raw = json.dumps([{"name": "x", "apiKeySecretArn": arn, "models": ["m"]}])
    settings = Settings.from_env({"MINICHAT_OPENAI_SERVERS": raw})
    assert settings.openai_servers[0].api_key is None
    ProviderRegistry.from_settings(settings)  # what the API function does: no secret read
    assert asked == []
    registry = ProviderRegistry.from_settings(settings, preload=True)  # the stream function's cold start
    assert asked == [arn]
    assert registry.resolve("m")._make_client().api_key == "sk-from-secret"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("env", "first", "second"),
    [
        (
            {"OPENAI_API_KEY": "k", "MINICHAT_OPENAI_MODELS": "same", "MINICHAT_BEDROCK_MODELS": "same"},
            "openai (OPENAI_* settings)",
            "bedrock (MINICHAT_BEDROCK_MODELS)",
        ),
        (
            {
                "MINICHAT_OPENAI_SERVERS": json.dumps(
                    [{"name": "a", "models": ["same"]}, {"name": "b", "models": ["other", "same"]}]
                )
            },
            "openai server 'a'",
            "openai server 'b'",
        ),
        ({"MINICHAT_BEDROCK_MODELS": "mock-echo"}, "bedrock (MINICHAT_BEDROCK_MODELS)", "mock"),
    ],
)
def test_a_model_id_served_twice_is_refused_naming_both_providers(
    env: dict[str, str], first: str, second: str
) -> None:
    settings = Settings.from_env({**env, "MINICHAT_BEDROCK_REGION": "us-east-1"})
    with pytest.raises(ConfigError) as caught:
        ProviderRegistry.from_settings(settings)
    message = str(caught.value)
    assert "served by two providers" in message
    assert f"{first} and {second}" in message, message


def test_known_limits_per_family_and_inference_profiles() -> None:
    assert known_limits("anthropic.claude-3-5-haiku-20241022-v1:0") == ModelLimits(200_000, 8_192)
    assert known_limits("us.anthropic.claude-3-5-haiku-20241022-v1:0") == ModelLimits(200_000, 8_192)
    assert known_limits("eu.amazon.nova-lite-v1:0") == ModelLimits(300_000, 10_000)
    assert known_limits("gpt-4o-mini") == ModelLimits(128_000, 16_384)
    assert known_limits("my-local-llama") is None


def test_limits_are_overridable_and_default_for_unknown_models() -> None:
    overrides = {"my-local-llama": (32_768, None), "gpt-4o": (None, 1_000)}
    assert limits_for("my-local-llama", overrides=overrides, default_context_tokens=16_000) == ModelLimits(
        32_768, 4096
    )
    assert limits_for("gpt-4o", overrides=overrides, default_context_tokens=16_000) == ModelLimits(
        128_000, 1_000
    )
    assert limits_for("other", overrides=overrides, default_context_tokens=8_000) == ModelLimits(8_000, 4096)


def test_model_limits_from_the_environment() -> None:
    env = {
        "OPENAI_API_KEY": "k",
        "MINICHAT_OPENAI_MODELS": "gpt-4o,local",
        "MINICHAT_MODEL_LIMITS": json.dumps({"local": {"contextTokens": 8192, "maxOutputTokens": 1024}}),
    }
    settings = Settings.from_env(env)
    assert settings.model_limits == (("local", 8192, 1024),) and hash(settings)
    registry = ProviderRegistry.from_settings(settings)
    assert registry.limits("local") == ModelLimits(8192, 1024)
    assert registry.list_models()[1] == {
        "id": "local",
        "provider": "openai",
        "contextTokens": 8192,
        "maxOutputTokens": 1024,
    }
    # The prompt gets the context less the room for the answer (never less than half the context).
    assert registry.prompt_tokens("local", max_tokens=None) == 8192 - 1024
    assert registry.prompt_tokens("local", max_tokens=100) == 8192 - 100
    assert registry.prompt_tokens("gpt-4o", max_tokens=None) == 128_000 - 16_384
    assert registry.prompt_tokens("gone-model", max_tokens=None) == 16_000 - 4096


@pytest.mark.parametrize(
    "raw",
    [
        '{"m": {"contextTokens": 10}}',
        '{"m": {"maxOutputTokens": "1"}}',
        '{"m": {"context": 1000}}',
        '{"m": {}}',
        "[1]",
    ],
)
def test_malformed_model_limits_are_refused(raw: str) -> None:
    with pytest.raises(ConfigError, match="MINICHAT_MODEL_LIMITS"):
        Settings.from_env({"MINICHAT_MODEL_LIMITS": raw})


def test_limits_for_a_model_nobody_serves_are_refused() -> None:
    settings = Settings.from_env({"MINICHAT_MODEL_LIMITS": '{"typo-model": {"contextTokens": 1000}}'})
    with pytest.raises(ConfigError, match="typo-model"):
        ProviderRegistry.from_settings(settings)


def test_converse_messages_alternate_and_start_with_the_user() -> None:
    messages = [
        ChatMessage("system", "be brief"),
        ChatMessage("assistant", "left over from trimming"),
        ChatMessage("user", "first"),
        ChatMessage("user", "second (the answer to first failed)"),
        ChatMessage("assistant", ""),
        ChatMessage("assistant", "an answer"),
        ChatMessage("user", "third"),
    ]
    system, turns = converse_messages(messages)
    assert system == [{"text": "be brief"}]
    assert turns == [
        {"role": "user", "content": [{"text": "first\n\nsecond (the answer to first failed)"}]},
        {"role": "assistant", "content": [{"text": "an answer"}]},
        {"role": "user", "content": [{"text": "third"}]},
    ]


def test_boto3_stays_off_the_path_that_only_lists_models() -> None:
    """The API function builds the registry to list and check models: Bedrock must not import boto3."""
    code = (
        "import sys\n"
        "from minichat.config import Settings\n"
        "from minichat.providers import ProviderRegistry\n"
        "m = 'anthropic.claude-3-5-haiku-20241022-v1:0'\n"
        "s = Settings(bedrock_models=(m,), bedrock_region='us-east-1')\n"
        "r = ProviderRegistry.from_settings(s)\n"
        "assert r.resolve(m).name == 'bedrock'\n"
        "assert r.list_models()[0]['contextTokens'] == 200000\n"
        "assert not {'boto3', 'botocore'} & set(sys.modules), 'imported too early'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_the_stream_function_builds_the_bedrock_transport_in_the_background() -> None:
    """preload (the stream function's cold start) must not wait for botocore (about a quarter second)."""
    code = (
        "import sys, time\n"
        "from minichat.config import Settings\n"
        "from minichat.providers import ProviderRegistry\n"
        "import minichat.providers.bedrock\n"
        "m = 'anthropic.claude-3-5-haiku-20241022-v1:0'\n"
        "s = Settings(bedrock_models=(m,), bedrock_region='us-east-1')\n"
        "began = time.perf_counter()\n"
        "r = ProviderRegistry.from_settings(s, preload=True)\n"
        "took = time.perf_counter() - began\n"
        "provider = r.resolve(m)\n"
        "transport = provider._warming.result(timeout=60)\n"
        "assert transport.region == 'us-east-1'\n"
        "assert transport.endpoint == 'https://bedrock-runtime.us-east-1.amazonaws.com'  # botocore's\n"
        "assert {'botocore', 'aiohttp'} <= set(sys.modules)\n"
        "print(f'{took * 1000:.1f}')\n"
    )
    env = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90, env=env)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < 100, result.stdout  # ms: no boto3 import on the caller's path
