"""MiniChat's REST API: a Chalice app. Routes parse, call one core function, shape the reply."""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chalice import Chalice, Response
from chalice.app import Request

from minichat import accounts, admission, auth, chats, generations, health, idempotency, limits, usage
from minichat.config import get_settings
from minichat.errors import (
    InternalError,
    MethodNotAllowed,
    MiniChatError,
    PayloadTooLarge,
    ValidationError,
)
from minichat.log import accept_request_id, bind_request_id, get_logger, setup_logging
from minichat.log import request_id as current_request_id
from minichat.providers import ProviderRegistry
from minichat.serialize import public_path_prefix
from minichat.validate import (
    EMAIL,
    MAX_BODY_BYTES,
    Body,
    FieldRule,
    Number,
    Text,
    Uuid,
    parse_day,
    parse_limit,
    parse_uuid,
    require_fields,
)

app = Chalice(app_name="minichat-api")
# The REST API declares no binary media types (template.yaml), so API Gateway passes every body as text;
# Chalice's default list (images, audio, archives) would make it treat some as base64. It also cost
# three content-type scans of that list on every request.
app.api.binary_types = []
setup_logging(get_settings().log_level)
log = get_logger("minichat.api")

_JSON: dict[str, str | list[str]] = {"Content-Type": "application/json"}


def _error_response(error: MiniChatError, request_id: str | None) -> Response:
    return Response(
        body=error.envelope(request_id), status_code=error.status, headers={**_JSON, **error.headers()}
    )


@app.middleware("http")
def _edge(request: Request, get_response: Callable[[Request], Response]) -> Response:
    """Per request: the request id, the body limit (before parsing), the error envelope, one log line."""
    started = time.perf_counter()
    request_id = accept_request_id(request.headers.get("x-request-id"))
    bind_request_id(request_id)
    try:
        declared = request.headers.get("content-length")
        body = request.to_original_event().get("body") or ""
        if (declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES) or len(body) > MAX_BODY_BYTES:
            response = _error_response(PayloadTooLarge(), request_id)
        else:
            response = get_response(request)
        if response.status_code >= 400 and isinstance(response.body, dict) and "Code" in response.body:
            # Chalice's own errors (wrong method, unhandled exception) into the contract's envelope.
            if response.status_code == 405:
                error: MiniChatError = MethodNotAllowed(str(response.headers.get("Allow", "")))
            elif response.status_code < 500:
                error = ValidationError(str(response.body.get("Message", "")))
            else:
                error = InternalError()
            response = _error_response(error, request_id)
        response.headers["X-Request-Id"] = request_id
        log.info(
            "request",
            method=request.method,
            path=request.path,
            status=response.status_code,
            ms=round((time.perf_counter() - started) * 1000, 2),
        )
        return response
    finally:
        bind_request_id(None)


# X-RateLimit-* of the tightest limit this request was counted against (added to its reply, error or not).
_rate_headers: contextvars.ContextVar[tuple[int, dict[str, str]] | None] = contextvars.ContextVar(
    "minichat_rate_headers", default=None
)


