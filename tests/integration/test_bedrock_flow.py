"""Bedrock and several OpenAI-compatible servers through the whole of local mode (SPEC §7.2).

One local-mode process per module, configured with a Bedrock stand-in (the provider talks to it
through MINICHAT_BEDROCK_ENDPOINT_URL) and two OpenAI-compatible stubs listed in MINICHAT_OPENAI_SERVERS;
the tests create generations over HTTP and read their SSE streams as a client would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import Account, Api, EventStream, LocalProcess, assert_error, free_port, text_of
from minichat_local.bedrock_stub import BedrockStub, BedrockStubStats, prompt_tokens
from minichat_local.openai_stub import OpenAIStub, serve_stub, stub_text

BEDROCK_MODELS = (
    "stub-tokens-12",
    "stub-stall-after-1",
    "stub-stall-after-0",
    "stub-error-429",
    "stub-tokens-40-rate-20",
)
ALPHA_MODELS = ("alpha-chat",)
BETA_MODELS = ("beta-chat", "beta-tiny")
LIMITS = {"beta-tiny": {"contextTokens": 4096, "maxOutputTokens": 512}}
# The single OPENAI_* form (which an earlier test of the session may have set) is blanked: only the
# list form serves OpenAI-compatible models here.
NO_SINGLE_FORM = {"OPENAI_BASE_URL": "", "OPENAI_API_KEY": "", "MINICHAT_OPENAI_MODELS": ""}
AWS_TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "AKIDTESTBEDROCK",
    "AWS_SECRET_ACCESS_KEY": "test-secret-not-real",
    "AWS_SESSION_TOKEN": "",
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="module")
def world(
    database_url: str, broker_vhost: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """The stand-in, two OpenAI-compatible stubs and a local-mode process serving them all."""
    secrets = {AWS_TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"]: AWS_TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}
    bedrock, alpha, beta = BedrockStub(secrets=secrets), OpenAIStub(), OpenAIStub()
    with (
        serve_stub(bedrock, path="") as bedrock_url,
        serve_stub(alpha) as alpha_url,
        serve_stub(beta) as beta_url,
    ):
        servers = [
            {"name": "alpha", "baseUrl": alpha_url, "apiKey": "sk-alpha-test", "models": list(ALPHA_MODELS)},
            {"name": "beta", "baseUrl": beta_url, "models": list(BETA_MODELS)},
        ]
        env = {
            **NO_SINGLE_FORM,
            **AWS_TEST_CREDENTIALS,
            "MINICHAT_BEDROCK_MODELS": ",".join(BEDROCK_MODELS),
            "MINICHAT_BEDROCK_REGION": "us-east-1",
            "MINICHAT_BEDROCK_ENDPOINT_URL": bedrock_url,
            "MINICHAT_OPENAI_SERVERS": json.dumps(servers),
            "MINICHAT_MODEL_LIMITS": json.dumps(LIMITS),
            "MINICHAT_DEFAULT_MODEL": "mock-echo",
        }
        process = LocalProcess(free_port(), tmp_path_factory.mktemp("bedrock") / "local.log", **env)
        try:
            process.start()
            yield {"process": process, "bedrock": bedrock, "alpha": alpha, "beta": beta}
        finally:
            process.stop()
            print(process.log())


@pytest.fixture
def api(world: dict[str, Any], db: Any, redis_client: Any) -> Iterator[Api]:
    client = Api(world["process"].base_url)
    yield client
    client.http.close()


@pytest.fixture
def bedrock(world: dict[str, Any]) -> BedrockStub:
    stub: BedrockStub = world["bedrock"]
    stub.stats = BedrockStubStats()
    return stub


def _run_to_end(api: Api, user: Account, content: str, **body: Any) -> tuple[dict[str, Any], list[Any]]:
    started = api.generate(user, until_done=True, content=content, **body)
    return started, started.pop("events")


def test_bedrock_text_and_usage_are_exact(api: Api, bedrock: BedrockStub) -> None:
    user = api.register()
    started, events = _run_to_end(
        api, user, "hello bedrock", model="stub-tokens-12", systemPrompt="be brief", temperature=1.5
    )
    assert text_of(events) == stub_text(12)
    sent = bedrock.stats.last_request
    assert bedrock.stats.last_model == "stub-tokens-12"
    assert sent["system"] == [{"text": "be brief"}]
    assert sent["messages"] == [{"role": "user", "content": [{"text": "hello bedrock"}]}]
    assert sent["inferenceConfig"] == {"temperature": 1.0}  # Bedrock models take 0-1
    assert (bedrock.stats.last_authorization or "").startswith("AWS4-HMAC-SHA256 Credential=AKIDTESTBEDROCK/")
    # The stand-in checked the SigV4 signature as AWS does.
    assert bedrock.stats.signatures_checked >= 1 and bedrock.stats.signature_errors == []
    usage = [e for _, e in events if e["type"] == "usage"]
    assert usage == [
        {"type": "usage", "inputTokens": prompt_tokens(sent), "outputTokens": 12, "estimated": False}
    ]
    assert events[-1][1] == {"type": "done", "status": "succeeded"}
    generation = api.generation(user, started["generationId"])
    assert (generation["inputTokens"], generation["outputTokens"]) == (prompt_tokens(sent), 12)
    assert generation["model"] == "stub-tokens-12" and generation["status"] == "succeeded"


def test_bedrock_max_tokens_cuts_the_answer(api: Api, bedrock: BedrockStub) -> None:
    user = api.register()
    _, events = _run_to_end(api, user, "long please", model="stub-tokens-12", maxTokens=5)
    assert text_of(events) == stub_text(5)
    assert bedrock.stats.last_request["inferenceConfig"] == {"maxTokens": 5}
    assert [e["outputTokens"] for _, e in events if e["type"] == "usage"] == [5]


def test_cancel_while_bedrock_is_silent_closes_the_upstream_within_250_ms(
    api: Api, bedrock: BedrockStub
) -> None:
    user = api.register()
    started = api.generate(user, content="stall please", model="stub-stall-after-1")
    stream = EventStream(api.http, started["streamUrl"])
    try:
        assert stream.next()[1] == {"type": "delta", "delta": "w0"}
        time.sleep(0.3)  # Bedrock is silent now; the stream waits in its read
        assert bedrock.stats.active == 1 and bedrock.stats.disconnected == 0
        asked = time.monotonic()
        r = api.request("POST", f"/api/generations/{started['generationId']}/cancel", user=user)
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 3
        while not bedrock.stats.disconnects_after(asked) and time.monotonic() < deadline:
            time.sleep(0.002)
        closed = bedrock.stats.disconnects_after(asked)
        assert closed, "the stand-in never saw the connection close"
        print(f"cancel → Bedrock connection closed in {closed[0] * 1000:.1f} ms")
        assert closed[0] < 0.25
        events = stream.until_done()
    finally:
        stream.close()
    assert events[-1][1] == {"type": "done", "status": "canceled"}
    assert bedrock.stats.disconnected == 1 and bedrock.stats.active == 0
    assert api.generation(user, started["generationId"])["status"] == "canceled"


def test_throttling_is_a_provider_error_and_the_next_generation_starts(
    api: Api, bedrock: BedrockStub
) -> None:
    user = api.register()
    started, events = _run_to_end(api, user, "busy?", model="stub-error-429")
    errors = [e for _, e in events if e["type"] == "error"]
    assert len(errors) == 1 and errors[0]["code"] == "provider_error"
    assert "throttling" in errors[0]["message"] and "stub-upstream-error-body" not in errors[0]["message"]
    assert events[-1][1] == {"type": "done", "status": "failed"}
    generation = api.generation(user, started["generationId"])
    assert generation["errorCode"] == "provider_error"
    # `done` came after the lock release: the user's next generation starts at once.
    _, events = _run_to_end(api, user, "again", model="stub-tokens-12")
    assert events[-1][1] == {"type": "done", "status": "succeeded"}


@pytest.mark.slow
def test_bedrock_silence_past_the_timeouts_is_provider_timeout(api: Api, bedrock: BedrockStub) -> None:
    # tests/conftest.py: first-token timeout 3 s, idle timeout 2 s.
    user = api.register()
    for model, text, low in (("stub-stall-after-0", "", 2.9), ("stub-stall-after-1", "w0", 1.9)):
        began = time.monotonic()
        _, events = _run_to_end(api, user, "wait", model=model)
        took = time.monotonic() - began
        assert text_of(events) == text
        errors = [e for _, e in events if e["type"] == "error"]
        assert [e["code"] for e in errors] == ["provider_timeout"], events
        assert events[-1][1] == {"type": "done", "status": "failed"}
        assert low < took < low + 3, took
    assert bedrock.stats.disconnected == 2 and bedrock.stats.active == 0


def test_models_lists_every_provider_with_its_limits(api: Api) -> None:
    user = api.register()
    r = api.request("GET", "/api/models", user=user)
    assert r.status_code == 200, r.text
    items = {m["id"]: m for m in r.json()["items"]}
    assert list(items) == [*ALPHA_MODELS, *BETA_MODELS, *BEDROCK_MODELS, "mock-echo", "mock-slow",
                           "mock-stall", "mock-error"]  # fmt: skip
    for item in items.values():
        assert set(item) == {"id", "provider", "contextTokens", "maxOutputTokens"}
        assert 0 < item["maxOutputTokens"] <= item["contextTokens"]
    assert {items[m]["provider"] for m in (*ALPHA_MODELS, *BETA_MODELS)} == {"openai"}
    assert {items[m]["provider"] for m in BEDROCK_MODELS} == {"bedrock"}
    assert items["beta-tiny"] == {
        "id": "beta-tiny",
        "provider": "openai",
        "contextTokens": 4096,
        "maxOutputTokens": 512,
    }
    assert items["mock-echo"]["provider"] == "mock"


def test_two_openai_servers_and_bedrock_each_serve_their_own_models(
    api: Api, world: dict[str, Any], bedrock: BedrockStub
) -> None:
    alpha, beta = world["alpha"], world["beta"]
    before = (alpha.stats.requests, beta.stats.requests)
    user = api.register()
    for model in ("alpha-chat", "beta-chat", "stub-tokens-12"):
        _, events = _run_to_end(api, user, f"hi {model}", model=model)
        assert events[-1][1] == {"type": "done", "status": "succeeded"}, events
        assert text_of(events) == stub_text(20 if model != "stub-tokens-12" else 12)
    assert (alpha.stats.requests, beta.stats.requests) == (before[0] + 1, before[1] + 1)
    assert alpha.stats.last_request["model"] == "alpha-chat"
    assert alpha.stats.last_authorization == "Bearer sk-alpha-test"
    assert beta.stats.last_request["model"] == "beta-chat"
    assert bedrock.stats.requests == 1 and bedrock.stats.last_model == "stub-tokens-12"


def test_prompt_trimming_uses_the_models_own_context(api: Api, world: dict[str, Any]) -> None:
    # beta-tiny: 4,096 tokens of context, 512 kept for the answer. A chat longer than that reaches it
    # trimmed (oldest first); a model with the default 16,000 would have taken it whole.
    beta = world["beta"]
    user = api.register()
    chat = api.create_chat(user)
    for index in range(4):
        r = api.request(
            "POST", f"/api/chats/{chat['id']}/messages", user=user, json={"content": f"{index} " + "x" * 4000}
        )
        assert r.status_code == 201, r.text
    created = api.generate(user, chat["id"], until_done=True, content="last", model="beta-tiny")
    assert created["events"][-1][1]["status"] == "succeeded"
    sent = beta.stats.last_request["messages"]
    assert sent[-1] == {"role": "user", "content": "last"}
    assert [m["content"][:2] for m in sent[:-1]] == ["1 ", "2 ", "3 "]  # 0 did not fit


def test_an_unknown_model_is_refused(api: Api) -> None:
    user = api.register()
    chat = api.create_chat(user)
    r = api.create_generation(user, chat["id"], content="x", model="gpt-nope")
    assert_error(r, 400, "unknown_model")


def test_a_model_served_twice_is_refused_at_start_naming_both(tmp_path: Path, database_url: str) -> None:
    servers = [{"name": "vllm", "baseUrl": "http://127.0.0.1:9/v1", "models": ["shared-model"]}]
    env = dict(
        os.environ,
        **NO_SINGLE_FORM,
        **AWS_TEST_CREDENTIALS,
        MINICHAT_OPENAI_SERVERS=json.dumps(servers),
        MINICHAT_BEDROCK_MODELS="shared-model",
        MINICHAT_BEDROCK_REGION="us-east-1",
        MINICHAT_DEFAULT_MODEL="",
    )
    result = subprocess.run(
        [sys.executable, "-m", "minichat_local", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "configuration error" in result.stderr
    assert "'shared-model'" in result.stderr
    assert "openai server 'vllm'" in result.stderr and "bedrock" in result.stderr
