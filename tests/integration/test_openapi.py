"""The OpenAPI description: built from the request specs, valid 3.1, equal to the routes, served as is."""

from __future__ import annotations

import itertools
import json
import re
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema_rs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import Api, assert_error
from minichat import errors, validate
from minichat_local.functions import load_function, load_path, repo_root
from minichat_local.server import _STREAM_ROUTE

DOCUMENT_PATH = repo_root() / "functions" / "api" / "chalicelib" / "openapi.json"
METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
PUBLIC = {
    ("POST", "/api/auth/register"),
    ("POST", "/api/auth/login"),
    ("POST", "/api/auth/refresh"),
    ("GET", "/api/health"),
    ("GET", "/api/openapi.json"),
}


def _build_script() -> ModuleType:
    return load_path(repo_root() / "infra" / "build_openapi.py")


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return dict(json.loads(DOCUMENT_PATH.read_text(encoding="utf-8")))


def _operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield method.upper(), path, operation


def _routes() -> set[tuple[str, str]]:
    """What is served: the Chalice app's routes and the stream function's."""
    routes = {
        (method, path) for path, entries in load_function("api").app.routes.items() for method in entries
    }
    for route in load_function("stream").app.routes:
        if route.path.startswith("/api/") and "{path" not in route.path:
            routes |= {(method, route.path) for method in route.methods - {"HEAD"}}
    return routes


def test_the_packaged_document_is_what_the_build_script_makes() -> None:
    assert DOCUMENT_PATH.read_text(encoding="utf-8") == _build_script().render(), (
        "functions/api/chalicelib/openapi.json is out of date: run python infra/build_openapi.py"
    )


