"""Builds functions/api/chalicelib/openapi.json: the OpenAPI 3.1 description of the whole API.

    python infra/build_openapi.py           # (re)write the file
    python infra/build_openapi.py --check   # exit 1 when the file is not what this script builds

The request bodies and the parameters' schemas come from the specs that check them (the API's body specs
in functions/api/app.py, the parameter specs of minichat.validate), so the documented bounds are the
checked ones; the error codes come from minichat.errors. The file is
packaged with the API function and served at GET /api/openapi.json, where `ModelId` also gets the
deployment's models as its `enum`. tests/integration/test_openapi.py keeps the file equal to this
script's output and its operations equal to the routes (the Chalice app's and the stream function's).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "functions" / "api" / "chalicelib" / "openapi.json"

Schema = dict[str, Any]
E = TypeVar("E")


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def obj(properties: dict[str, Schema], *, required: list[str] | None = None, **extra: Any) -> Schema:
    """A closed object: every property documented is required unless said otherwise, no others allowed."""
    return {
        "type": "object",
        "additionalProperties": False,
        "required": list(properties) if required is None else required,
        "properties": properties,
        **extra,
    }


def json_body(schema: Schema) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


UUID: Schema = {"type": "string", "format": "uuid"}
TIMESTAMP: Schema = {"type": "string", "format": "date-time", "description": "ISO-8601 UTC with a `Z`."}
TOKENS: Schema = {"type": "integer", "minimum": 0}

INFO_DESCRIPTION = """\
MiniChat: a ChatGPT-like backend. JSON in and out, camelCase fields, UUID ids, ISO-8601 UTC times (`Z`).

Conventions every operation follows:

- `Authorization: Bearer <accessToken>` on everything except register, login, refresh, health and this
  document. The stream also takes the signed `?ticket=` of its `streamUrl` (an `EventSource` cannot send
  headers).
- A request body is parsed as JSON whatever its `Content-Type` says; it must be a JSON object of at
  most 256 KiB (`413 payload_too_large`, also for chunked bodies) nested at most 32 levels deep.
- Unknown fields are refused with `400 validation_error` whose `field` names the field: fields a client
  may not set (`userId`, `status`, a `role`, ...) are never silently applied. Optional fields may be
  `null`, which means absent. Text fields never contain NUL characters.
- A path id that is not a UUID answers `404 not_found`, exactly like a missing id or another user's.
- A wrong method on a known path answers `405 method_not_allowed` with `Allow`; an unknown path
  `404 not_found`.
- Every response carries `X-Request-Id`: the incoming one when it is 1-128 characters of
  `A-Za-z0-9._-`, else a new one. Errors are `{"error": {"code", "message", "requestId", ...}}` (plus
  `field`, `generationId` or `retryAfter` where they apply), never a stack trace.
- Rate limits answer `429 rate_limited` with `Retry-After`; limited operations send `X-RateLimit-Limit`,
  `X-RateLimit-Remaining` and `X-RateLimit-Reset` on every reply.
- `Idempotency-Key` on the three creating POSTs: the same key from the same user within 24 h returns the
  first response (with `Idempotent-Replayed: true`) and creates nothing new; the same key with another
  body is `409 idempotency_key_reused`.
- Lists take `?limit=` (1-200, default 50) and the opaque `?cursor=` of a previous page's `nextCursor`.
"""

STREAM_DESCRIPTION = """\
Server-Sent Events. Every event is `id: <n>` (1, 2, 3, ... per generation) and one `data:` line of JSON
(`StreamEvent`). Sequences: succeeded = delta* usage done; canceled = delta* usage done; failed = delta*
error usage? done. `done` is always the last event and goes out only once the terminal state, the
assistant message, the token counts and the lock release are committed. A comment line (`: ping`) goes
out at least every 15 s while the stream is idle.