def route(
    path: str, *, methods: list[str], status: int = 200, idempotent: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a view whose MiniChatErrors become the envelope (the one place errors are mapped).

    `idempotent`: the route honours an Idempotency-Key header (SPEC: the same key within 24 h returns the
    first response and creates nothing new).
    """

    def register(view: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(view)
        def handle(**params: str) -> Response:
            _rate_headers.set(None)
            _call_counted.set(False)
            try:
                response = _run_idempotent(view, params, status) if idempotent else _run(view, params, status)
            except MiniChatError as error:
                response = _error_response(error, current_request_id())
            except Exception:
                log.exception("unhandled error", path=path)
                response = _error_response(InternalError(), current_request_id())
            counted = _rate_headers.get()
            if counted is not None:
                response.headers.update(counted[1])
            return response

        # The body is always parsed as JSON whatever Content-Type says: curl users need no -H.
        app.route(path, methods=methods, content_types=["*/*"])(handle)
        return view

    return register


def _run(view: Callable[..., Any], params: dict[str, str], status: int) -> Response:
    result = view(**params)
    if isinstance(result, Response):
        return result
    return Response(body=result, status_code=status, headers=_JSON)


def _run_idempotent(view: Callable[..., Any], params: dict[str, str], status: int) -> Response:
    raw_key = _request().headers.get("idempotency-key")
    if raw_key is None:
        return _run(view, params, status)
    key = idempotency.validate_key(raw_key)
    user_id = _user_id()
    request = _request()
    fingerprint = idempotency.fingerprint(
        method=request.method, path=request.context.get("path", request.path), body=request.raw_body or b""
    )
    claim = idempotency.claim(user_id=user_id, key=key, request_hash=fingerprint)
    if isinstance(claim, idempotency.Replay):
        return Response(
            body=claim.body, status_code=claim.status, headers={**_JSON, "Idempotent-Replayed": "true"}
        )
    try:
        response = _run(view, params, status)
    except BaseException:
        idempotency.release(claim)  # nothing was created: the key may be used again
        raise
    idempotency.store(claim, status=response.status_code, body=response.body)
    return response


def _note_rate(decision: limits.Decision) -> None:
    """Keep the X-RateLimit-* headers of the tightest limit this request was counted against."""
    counted = _rate_headers.get()
    if counted is None or decision.remaining <= counted[0]:
        _rate_headers.set((decision.remaining, decision.headers()))


def _limit(limit: admission.Limit, key: str) -> None:
    admission.check(limit, key, counted=_note_rate)


def _failures_limited(limit: admission.Limit, key: str) -> contextlib.AbstractContextManager[None]:
    return admission.failures_limited(limit, key, counted=_note_rate)


def _request() -> Request:
    request = app.current_request
    assert request is not None
    return request


# The request bodies, each declared once: these specs check the requests and write the OpenAPI schemas.
TITLE = Text(
    min_len=1,
    max_len=200,
    strip=True,
    blank=False,
    description="Surrounding whitespace is removed before it is stored.",
)
CONTENT = Text(min_len=1, max_len=32_000, blank=False)
PASSWORD = Text(min_len=8, max_len=128)
CREDENTIALS = Body({"email": EMAIL, "password": PASSWORD}, required=frozenset({"email", "password"}))
ACCOUNT_DELETION = Body({"password": PASSWORD}, required=frozenset({"password"}))
REFRESH_TOKEN = Body({"refreshToken": Text(min_len=1, max_len=512)}, required=frozenset({"refreshToken"}))
NEW_CHAT = Body({"title": TITLE}, may_be_empty=True)
CHAT_UPDATE = Body(
    {
        "title": TITLE,
        "activeLeafId": Uuid(
            "A message of this chat: the chat then shows the newest leaf under it (itself when it has no "
            "replies), to switch branches."
        ),
    },
    at_least_one=("title", "activeLeafId"),
)
NEW_MESSAGE = Body({"content": CONTENT}, required=frozenset({"content"}))
NEW_GENERATION = Body(
    {
        "content": Text(
            min_len=1,
            max_len=32_000,
            blank=False,
            description="Appended as the user's message after the active leaf (with `editOf`: beside that "
            "message), in the same transaction, before the model runs.",
        ),
        "editOf": Uuid(
            "A user message of this chat: edit and resend. The new `content` becomes its sibling (same "
            "parent), then the answer follows it."
        ),
        "regenerateOf": Uuid(
            "An assistant message of this chat: a new answer to the same prompt, its sibling. No `content`, "
            "no `editOf` with it."
        ),
        "model": Text(
            min_len=1, max_len=200, description="One of GET /api/models; the default model when absent."
        ),
        "systemPrompt": Text(max_len=8_000),
        "temperature": Number(0, 2),
        "maxTokens": Number(1, 32_768, integer=True),
    },
    may_be_empty=True,
    rules=(
        FieldRule("regenerateOf", excludes=("editOf", "content")),
        FieldRule("editOf", needs=("content",)),
    ),
)


def _read(spec: Body) -> dict[str, Any]:
    return spec.read(_request().raw_body)


# This request has been counted against the per-call limit (once, however many helpers ask).
_call_counted: contextvars.ContextVar[bool] = contextvars.ContextVar("minichat_call_counted", default=False)


def _authenticated() -> str:
    return auth.authenticate(_request().headers.get("authorization")).user_id


def _user_id() -> str:
    user_id = _authenticated()
    if not _call_counted.get():
        admission.check_call(user_id, counted=_note_rate)
        _call_counted.set(True)
    return user_id


def _client_ip() -> str:
    identity = _request().context.get("identity") or {}
    return str(identity.get("sourceIp") or "unknown")


def _credentials() -> tuple[str, str]:
    body = _read(CREDENTIALS)
    return body["email"], body["password"]


def _refresh_token_field() -> str:
    token: str = _read(REFRESH_TOKEN)["refreshToken"]
    return token


def _no_content() -> Response:
    return Response(body="", status_code=204)


# --- auth -------------------------------------------------------------------------------------


@route("/api/auth/register", methods=["POST"], status=201)
def register() -> dict[str, Any]:
    email, password = _credentials()
    _limit(admission.LOGIN_IP, _client_ip())  # before the argon2 work
    return auth.register(email=email, password=password)


@route("/api/auth/login", methods=["POST"])
def login() -> dict[str, Any]:
    email, password = _credentials()
    # Every attempt counts per client IP; failures count per (email, client IP), so that wrong passwords
    # typed elsewhere for someone's email never lock its owner out. Both are checked before the password
    # hash is computed: a flood costs us nothing but Redis calls.
    client_ip = _client_ip()
    _limit(admission.LOGIN_IP, client_ip)
    with _failures_limited(admission.LOGIN_FAILURES, f"{email.lower()}|{client_ip}"):
        return auth.login(email=email, password=password)


@route("/api/auth/refresh", methods=["POST"])
def refresh() -> dict[str, Any]:
    return auth.refresh(refresh_token=_refresh_token_field())


@route("/api/auth/logout", methods=["POST"])
def logout() -> Response:
    user_id = _user_id()
    auth.logout(user_id=user_id, refresh_token=_refresh_token_field())
    return _no_content()


@route("/api/auth/me", methods=["GET"])
def me() -> dict[str, Any]:
    return auth.me(_user_id())


@route("/api/auth/me", methods=["DELETE"])
def delete_me() -> Response:
    user_id = _user_id()
    password: str = _read(ACCOUNT_DELETION)["password"]
    # Wrong passwords count like failed logins (per account and client IP): a stolen access token is no
    # way to guess the password.
    with _failures_limited(admission.ACCOUNT_PASSWORD_FAILURES, f"{user_id}|{_client_ip()}"):
        accounts.delete_account(user_id=user_id, password=password)
    return _no_content()


# --- chats and messages -----------------------------------------------------------------------


def _query() -> dict[str, str]:
    return dict(_request().query_params or {})


@route("/api/chats", methods=["GET"])
def list_chats() -> dict[str, Any]:
    user_id = _user_id()
    query = _query()
    return chats.list_chats(user_id=user_id, limit=parse_limit(query), cursor=query.get("cursor"))


@route("/api/chats", methods=["POST"], status=201, idempotent=True)
def create_chat() -> dict[str, Any]:
    user_id = _user_id()
    return chats.create_chat(user_id=user_id, title=_read(NEW_CHAT)["title"])


@route("/api/chats/{chat_id}", methods=["GET"])
def get_chat(chat_id: str) -> dict[str, Any]:
    user_id = _user_id()
    return chats.get_chat(user_id=user_id, chat_id=parse_uuid(chat_id))


@route("/api/chats/{chat_id}", methods=["PATCH"])
def update_chat(chat_id: str) -> dict[str, Any]:
    user_id = _user_id()
    chat_id = parse_uuid(chat_id)
    body = _read(CHAT_UPDATE)
    return chats.update_chat(
        user_id=user_id, chat_id=chat_id, title=body["title"], active_leaf_id=body["activeLeafId"]
    )


@route("/api/chats/{chat_id}", methods=["DELETE"])
def delete_chat(chat_id: str) -> Response:
    user_id = _user_id()
    generations.delete_chat(user_id=user_id, chat_id=parse_uuid(chat_id))
    return _no_content()


@route("/api/chats/{chat_id}/messages", methods=["GET"])
def list_messages(chat_id: str) -> str:
    user_id = _user_id()
    query = _query()
    leaf_id = query.get("leafId")
    return chats.list_messages(
        user_id=user_id,
        chat_id=parse_uuid(chat_id),
        limit=parse_limit(query),
        cursor=query.get("cursor"),
        leaf_id=None if leaf_id is None else parse_uuid(leaf_id),
    )


@route("/api/chats/{chat_id}/messages", methods=["POST"], status=201, idempotent=True)
def add_message(chat_id: str) -> dict[str, Any]:
    user_id = _user_id()
    chat_id = parse_uuid(chat_id)
    return chats.add_message(user_id=user_id, chat_id=chat_id, content=_read(NEW_MESSAGE)["content"])


# --- generations ------------------------------------------------------------------------------

_registry: ProviderRegistry | None = None


def _models() -> ProviderRegistry:
    global _registry
    if _registry is None:
        _registry = ProviderRegistry.from_settings(get_settings())
    return _registry


@route("/api/chats/{chat_id}/generations", methods=["POST"], status=201, idempotent=True)
def create_generation(chat_id: str) -> dict[str, Any]:
    user_id = _authenticated()  # counted against its limits by the create's own Redis call
    call_counted = _call_counted.get()
    try:
        chat_id = parse_uuid(chat_id)
        body = _read(NEW_GENERATION)
        model = body["model"] or _models().default_model
        _models().resolve(model)  # unknown_model before anything is written
    except MiniChatError as error:
        generations.count_refused_create(user_id=user_id, call_counted=call_counted, counted=_note_rate)
        raise error
    reply = generations.create_generation(
        user_id=user_id,
        chat_id=chat_id,
        content=body["content"],
        model=model,
        system_prompt=body["systemPrompt"],
        temperature=body["temperature"],
        max_tokens=body["maxTokens"],
        request_id=current_request_id(),
        edit_of=body["editOf"],
        regenerate_of=body["regenerateOf"],
        call_counted=call_counted,
        counted=_note_rate,
    )
    _call_counted.set(True)
    reply["streamUrl"] = _stage_prefix() + reply["streamUrl"]
    return reply


def _stage_prefix() -> str:
    request = _request()
    return public_path_prefix(
        stage=request.context.get("stage"), host=request.headers.get("host", ""), headers=request.headers
    )


@route("/api/generations/{generation_id}", methods=["GET"])
def get_generation(generation_id: str) -> dict[str, Any]:
    user_id = _user_id()
    return generations.get_generation(user_id=user_id, generation_id=parse_uuid(generation_id))


@route("/api/generations/{generation_id}/cancel", methods=["POST"])
def cancel_generation(generation_id: str) -> dict[str, Any]:
    user_id = _user_id()
    return generations.cancel_generation(user_id=user_id, generation_id=parse_uuid(generation_id))


@route("/api/models", methods=["GET"])
def list_models() -> dict[str, Any]:
    _user_id()
    return {"items": _models().list_models()}


# --- usage ------------------------------------------------------------------------------------


@route("/api/usage", methods=["GET"])
def get_usage() -> dict[str, Any]:
    user_id = _user_id()
    query = _query()
    require_fields(query, allowed={"from", "to"})
    return usage.report(user_id=user_id, day_from=parse_day(query, "from"), day_to=parse_day(query, "to"))


# --- operations -------------------------------------------------------------------------------


@route("/api/health", methods=["GET"])
def get_health() -> Response:
    healthy, body = health.check_health()
    return Response(body=body, status_code=200 if healthy else 503, headers=_JSON)


# The OpenAPI 3.1 description, packaged with the function (chalicelib/ ships with the app). It is built
# from this module's request specs by infra/build_openapi.py; tests keep it equal to the routes.
OPENAPI_PATH = Path(__file__).resolve().parent / "chalicelib" / "openapi.json"


@functools.cache
def _openapi_document() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(OPENAPI_PATH.read_text(encoding="utf-8"))
    return document


@route("/api/openapi.json", methods=["GET"])
def get_openapi() -> dict[str, Any]:
    """The API's description; `ModelId` lists the models this deployment serves (GET /api/models)."""
    document = copy.deepcopy(_openapi_document())
    model_id = document["components"]["schemas"]["ModelId"]
    model_id["enum"] = [model["id"] for model in _models().list_models()]
    return document


__all__ = ["app"]
