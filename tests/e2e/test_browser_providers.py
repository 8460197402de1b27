"""The model picker shows each model's provider: OpenAI-compatible servers, Amazon Bedrock, the mocks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_support import answers, choose_model, register, send, serve_local_mode, wait_until_finished
from playwright.sync_api import expect

from minichat_local.bedrock_stub import BedrockStub
from minichat_local.openai_stub import OpenAIStub, serve_stub, stub_text


@pytest.fixture(scope="module")
def live_server(
    database_url: str, broker_vhost: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """Local mode serving a Bedrock stand-in's models and an OpenAI-compatible server's, beside the mocks."""
    with serve_stub(BedrockStub(), path="") as bedrock_url, serve_stub(OpenAIStub()) as openai_url:
        servers = [{"name": "local-vllm", "baseUrl": openai_url, "models": ["llama-local"]}]
        env = {
            "MINICHAT_OPENAI_SERVERS": json.dumps(servers),
            "MINICHAT_BEDROCK_MODELS": "stub-tokens-8-rate-40",
            "MINICHAT_BEDROCK_REGION": "us-east-1",
            "MINICHAT_BEDROCK_ENDPOINT_URL": bedrock_url,
            "AWS_ACCESS_KEY_ID": "AKIDTESTBEDROCK",
            "AWS_SECRET_ACCESS_KEY": "test-secret-not-real",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        log = tmp_path_factory.mktemp("e2e-providers") / "local-mode.log"
        with serve_local_mode(log, **env) as base_url:
            yield base_url


def test_the_model_picker_groups_models_by_provider(page: Any, artifacts: Path) -> None:
    register(page)
    groups = page.locator("#model-select optgroup")
    expect(groups).to_have_count(3)
    assert groups.evaluate_all("gs => gs.map(g => g.label)") == [
        "OpenAI-compatible",
        "Amazon Bedrock",
        "Built-in test models",
    ]
    bedrock = page.locator("#model-select optgroup[data-provider='bedrock'] option")
    expect(bedrock).to_have_text(["stub-tokens-8-rate-40"])
    expect(page.locator("#model-select optgroup[data-provider='openai'] option")).to_have_text(
        ["llama-local"]
    )
    expect(page.locator("#model-select optgroup[data-provider='mock'] option")).to_have_count(4)
    # The tooltip says the provider and the model's limits (GET /api/models).
    assert bedrock.get_attribute("title") == "Amazon Bedrock · 16k context, 4k max answer"

    choose_model(page, "stub-tokens-8-rate-40")
    send(page, "Hello Bedrock")
    wait_until_finished(page)
    expect(answers(page).locator(".msg-content")).to_have_text(stub_text(8))
    page.screenshot(path=str(artifacts / "model-picker-providers.png"))