def test_the_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR

    problems = [str(e) for e in OPENAPI_31_VALIDATOR.iter_errors(document)]
    assert problems == []
    assert document["openapi"].startswith("3.1.")

    def refs(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                yield node["$ref"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    for target in set(refs(document)):
        node: Any = document
        for part in target.removeprefix("#/").split("/"):
            assert isinstance(node, dict) and part in node, f"unresolved $ref {target}"
            node = node[part]
    ids = [op["operationId"] for _, _, op in _operations(document)]
    assert len(ids) == len(set(ids))


def test_every_route_is_documented_and_every_documented_operation_is_served(document: dict[str, Any]) -> None:
    documented = {(method, path) for method, path, _ in _operations(document)}
    assert documented == _routes()
    # Path parameters: the same names as the routes, each declared.
    for method, path, operation in _operations(document):
        names = set(re.findall(r"{(\w+)}", path))
        declared = {
            p["name"]
            if "name" in p
            else document["components"]["parameters"][p["$ref"].rsplit("/", 1)[1]]["name"]
            for p in document["paths"][path].get("parameters", []) + operation.get("parameters", [])
        }
        assert names <= declared, (method, path)


def test_local_mode_sends_each_documented_path_to_its_function(document: dict[str, Any]) -> None:
    for _, path, operation in _operations(document):
        concrete = re.sub(r"{\w+}", str(uuid.uuid4()), path)
        is_stream = operation["operationId"] == "streamGeneration"
        assert bool(_STREAM_ROUTE.match(concrete)) == is_stream, path


def test_documented_security_is_what_the_routes_do(api: Api, document: dict[str, Any]) -> None:
    """Each secured operation answers 401 without credentials; each public one does not ask for them."""
    for method, path, operation in _operations(document):
        concrete = re.sub(r"{\w+}", str(uuid.uuid4()), path)
        public = operation.get("security", document["security"]) == []
        assert public == ((method, path) in PUBLIC), (method, path)
        r = api.request(method, concrete, json={})
        assert r.headers["x-request-id"]
        if public:
            assert r.status_code != 401, (method, path, r.text)
        else:
            assert_error(r, 401, "unauthorized")
            assert r.headers["www-authenticate"] == 'Bearer realm="minichat"'


def test_error_codes_are_the_error_tree(document: dict[str, Any]) -> None:
    def codes(cls: type[errors.MiniChatError]) -> set[str]:
        return {cls.code}.union(*(codes(sub) for sub in cls.__subclasses__()))

    assert set(document["components"]["schemas"]["ErrorCode"]["enum"]) == codes(errors.MiniChatError)


def test_the_served_document_lists_this_deployments_models(api: Api, document: dict[str, Any]) -> None:
    r = api.http.get("/api/openapi.json")  # no credentials needed
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    served = r.json()
    user = api.register()
    models = [m["id"] for m in api.request("GET", "/api/models", user=user).json()["items"]]
    assert served["components"]["schemas"]["ModelId"].pop("enum") == models
    assert served == document


# --- the request schemas say exactly what the checks accept ------------------------------------------


def test_whitespace_is_what_python_strips() -> None:
    assert set(validate.WHITESPACE) == {chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()}
    schema_class = re.compile(f"[{validate._WS}]")
    assert {c for c in map(chr, range(0x3100)) if schema_class.fullmatch(c)} == set(validate.WHITESPACE)


def _body_specs() -> dict[str, validate.Body]:
    api = load_function("api")
    return {name: value for name, value in vars(api).items() if isinstance(value, validate.Body)}


def test_every_request_body_spec_is_documented(document: dict[str, Any]) -> None:
    specs = _body_specs()
    plain = {
        "CREDENTIALS": "Credentials",
        "ACCOUNT_DELETION": "AccountDeletion",
        "REFRESH_TOKEN": "RefreshTokenRequest",
        "NEW_CHAT": "ChatCreate",
        "CHAT_UPDATE": "ChatUpdate",
        "NEW_MESSAGE": "MessageCreate",
    }
    assert set(specs) == {*plain, "NEW_GENERATION"}
    schemas = document["components"]["schemas"]
    for spec_name, schema_name in plain.items():
        assert schemas[schema_name] == specs[spec_name].json_schema(), schema_name
    generation = specs["NEW_GENERATION"].json_schema()
    assert {k: v for k, v in schemas["GenerationCreate"]["properties"].items() if k != "model"} == {
        k: v for k, v in generation["properties"].items() if k != "model"
    }


# Characters chosen to sit on every edge the checks have: whitespace of all kinds, NUL, the email
# separators, a non-BMP character (one code point, two UTF-16 units).
EDGY = st.sampled_from([*validate.WHITESPACE, "\x00", "@", ".", "a", "Z", "é", "😀", "'", "\\"])


def _text_values(spec: validate.Text) -> st.SearchStrategy[Any]:
    near = [spec.min_len, spec.max_len]
    lengths = {n for base in near for n in (base - 1, base, base + 1) if n >= 0}
    return st.one_of(
        st.text(EDGY, max_size=min(spec.max_len + 2, 40)),
        st.sampled_from(sorted(lengths)).map(lambda n: "a" * n),
        st.sampled_from(sorted(lengths)).map(lambda n: " " + "b" * max(n - 2, 0) + " "),
        st.sampled_from(["a@b.co", "a b@c.d", "a@b", "@b.c", "a@@b.c", "a@b.c\n", "x@y.z\u00a0", "é@ü.de"]),
        st.none(),
        st.integers(),
        st.booleans(),
        st.lists(st.just("x"), max_size=1),
    )


def _number_values(spec: validate.Number) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.integers(min_value=int(spec.low) - 3, max_value=int(spec.high) + 3),
        st.floats(allow_nan=False, allow_infinity=False, min_value=spec.low - 3, max_value=spec.high + 3),
        st.sampled_from([10**400, -(10**400), spec.low, spec.high, float(spec.high), 1.5, True, "1", None]),
    )


def _uuid_values() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.uuids().map(str),
        st.uuids().map(lambda u: str(u).upper()),
        st.uuids().map(lambda u: u.hex),
        st.uuids().map(lambda u: "{" + str(u) + "}"),
        st.uuids().map(lambda u: str(u) + "\n"),
        st.text(EDGY, max_size=40),
        st.sampled_from([None, 1, True, ["x"], "00000000-0000-0000-0000-00000000000g"]),
    )


