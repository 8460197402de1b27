"""The API function invoked as on Lambda: API Gateway REST proxy events (payload 1.0) into the app."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from helpers import Api
from minichat_local.functions import load_function

EVENTS = Path(__file__).resolve().parents[1] / "events"


def _event(
    *, method: str, resource: str, path: str, body: Any, token: str, params: dict[str, str]
) -> dict[str, Any]:
    event = copy.deepcopy(json.loads((EVENTS / "apigateway-rest-proxy-chat-message.json").read_text()))
    event.update(
        {
            "httpMethod": method,
            "resource": resource,
            "path": path,
            "pathParameters": params,
            "body": json.dumps(body),
        }
    )
    event["headers"]["Authorization"] = f"Bearer {token}"
    event["multiValueHeaders"]["Authorization"] = [f"Bearer {token}"]
    event["requestContext"].update({"httpMethod": method, "resourcePath": resource, "path": f"/dev{path}"})
    return event


def _create_event(chat_id: str, token: str) -> dict[str, Any]:
    """POST /api/chats/{chat_id}/generations as API Gateway's default host delivers it (stage dev)."""
    return _event(
        method="POST",
        resource="/api/chats/{chat_id}/generations",
        path=f"/api/chats/{chat_id}/generations",
        body={"content": "hi"},
        token=token,
        params={"chat_id": chat_id},
    )


def test_stream_url_carries_the_stage_behind_the_default_api_host(api: Api) -> None:
    user = api.register()
    chat = api.create_chat(user)
    event = _create_event(chat["id"], user.access)
    reply = load_function("api").app(event, None)
    assert reply["statusCode"] == 201, reply
    body = json.loads(reply["body"])
    assert body["streamUrl"].startswith(f"/dev/api/generations/{body['generationId']}/stream?ticket=")
    # Through local mode (no stage in the path) the same route answers a bare path.
    api.request("POST", f"/api/generations/{body['generationId']}/cancel", user=user)
    local = api.create_generation(user, chat["id"], content="x").json()
    assert local["streamUrl"].startswith("/api/generations/")
    api.request("POST", f"/api/generations/{local['generationId']}/cancel", user=user)


def test_stream_url_has_no_stage_through_cloudfronts_one_origin(api: Api) -> None:
    """CloudFront sends /api/* to the default host with the stage as its origin path, and marks the
    request (template.yaml, WebDistribution): the client's paths have no stage, so neither may streamUrl."""
    user = api.register()
    chat = api.create_chat(user)
    event = _create_event(chat["id"], user.access)
    event["headers"]["X-MiniChat-Origin"] = "cloudfront"
    event["multiValueHeaders"]["X-MiniChat-Origin"] = ["cloudfront"]
    reply = load_function("api").app(event, None)
    assert reply["statusCode"] == 201, reply
    body = json.loads(reply["body"])
    assert body["streamUrl"].startswith(f"/api/generations/{body['generationId']}/stream?ticket=")
    api.request("POST", f"/api/generations/{body['generationId']}/cancel", user=user)