The first connection starts the model call; closing it does not stop the generation (only cancel does).
Any number of connections may follow one generation. `Last-Event-ID` (header, or `?lastEventId=`)
resumes after that event with no loss and no duplicates. A stream opened after the end replays the whole
sequence; once its buffer has expired (at least 1 h after the end) it is rebuilt from the database as
one delta, usage and done, numbered from 1, and `Last-Event-ID` is ignored.
"""


def build() -> dict[str, Any]:
    from minichat import chats, errors, validate
    from minichat_local.functions import load_function

    api = load_function("api")

    codes = sorted({cls.code for cls in _subclasses(errors.MiniChatError)} | {errors.MiniChatError.code})

    def body_schema(spec: validate.Body) -> Schema:
        return spec.json_schema()

    generation_create = body_schema(api.NEW_GENERATION)
    model_spec = api.NEW_GENERATION.fields["model"]
    assert isinstance(model_spec, validate.Text)
    model_description = generation_create["properties"]["model"].get("description", "")
    generation_create["properties"]["model"] = {**nullable(ref("ModelId")), "description": model_description}

    schemas: dict[str, Schema] = {
        # --- requests
        "Credentials": body_schema(api.CREDENTIALS),
        "RefreshTokenRequest": body_schema(api.REFRESH_TOKEN),
        "AccountDeletion": body_schema(api.ACCOUNT_DELETION),
        "ChatCreate": body_schema(api.NEW_CHAT),
        "ChatUpdate": body_schema(api.CHAT_UPDATE),
        "MessageCreate": body_schema(api.NEW_MESSAGE),
        "GenerationCreate": generation_create,
        "ModelId": {
            "type": "string",
            "minLength": model_spec.min_len,
            "maxLength": model_spec.max_len,
            "description": "A model id from GET /api/models. The served document lists this deployment's "
            "models as the `enum`; any other id is `400 unknown_model`.",
        },
        # --- responses
        "User": obj({"id": UUID, "email": {"type": "string"}, "createdAt": TIMESTAMP}),
        "Auth": obj(
            {
                "user": ref("User"),
                "accessToken": {"type": "string", "description": "A JWT (HS256), valid `expiresIn` seconds."},
                "refreshToken": {
                    "type": "string",
                    "description": "Opaque; rotated on every refresh. Presenting a rotated one again revokes "
                    "its whole family (unless it was rotated less than 10 s ago).",
                },
                "tokenType": {"const": "Bearer"},
                "expiresIn": {"type": "integer", "minimum": 1},
            }
        ),
        "Chat": obj(
            {
                "id": UUID,
                "title": {
                    "type": ["string", "null"],
                    "maxLength": api.TITLE.max_len,
                    "description": "null until the first user message names a chat created without one.",
                },
                "createdAt": TIMESTAMP,
                "updatedAt": TIMESTAMP,
                "activeLeafId": {
                    **nullable(UUID),
                    "description": "The last message of the branch the chat shows (null while it is empty). "
                    "A create moves it to the new user message (to the parent, for a regenerate); the "
                    "end of the generation to the new answer.",
                },
            }
        ),
        "ChatList": obj(
            {"items": {"type": "array", "items": ref("Chat")}, "nextCursor": ref("Cursor")},
            description="Newest `updatedAt` first.",
        ),
        "Message": obj(
            {
                "id": UUID,
                "chatId": UUID,
                "parentId": {
                    **nullable(UUID),
                    "description": "The message this one follows; null at the root of a branch.",
                },
                "role": {"enum": ["user", "assistant", "system"]},
                "content": {"type": "string"},
                "generationId": {
                    **nullable(UUID),
                    "description": "The generation an assistant message came from.",
                },
                "createdAt": TIMESTAMP,
                "siblingIds": {
                    "type": "array",
                    "items": UUID,
                    "minItems": 1,
                    "description": "The messages sharing its parent and role, itself included, oldest "
                    "first: the versions a client can switch between (`2 / 3`).",
                },
            }
        ),
        "MessageList": obj(
            {"items": {"type": "array", "items": ref("Message")}, "nextCursor": ref("Cursor")},
            description="One path of the chat's tree, root first; stable while a generation appends.",
        ),
        "Cursor": {
            "type": ["string", "null"],
            "description": "Pass as `?cursor=` for the next page; null on the last page.",
        },
        "GenerationStatus": {
            "enum": ["queued", "streaming", "succeeded", "canceled", "failed"],
            "description": "queued → streaming → succeeded; queued|streaming → canceled | failed. "
            "Terminal states never change again.",
        },
        "Generation": obj(
            {
                "id": UUID,
                "chatId": UUID,
                "status": ref("GenerationStatus"),
                "model": {"type": "string"},
                "systemPrompt": {"type": ["string", "null"]},
                "temperature": {"type": ["number", "null"]},
                "maxTokens": {"type": ["integer", "null"]},
                "inputTokens": TOKENS,
                "outputTokens": TOKENS,
                "createdAt": TIMESTAMP,
                "startedAt": nullable(TIMESTAMP),
                "finishedAt": nullable(TIMESTAMP),
                "errorCode": nullable(ref("ErrorCode")),
                "errorMessage": {"type": ["string", "null"]},
                "requestId": {
                    "type": ["string", "null"],
                    "description": "The X-Request-Id of the request that created it.",
                },
                "finishReason": {
                    "enum": ["stop", "length", None],
                    "description": "Why the model ended: `stop` (it finished), `length` (maxTokens or the "
                    "200,000-character bound reached); null unless the generation succeeded.",
                },
            }
        ),
        "GenerationCreated": obj(
            {
                "generationId": UUID,
                "generation": ref("Generation"),
                "streamUrl": {
                    "type": "string",
                    "description": "A same-origin path to the stream carrying a signed `?ticket=` that opens "
                    "this one stream (valid until 10 minutes after the generation ends).",
                },
            }
        ),
        "Model": obj(
            {
                "id": {
                    "type": "string",
                    "description": "The id to pass as `model` when creating a generation.",
                },
                "provider": {
                    "type": "string",
                    "enum": ["openai", "bedrock", "mock"],
                    "description": "`openai`: any OpenAI-compatible server; `bedrock`: Amazon Bedrock "
                    "(ConverseStream); `mock`: the built-in test models.",
                },
                "contextTokens": {
                    "type": "integer",
                    "minimum": 1,
                    "description": "The model's context window (prompt and answer). Older turns of a chat "
                    "are left out of the prompt once it would not fit.",
                },
                "maxOutputTokens": {
                    "type": "integer",
                    "minimum": 1,
                    "description": "The longest answer the model writes (its `maxTokens` at most).",
                },
            }
        ),
        "ModelList": obj({"items": {"type": "array", "items": ref("Model")}}),
        "UsageTokens": obj({"inputTokens": TOKENS, "outputTokens": TOKENS}),
        "UsageDay": obj(
            {"day": {"type": "string", "format": "date"}, "inputTokens": TOKENS, "outputTokens": TOKENS}
        ),
        "Budget": obj(
            {"dailyTokens": {"type": "integer", "minimum": 1}, "usedToday": TOKENS, "remainingToday": TOKENS},
            description="The per-user daily token budget (UTC day); creates answer `429 quota_exceeded` "
            "once it is used up.",
        ),
        "Usage": obj(
            {
                "days": {
                    "type": "array",
                    "items": ref("UsageDay"),
                    "description": "Every UTC day of the range, oldest first, days without usage included.",
                },
                "totals": ref("UsageTokens"),
                "budget": {**nullable(ref("Budget")), "description": "null when no budget is configured."},
            }
        ),
        "Health": obj(
            {
                "status": {"enum": ["ok", "degraded"]},
                "checks": obj(
                    {name: {"enum": ["ok", "unavailable"]} for name in ("database", "redis", "broker")}
                ),
            }
        ),
        "ErrorCode": {"enum": codes},
        "Error": obj(
            {
                "code": ref("ErrorCode"),
                "message": {"type": "string", "minLength": 1},
                "requestId": {"type": "string"},
                "field": {"type": "string", "description": "The offending field or parameter (400)."},
                "generationId": {
                    "type": "string",
                    "description": "The running generation (409 generation_in_flight).",
                },
                "retryAfter": {"type": "integer", "minimum": 0, "description": "Seconds (429 rate_limited)."},
            },
            required=["code", "message", "requestId"],
        ),
        "ErrorEnvelope": obj({"error": ref("Error")}),
        # --- the stream (SPEC §3)
        "DeltaEvent": obj({"type": {"const": "delta"}, "delta": {"type": "string"}}),
        "UsageEvent": obj(
            {
                "type": {"const": "usage"},
                "inputTokens": TOKENS,
                "outputTokens": TOKENS,
                "estimated": {
                    "type": "boolean",
                    "description": "true when the provider could not report usage (cancel, failure).",
                },
            }
        ),
        "ErrorEvent": obj(
            {"type": {"const": "error"}, "code": ref("ErrorCode"), "message": {"type": "string"}}
        ),
        "DoneEvent": obj(
            {"type": {"const": "done"}, "status": {"enum": ["succeeded", "canceled", "failed"]}},
            description="Always the last event.",
        ),
        "StreamEvent": {
            "oneOf": [ref("DeltaEvent"), ref("UsageEvent"), ref("ErrorEvent"), ref("DoneEvent")],
            "discriminator": {
                "propertyName": "type",
                "mapping": {
                    "delta": "#/components/schemas/DeltaEvent",
                    "usage": "#/components/schemas/UsageEvent",
                    "error": "#/components/schemas/ErrorEvent",
                    "done": "#/components/schemas/DoneEvent",
                },
            },
            "description": "The JSON of one event's `data:` line.",
        },
        "ServerSentEvent": obj(
            {
                "id": {"type": "string", "pattern": "^[1-9][0-9]*$"},
                "event": {"const": "message", "description": "No `event:` line is sent."},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": ref("StreamEvent"),
                },
            },
            required=["id", "data"],
            description="One event of the stream as an EventSource sees it (OpenAPI 3.1: the schema of a "
            "`text/event-stream` response describes each event).",
        ),
    }

    headers: dict[str, Any] = {
        "X-Request-Id": {
            "description": "The request's id (echoed when the client sent a valid one).",
            "required": True,
            "schema": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,128}$"},
        },
        "X-RateLimit-Limit": {
            "description": "Requests allowed per window by the tightest limit this request counted against.",
            "schema": {"type": "integer", "minimum": 1},
        },
        "X-RateLimit-Remaining": {
            "description": "Requests left in the window.",
            "schema": {"type": "integer", "minimum": 0},
        },
        "X-RateLimit-Reset": {
            "description": "Seconds until the limit is fully replenished.",
            "schema": {"type": "integer", "minimum": 0},
        },
        "Retry-After": {
            "description": "Seconds to wait before retrying (always on `rate_limited`).",
            "schema": {"type": "integer", "minimum": 0},
        },
        "WWW-Authenticate": {
            "description": '`Bearer realm="minichat"`.',
            "required": True,
            "schema": {"type": "string"},
        },
        "Idempotent-Replayed": {
            "description": "`true` when this is the stored first response to the same Idempotency-Key.",
            "schema": {"const": "true"},
        },
        "Cache-Control": {"schema": {"type": "string"}, "required": True},
    }

    def hdr(name: str) -> Schema:
        return {"$ref": f"#/components/headers/{name}"}

    rate_headers = {
        name: hdr(name) for name in ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")
    }

    def response(
        description: str,
        schema: Schema | None = None,
        *,
        extra_headers: dict[str, Schema] | None = None,
        media_type: str = "application/json",
    ) -> dict[str, Any]:
        out: dict[str, Any] = {
            "description": description,
            "headers": {"X-Request-Id": hdr("X-Request-Id"), **(extra_headers or {})},
        }
        if schema is not None:
            out["content"] = {media_type: {"schema": schema}}
        return out

    def error(
        description: str, error_codes: list[str], *, extra_headers: dict[str, Schema] | None = None
    ) -> dict[str, Any]:
        narrowed = {
            "allOf": [
                ref("ErrorEnvelope"),
                {"properties": {"error": {"properties": {"code": {"enum": error_codes}}}}},
            ]
        }
        listing = ", ".join(f"`{code}`" for code in error_codes)
        return response(f"{description} ({listing})", narrowed, extra_headers=extra_headers)

    responses: dict[str, Any] = {
        "BadRequest": error("The request is not valid", ["validation_error", "invalid_json"]),
        "BadQuery": error("A query parameter is not valid", ["validation_error"]),
        "Unauthorized": error(
            "Missing, malformed, expired or forged access token",
            ["unauthorized", "invalid_token"],
            extra_headers={"WWW-Authenticate": hdr("WWW-Authenticate")},
        ),
        "NotFound": error(
            "No such resource of this user's (a non-UUID id, a missing one and another user's alike)",
            ["not_found"],
        ),
        "PayloadTooLarge": error("The body is larger than 256 KiB", ["payload_too_large"]),
        "RateLimited": error(
            "Too many requests",
            ["rate_limited"],
            extra_headers={"Retry-After": hdr("Retry-After"), **rate_headers},
        ),
        "IdempotencyKeyReused": error(
            "The Idempotency-Key was used with another request, or its first request is still running",
            ["idempotency_key_reused"],
        ),
        "ServiceUnavailable": error(
            "A backing service is unavailable; retry shortly",
            ["service_unavailable"],
            extra_headers={"Retry-After": hdr("Retry-After")},
        ),
    }

    def r(name: str) -> dict[str, str]:
        return {"$ref": f"#/components/responses/{name}"}

    parameters: dict[str, Any] = {
        "ChatId": {"name": "chat_id", "in": "path", "required": True, "schema": validate.ID.json_schema()},
        "GenerationId": {
            "name": "generation_id",
            "in": "path",
            "required": True,
            "schema": validate.ID.json_schema(),
        },
        "LeafId": {
            "name": "leafId",
            "in": "query",
            "description": "List the path to this message of the chat instead of the active one (any other "
            "id, or one that is not a UUID, is `404`).",
            "schema": validate.ID.json_schema(),
        },
        "Limit": {
            "name": "limit",
            "in": "query",
            "description": "Page size.",
            "schema": validate.LIMIT.json_schema(),
        },
        "Cursor": {
            "name": "cursor",
            "in": "query",
            "description": "The `nextCursor` of the previous page (opaque; empty: the first page). Any value "
            "of this shape names a position in the list; anything else is `400`.",
            "schema": validate.Cursor(chats.MESSAGES_CURSOR_SIZE).json_schema(),
        },
        "ChatsCursor": {
            "name": "cursor",
            "in": "query",
            "description": "The `nextCursor` of the previous page (opaque; empty: the first page). Any value "
            "of this shape names a position in the list; anything else is `400`.",
            "schema": validate.Cursor(chats.CHATS_CURSOR_SIZE).json_schema(),
        },
        "IdempotencyKey": {
            "name": "Idempotency-Key",
            "in": "header",
            "description": f"1-{validate.IDEMPOTENCY_KEY.max_len} printable ASCII characters; see the "
            "conventions above.",
            "schema": validate.IDEMPOTENCY_KEY.json_schema(),
        },
        "RequestId": {
            "name": "X-Request-Id",
            "in": "header",
            "description": "Echoed in the reply's X-Request-Id when it is 1-128 characters of "
            "`A-Za-z0-9._-`; otherwise a new id is made (never an error).",
            "schema": {"type": "string"},
        },
        "From": {
            "name": "from",
            "in": "query",
            "description": "First UTC day (default: 29 days before `to`). A reply covers at most 366 days: "
            "an earlier `from` reads as 365 days before `to`. A `from` after `to` is an empty range (no "
            "days, zero totals).",
            "schema": validate.Day("from").json_schema(),
        },
        "To": {
            "name": "to",
            "in": "query",
            "description": "Last UTC day (default: today).",
            "schema": validate.Day("to").json_schema(),
        },
        "LastEventIdHeader": {
            "name": "Last-Event-ID",
            "in": "header",
            "description": "Resume after this event number (anything but a number is ignored).",
            "schema": {"type": "string"},
        },
        "LastEventIdQuery": {
            "name": "lastEventId",
            "in": "query",
            "description": "The same as the Last-Event-ID header, for clients that cannot send headers.",
            "schema": {"type": "string"},
        },
    }

    def p(name: str) -> dict[str, str]:
        return {"$ref": f"#/components/parameters/{name}"}

    public: list[dict[str, list[str]]] = []

    def operation(
        operation_id: str,
        summary: str,
        tag: str,
        responses_: dict[str, Any],
        *,
        description: str | None = None,
        body: str | None = None,
        body_required: bool = True,
        params: list[str] | None = None,
        security: list[dict[str, list[str]]] | None = None,
    ) -> dict[str, Any]:
        op: dict[str, Any] = {"operationId": operation_id, "summary": summary, "tags": [tag]}
        if description:
            op["description"] = description
        op["parameters"] = [p(name) for name in (params or [])] + [p("RequestId")]
        if body is not None:
            op["requestBody"] = {"required": body_required, "content": json_body(ref(body))}
        if security is not None:
            op["security"] = security
        op["responses"] = responses_
        return op

    def link(operation_id: str, parameters_: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"operationId": operation_id}
        if parameters_:
            out["parameters"] = parameters_
        out.update(extra)
        return out

    chat_links = {
        name: link(name, {"chat_id": "$response.body#/id"})
        for name in ("getChat", "renameChat", "deleteChat", "listMessages", "addMessage", "createGeneration")
    }
    generation_links = {
        name: link(name, {"generation_id": "$response.body#/generationId"})
        for name in ("getGeneration", "cancelGeneration", "streamGeneration")
    }
    refresh_link = {
        "refresh": link("refresh", requestBody={"refreshToken": "$response.body#/refreshToken"}),
    }

    def ok(status: str, description: str, schema: Schema | None, **kwargs: Any) -> dict[str, Any]:
        return {status: response(description, schema, **kwargs)}

    authed = {"401": r("Unauthorized"), "429": r("RateLimited"), "503": r("ServiceUnavailable")}
    with_body = {"400": r("BadRequest"), "413": r("PayloadTooLarge")}

    def limited(description: str, schema: Schema | None, **kwargs: Any) -> dict[str, Any]:
        extra = {**rate_headers, **kwargs.pop("extra_headers", {})}
        return response(description, schema, extra_headers=extra, **kwargs)

    paths: dict[str, Any] = {
        "/api/auth/register": {
            "post": operation(
                "register",
                "Create an account and sign in",
                "auth",
                {
                    "201": {**limited("Signed up", ref("Auth")), "links": refresh_link},
                    **with_body,
                    "409": error("An account with this email exists (in any letter case)", ["email_taken"]),
                    "429": r("RateLimited"),
                    "503": r("ServiceUnavailable"),
                },
                body="Credentials",
                security=public,
            )
        },
        "/api/auth/login": {
            "post": operation(
                "login",
                "Sign in: a new refresh-token family",
                "auth",
                {
                    "200": {**limited("Signed in", ref("Auth")), "links": refresh_link},
                    **with_body,
                    "401": error("Wrong email or password", ["invalid_credentials"]),
                    "429": r("RateLimited"),
                    "503": r("ServiceUnavailable"),
                },
                description="Every attempt counts per client IP, failed ones per email and client IP "
                "(failures from other addresses never refuse the owner's login); both are checked before the "
                "password hash is computed.",
                body="Credentials",
                security=public,
            )
        },
        "/api/auth/refresh": {
            "post": operation(
                "refresh",
                "Rotate a refresh token",
                "auth",
                {
                    "200": {**response("A new token pair", ref("Auth")), "links": refresh_link},
                    **with_body,
                    "401": error(
                        "Unknown, expired, revoked or already rotated refresh token",
                        ["invalid_token"],
                        extra_headers={"WWW-Authenticate": hdr("WWW-Authenticate")},
                    ),
                    "503": r("ServiceUnavailable"),
                },
                body="RefreshTokenRequest",
                security=public,
            )
        },
        "/api/auth/logout": {
            "post": operation(
                "logout",
                "Revoke a refresh token's family",
                "auth",
                {
                    "204": limited("Signed out (an unknown or foreign token changes nothing)", None),
                    **with_body,
                    **authed,
                },
                body="RefreshTokenRequest",
            )
        },
        "/api/auth/me": {
            "get": operation(
                "me",
                "The signed-in user",
                "auth",
                {**ok("200", "The user", ref("User"), extra_headers=rate_headers), **authed},
            ),
            "delete": operation(
                "deleteAccount",
                "Delete the account",
                "auth",
                {
                    "204": limited("Deleted", None),
                    **with_body,
                    **authed,
                    "401": error(
                        "Missing, malformed, expired or forged access token, or the wrong password",
                        ["unauthorized", "invalid_token", "invalid_credentials"],
                    ),
                },
                description="Needs the account's password. A running generation is ended first; the "
                "user's chats, messages, generations and tokens are deleted; usage and audit records stay, "
                "keyed by the id alone. Afterwards every token of the account answers `401 invalid_token`. "
                "Wrong passwords are limited like failed logins.",
                body="AccountDeletion",
            ),
        },
        "/api/chats": {
            "get": operation(
                "listChats",
                "The user's chats",
                "chats",
                {"200": limited("A page of chats", ref("ChatList")), "400": r("BadQuery"), **authed},
                params=["Limit", "ChatsCursor"],
            ),
            "post": operation(
                "createChat",
                "Create a chat",
                "chats",
                {
                    "201": {
                        **limited(
                            "The chat",
                            ref("Chat"),
                            extra_headers={"Idempotent-Replayed": hdr("Idempotent-Replayed")},
                        ),
                        "links": chat_links,
                    },
                    **with_body,
                    "409": r("IdempotencyKeyReused"),
                    **authed,
                },
                description="No body, or `{}`, makes an untitled chat: its first user message names it.",
                body="ChatCreate",
                body_required=False,
                params=["IdempotencyKey"],
            ),
        },
        "/api/chats/{chat_id}": {
            "parameters": [p("ChatId")],
            "get": operation(
                "getChat",
                "A chat",
                "chats",
                {"200": limited("The chat", ref("Chat")), "404": r("NotFound"), **authed},
            ),
            "patch": operation(
                "renameChat",
                "Rename a chat, or switch its branch",
                "chats",
                {
                    "200": limited("The chat", ref("Chat")),
                    **with_body,
                    "404": r("NotFound"),
                    **authed,
                },
                description="`title` renames (and bumps `updatedAt`). `activeLeafId` switches branches: it "
                "may name any message of the chat, and the chat then shows the newest leaf under it (the "
                "message itself when nothing follows it); another chat's message is `404`.",
                body="ChatUpdate",
            ),
            "delete": operation(
                "deleteChat",
                "Delete a chat and its messages",
                "chats",
                {"204": limited("Deleted", None), "404": r("NotFound"), **authed},
                description="Its running generation is ended, and the user's lock freed, before the reply. "
                "Usage already counted stays counted.",
            ),
        },
        "/api/chats/{chat_id}/messages": {
            "parameters": [p("ChatId")],
            "get": operation(
                "listMessages",
                "A chat's messages: the path to its active leaf",
                "messages",
                {
                    "200": limited("A page of messages", ref("MessageList")),
                    "400": r("BadQuery"),
                    "404": r("NotFound"),
                    **authed,
                },
                description="A chat's messages form a tree (regenerated answers and edited messages are "
                "siblings). This lists the path from the root to the chat's `activeLeafId` (or to "
                "`leafId`), oldest first; other branches show only as `siblingIds`.",
                params=["LeafId", "Limit", "Cursor"],
            ),
            "post": operation(
                "addMessage",
                "Append a user message",
                "messages",
                {
                    "201": {
                        **limited(
                            "The message (role `user`)",
                            ref("Message"),
                            extra_headers={"Idempotent-Replayed": hdr("Idempotent-Replayed")},
                        ),
                        "links": {
                            "listMessages": link("listMessages", {"chat_id": "$response.body#/chatId"})
                        },
                    },
                    **with_body,
                    "404": r("NotFound"),
                    "409": r("IdempotencyKeyReused"),
                    **authed,
                },
                body="MessageCreate",
                params=["IdempotencyKey"],
            ),
        },
        "/api/chats/{chat_id}/generations": {
            "parameters": [p("ChatId")],
            "post": operation(
                "createGeneration",
                "Ask the model",
                "generations",
                {
                    "201": {
                        **limited(
                            "Queued; open `streamUrl` to start it",
                            ref("GenerationCreated"),
                            extra_headers={"Idempotent-Replayed": hdr("Idempotent-Replayed")},
                        ),
                        "links": generation_links,
                    },
                    "400": error(
                        "The request is not valid", ["validation_error", "invalid_json", "unknown_model"]
                    ),
                    "401": r("Unauthorized"),
                    "404": r("NotFound"),
                    "409": error(
                        "Another generation of this user's is in flight (`generationId` names it), or the "
                        "Idempotency-Key was used with another request",
                        ["generation_in_flight", "idempotency_key_reused"],
                    ),
                    "413": r("PayloadTooLarge"),
                    "429": error(
                        "Too many generation requests, or the daily token budget is used up",
                        ["rate_limited", "quota_exceeded"],
                        extra_headers={"Retry-After": hdr("Retry-After"), **rate_headers},
                    ),
                    "503": r("ServiceUnavailable"),
                },
                description="With `content`, that user message is appended after the active leaf first, in "
                "the same transaction; with `content` and `editOf`, beside that message instead (edit and "
                "resend); with `regenerateOf` alone, a new answer to the same prompt. The chat's "
                "`activeLeafId` moves to the new user message (to the parent, for a regenerate), and to the "
                "answer when it ends. One generation in flight per user. The model sees the system prompt "
                "and the path that leads to the answer, nothing from other branches (oldest turns dropped "
                "first when it would not fit). `editOf` / `regenerateOf` of another chat is `404`; of the "
                "wrong role, or combined as the schema forbids, `400 validation_error` naming the field.",
                body="GenerationCreate",
                body_required=False,
                params=["IdempotencyKey"],
            ),
        },
        "/api/generations/{generation_id}": {
            "parameters": [p("GenerationId")],
            "get": operation(
                "getGeneration",
                "A generation",
                "generations",
                {"200": limited("The generation", ref("Generation")), "404": r("NotFound"), **authed},
            ),
        },
        "/api/generations/{generation_id}/stream": {
            "parameters": [p("GenerationId")],
            "get": operation(
                "streamGeneration",
                "Follow a generation (Server-Sent Events)",
                "generations",
                {
                    "200": response(
                        "The event stream",
                        ref("ServerSentEvent"),
                        media_type="text/event-stream",
                        extra_headers={"Cache-Control": hdr("Cache-Control")},
                    ),
                    "401": error(
                        "No credentials, or a ticket or token that is invalid, expired or for another "
                        "generation",
                        ["unauthorized", "invalid_token"],
                    ),
                    "404": r("NotFound"),
                    "503": r("ServiceUnavailable"),
                },
                description=STREAM_DESCRIPTION,
                params=["LastEventIdHeader", "LastEventIdQuery"],
                security=[{"bearerAuth": []}, {"streamTicket": []}],
            ),
        },
        "/api/generations/{generation_id}/cancel": {
            "parameters": [p("GenerationId")],
            "post": operation(
                "cancelGeneration",
                "Cancel a generation (idempotent)",
                "generations",
                {
                    "200": limited(
                        "The generation: a queued one comes back `canceled`; a streaming one may still read "
                        "`streaming` and ends within 250 ms",
                        ref("Generation"),
                    ),
                    "404": r("NotFound"),
                    **authed,
                },
            ),
        },
        "/api/models": {
            "get": operation(
                "listModels",
                "The models served",
                "models",
                {"200": limited("The models", ref("ModelList")), **authed},
            )
        },
        "/api/usage": {
            "get": operation(
                "getUsage",
                "Token usage per UTC day",
                "usage",
                {"200": limited("Usage of the range", ref("Usage")), "400": r("BadQuery"), **authed},
                description="Unknown query parameters are refused.",
                params=["From", "To"],
            )
        },
        "/api/health": {
            "get": operation(
                "getHealth",
                "Health of the backing services",
                "operations",
                {
                    "200": response("Everything is up", ref("Health")),
                    "503": response("A backing service is down (`status: degraded`)", ref("Health")),
                },
                security=public,
            )
        },
        "/api/openapi.json": {
            "get": operation(
                "getOpenApi",
                "This document",
                "operations",
                {"200": response("The OpenAPI 3.1 description", {"type": "object"})},
                security=public,
            )
        },
    }

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "MiniChat API",
            "version": _version(),
            "description": INFO_DESCRIPTION,
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "tags": [
            {"name": name, "description": text}
            for name, text in (
                ("auth", "Accounts, access tokens, refresh-token families."),
                ("chats", "Chats, newest first."),
                ("messages", "A chat's messages, oldest first."),
                ("generations", "Model calls: create, follow (SSE), cancel."),
                ("usage", "Token usage and the daily budget."),
                ("models", "The models this deployment serves."),
                ("operations", "Health and this description."),
            )
        ],
        "security": [{"bearerAuth": []}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": responses,
            "parameters": parameters,
            "headers": headers,
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "The `accessToken` of register, login or refresh.",
                },
                "streamTicket": {
                    "type": "apiKey",
                    "in": "query",
                    "name": "ticket",
                    "description": "The signed ticket in a `streamUrl`: opens that one generation's stream.",
                },
            },
        },
    }


def _subclasses(cls: type[E]) -> list[type[E]]:
    found: list[type[E]] = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_subclasses(sub))
    return found


def _version() -> str:
    import tomllib

    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUTPUT.exists() or OUTPUT.read_text(encoding="utf-8") != text:
            print(
                f"{OUTPUT.relative_to(ROOT)} is out of date: run python infra/build_openapi.py",
                file=sys.stderr,
            )
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