def _values(spec: validate.Text | validate.Number | validate.Uuid) -> st.SearchStrategy[Any]:
    if isinstance(spec, validate.Text):
        return _text_values(spec)
    if isinstance(spec, validate.Uuid):
        return _uuid_values()
    return _number_values(spec)


FIELDS = [
    (body_name, field_name, spec, field_name in body.required)
    for body_name, body in _body_specs().items()
    for field_name, spec in body.fields.items()
]


@pytest.mark.parametrize(
    ("body_name", "field_name", "spec", "required"), FIELDS, ids=[f"{b}.{f}" for b, f, _, _ in FIELDS]
)
def test_a_field_schema_accepts_exactly_what_its_check_accepts(
    body_name: str, field_name: str, spec: validate.Text | validate.Number | validate.Uuid, required: bool
) -> None:
    schema = spec.json_schema(nullable=not required)
    validator = jsonschema_rs.Draft202012Validator(schema, validate_formats=True)
    values = _values(spec)

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(values)
    def agree(value: Any) -> None:
        try:
            spec.read({field_name: value}, field_name, required=required)
            accepted = True
        except errors.ValidationError:
            accepted = False
        assert accepted == validator.is_valid(value), (field_name, value)

    agree()


def _parameter_specs() -> dict[str, Any]:
    from minichat import chats

    return {
        "ChatId": validate.ID,
        "GenerationId": validate.ID,
        "LeafId": validate.ID,
        "Limit": validate.LIMIT,
        "Cursor": validate.Cursor(chats.MESSAGES_CURSOR_SIZE),
        "ChatsCursor": validate.Cursor(chats.CHATS_CURSOR_SIZE),
        "IdempotencyKey": validate.IDEMPOTENCY_KEY,
        "From": validate.Day("from"),
        "To": validate.Day("to"),
    }


def test_every_checked_parameter_is_documented_by_its_spec(document: dict[str, Any]) -> None:
    parameters = document["components"]["parameters"]
    for name, spec in _parameter_specs().items():
        assert parameters[name]["schema"] == spec.json_schema(), name


_PARAMETER_TEXT = st.one_of(
    st.text(st.sampled_from("0123456789abcdefABCDEF-_ xyz=\x00é"), max_size=40),
    st.uuids().map(str),
    st.integers(-5, 300).map(str),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=250, max_size=260),
)


@pytest.mark.parametrize("name", ["ChatId", "Limit", "Cursor", "ChatsCursor", "IdempotencyKey"])
def test_a_parameter_schema_accepts_exactly_what_its_check_accepts(name: str) -> None:
    spec = _parameter_specs()[name]
    validator = jsonschema_rs.Draft202012Validator(spec.json_schema(), validate_formats=True)

    def documented(raw: str) -> bool:
        if isinstance(spec, validate.Limit):
            # A query string carries text: the schema speaks of the integer it spells (at most 6 digits).
            return raw.isascii() and raw.isdigit() and len(raw) <= 6 and validator.is_valid(int(raw))
        return validator.is_valid(raw)

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(_PARAMETER_TEXT | st.sampled_from(["", " ", " a", "a" * 255, "00050", "200", "201", "1", "0"]))
    def agree(raw: str) -> None:
        try:
            spec.read(raw)
            accepted = True
        except (errors.ValidationError, errors.NotFound):
            accepted = False
        assert accepted == documented(raw), (name, raw)

    agree()


def test_field_combinations_are_refused_by_schema_and_check_alike() -> None:
    """editOf / regenerateOf / content (POST .../generations) and title / activeLeafId (PATCH a chat)."""
    specs = _body_specs()
    an_id = str(uuid.uuid4())
    values = {"content": ["hi", None], "editOf": [an_id, None], "regenerateOf": [an_id, None]}
    cases = [
        ("NEW_GENERATION", dict(zip(values, combo, strict=True)))  # absent fields sent as null
        for combo in itertools.product(*values.values())
    ]
    cases += [
        ("NEW_GENERATION", {k: v for k, v in zip(values, combo, strict=True) if v is not None})
        for combo in itertools.product(*values.values())
    ]
    cases += [
        ("CHAT_UPDATE", body)
        for body in (
            {},
            {"title": None},
            {"activeLeafId": None},
            {"title": None, "activeLeafId": None},
            {"title": "t"},
            {"activeLeafId": an_id},
            {"title": "t", "activeLeafId": an_id},
            {"title": None, "activeLeafId": an_id},
        )
    ]
    accepted = set()
    for name, body in cases:
        validator = jsonschema_rs.Draft202012Validator(specs[name].json_schema(), validate_formats=True)
        try:
            specs[name].read(json.dumps(body))
            ok = True
        except errors.ValidationError:
            ok = False
        assert ok == validator.is_valid(body), (name, body)
        if ok:
            accepted.add((name, tuple(sorted(k for k, v in body.items() if v is not None))))
    assert accepted == {
        ("NEW_GENERATION", ()),
        ("NEW_GENERATION", ("content",)),
        ("NEW_GENERATION", ("content", "editOf")),
        ("NEW_GENERATION", ("regenerateOf",)),
        ("CHAT_UPDATE", ("title",)),
        ("CHAT_UPDATE", ("activeLeafId",)),
        ("CHAT_UPDATE", ("activeLeafId", "title")),
    }


def test_unknown_fields_are_refused_by_schema_and_check_alike() -> None:
    for name, spec in _body_specs().items():
        validator = jsonschema_rs.Draft202012Validator(spec.json_schema())
        assert not validator.is_valid({"userId": str(uuid.uuid4())}), name
        with pytest.raises(errors.ValidationError):
            spec.read(json.dumps({"userId": str(uuid.uuid4())}))


def test_the_document_lives_in_the_function_package() -> None:
    module = load_function("api")
    packaged = Path(module.__file__ or "").parent / "chalicelib" / "openapi.json"
    assert packaged == module.OPENAPI_PATH


def _validator(document: dict[str, Any], name: str) -> jsonschema_rs.Validator:
    """A validator for one component schema, its references resolved within the document."""
    root = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    return jsonschema_rs.Draft202012Validator(root, validate_formats=True)


def test_stream_events_match_the_documented_schemas(api: Api, document: dict[str, Any]) -> None:
    from schemathesis.core.deserialization import _parse_sse_events

    frame = _validator(document, "ServerSentEvent")
    event = _validator(document, "StreamEvent")
    generation = _validator(document, "Generation")
    user = api.register()
    seen: set[str] = set()
    for model, cancel in (("mock-echo", False), ("mock-error", False), ("mock-slow", True)):
        chat = api.create_chat(user)
        created = api.create_generation(user, chat["id"], content="one two three four five", model=model)
        assert created.status_code == 201, created.text
        _validator(document, "GenerationCreated").validate(created.json())
        with api.http.stream("GET", created.json()["streamUrl"]) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            raw = b""
            for chunk in response.iter_raw():
                raw += chunk
                if cancel and raw.count(b"\n\n") == 1:
                    gid = created.json()["generationId"]
                    api.request("POST", f"/api/generations/{gid}/cancel", user=user)
        # Read the way Schemathesis reads an event stream, then checked against the document.
        for parsed in _parse_sse_events(raw):
            frame.validate(dict(parsed))
            data = json.loads(parsed["data"])
            event.validate(data)
            seen.add(data["type"])
        final = api.request("GET", f"/api/generations/{created.json()['generationId']}", user=user).json()
        generation.validate(final)
    assert seen == {"delta", "usage", "error", "done"}
