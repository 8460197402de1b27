"""The `sam build` output runs: each function's artifact plus the layer, nothing from the dev environment.

Every handler runs in a clean Python 3.12 process (`-I -S`: no site-packages, no PYTHON* variables) whose
import path is the function's folder and the layer's python/ folder only, laid out outside the repository
as Lambda lays them out (/var/task, /opt/python). The events have the shapes AWS sends: API Gateway REST
proxy events (tests/events/apigateway-rest-proxy*.json), Amazon MQ RabbitMQ events built from the messages
the artifacts themselves published, EventBridge scheduled events; the stream app is started by the
artifact's run.sh, as the Lambda Web Adapter starts it, and read over HTTP. They run against this
machine's PostgreSQL, Redis and RabbitMQ, in a database, Redis db and vhost of their own.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pika
import psycopg
import pytest
import redis
from aws_support import ROOT, scheduled_event
from psycopg import sql

pytestmark = pytest.mark.slow

DB_NAME = os.environ.get("MINICHAT_TEST_AWS_DB", "minichat_test_aws")
REDIS_DB = os.environ.get("MINICHAT_TEST_AWS_REDIS_DB", "8")
VHOST = os.environ.get("MINICHAT_TEST_AWS_VHOST", "minichat_test_aws")
PG_ADMIN = os.environ.get("MINICHAT_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
DATABASE_URL = psycopg.conninfo.make_conninfo(PG_ADMIN, dbname=DB_NAME)
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
BROKER_URL = f"amqp://guest:guest@127.0.0.1:5672/{VHOST}"
EVENTS = ROOT / "tests" / "events"
RESULT = "\x1eRESULT "

# One Lambda execution environment: cold start (import the handler), then one invocation per input line.
DRIVER = r"""
import json, sys, traceback
task, opt, module, attribute = sys.argv[1:5]
sys.path[:0] = [task, opt]
out = sys.stdout
sys.stdout = sys.stderr  # the handler's prints are logs, not results
handler = getattr(__import__(module), attribute)

class Context:
    function_name = "minichat-test-" + module
    memory_limit_in_mb = 1024
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:" + function_name
    def __init__(self, n):
        self.aws_request_id = "req-%d" % n
    def get_remaining_time_in_millis(self):
        return 30000

out.write("\x1eRESULT " + json.dumps({"ready": True}) + "\n"); out.flush()
for n, line in enumerate(sys.stdin):
    try:
        reply = {"result": handler(json.loads(line), Context(n))}
    except BaseException as exc:
        reply = {"error": type(exc).__name__, "message": str(exc), "trace": traceback.format_exc()}
    out.write("\x1eRESULT " + json.dumps(reply, default=str) + "\n"); out.flush()
"""


def lambda_env(function: str, task: Path, **extra: str) -> dict[str, str]:
    """What Lambda gives a function (the parts MiniChat reads), pointed at this machine's services."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "TZ": "UTC",
        "AWS_LAMBDA_FUNCTION_NAME": f"minichat-test-{function}",  # makes MINICHAT_ENV=aws
        "AWS_REGION": "us-east-1",
        "LAMBDA_TASK_ROOT": str(task),
        "DATABASE_URL": DATABASE_URL,
        "REDIS_URL": REDIS_URL,
        "RABBITMQ_URL": BROKER_URL,
        "MINICHAT_JWT_SECRET": "aws-artifact-test-" + "k" * 40,
        "MINICHAT_DEFAULT_MODEL": "mock-echo",
        "MINICHAT_LOG_LEVEL": "WARNING",
        **extra,
    }


class LambdaProcess:
    """A clean python3.12 process serving one handler from the built artifacts."""

    def __init__(self, python312: str, task: Path, opt: Path, handler: str, env: dict[str, str]) -> None:
        module, _, attribute = handler.rpartition(".")
        self.process = subprocess.Popen(
            [python312, "-I", "-S", "-B", "-c", DRIVER, str(task), str(opt), module, attribute],
            cwd=task,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.cold_start = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith(RESULT):
                reply: dict[str, Any] = json.loads(line[len(RESULT) :])
                return reply
        self.process.wait(timeout=10)
        stderr = self.process.stderr.read() if self.process.stderr else ""
        raise AssertionError(f"the function process exited {self.process.returncode}:\n{stderr}")

    def invoke(self, event: dict[str, Any]) -> Any:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(event) + "\n")
        self.process.stdin.flush()
        reply = self._read()
        assert "error" not in reply, reply.get("trace")
        return reply["result"]

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for stream in (self.process.stdout, self.process.stderr):
            if stream:
                stream.close()


@pytest.fixture(scope="module")
def services() -> None:
    """A fresh database (created by the migrate handler), Redis db and vhost for these tests."""
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DB_NAME)))
    redis.Redis.from_url(REDIS_URL).flushdb()
    try:
        pika.BlockingConnection(pika.URLParameters(BROKER_URL)).close()
    except pika.exceptions.AMQPError:
        subprocess.run(["rabbitmqctl", "add_vhost", VHOST], capture_output=True, timeout=60, check=False)
        subprocess.run(
            ["rabbitmqctl", "set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*"],
            capture_output=True,
            timeout=60,
            check=True,
        )
    connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    channel = connection.channel()
    from minichat import broker

    for queue in broker.QUEUES:
        channel.queue_delete(queue)
        channel.queue_delete(broker.dead_letter_queue(queue))
    connection.close()


@pytest.fixture(scope="module")
def start(lambda_root: Path, python312: str, services: None) -> Iterator[Any]:
    """start(function, handler) -> a LambdaProcess (cold start done); all closed at the end."""
    started: list[LambdaProcess] = []

    def launch(function: str, handler: str, **env: str) -> LambdaProcess:
        task = lambda_root / "task" / function
        process = LambdaProcess(
            python312, task, lambda_root / "opt" / "python", handler, lambda_env(function, task, **env)
        )
        started.append(process)
        return process

    yield launch
    for process in started:
        process.close()


@pytest.fixture(scope="module")
def migrated(start: Any) -> list[list[str]]:
    """The migrate handler run twice on a database that does not exist yet."""
    migrate = start("MigrateFunction", "jobs.migrate_handler")
    first = migrate.invoke({})
    second = migrate.invoke({})
    return [first["applied"], second["applied"]]


def test_migrate_handler_creates_the_database_and_applies_the_packaged_migrations(
    migrated: list[list[str]], lambda_root: Path
) -> None:
    expected = sorted(path.name for path in (ROOT / "infra" / "migrations").glob("*.sql"))
    packaged = sorted(path.name for path in (lambda_root / "opt/python/minichat/migrations").glob("*.sql"))
    assert packaged == expected
    assert migrated == [expected, []]


# ---------------------------------------------------------------------------------------------------------
# Imports: the layer alone carries the core's dependencies.

IMPORT_ALL = r"""
import importlib, pkgutil, sys
sys.path[:0] = [sys.argv[1]]
import minichat
names = [m.name for m in pkgutil.walk_packages(minichat.__path__, "minichat.")]
for name in names:
    importlib.import_module(name)
import openai, aiohttp  # the OpenAI provider's client, imported lazily by the app
from minichat.migrate import migrations_dir
print(len(names), migrations_dir())
"""


def test_every_core_module_imports_from_the_layer_alone(lambda_root: Path, python312: str) -> None:
    opt = lambda_root / "opt" / "python"
    result = subprocess.run(
        [python312, "-I", "-S", "-B", "-c", IMPORT_ALL, str(opt)],
        env={"PATH": "/usr/bin:/bin", "MINICHAT_JWT_SECRET": "x" * 40},
        cwd=lambda_root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    count, directory = result.stdout.split()
    assert int(count) > 10
    assert Path(directory) == opt / "minichat" / "migrations"


def test_a_dependency_missing_from_the_layer_fails(lambda_root: Path, python312: str, tmp_path: Path) -> None:
    # The same check as every test here, on a layer without PyJWT: the API function must not start.
    layer = tmp_path / "python"
    for entry in (lambda_root / "opt" / "python").iterdir():
        if entry.name != "jwt":
            (layer / entry.name).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(entry, layer / entry.name)
    task = lambda_root / "task" / "ApiFunction"
    with pytest.raises(AssertionError, match="No module named 'jwt'"):
        LambdaProcess(python312, task, layer, "app.app", lambda_env("api", task))


# ---------------------------------------------------------------------------------------------------------
# The API function: API Gateway REST proxy events.


def rest_event(method: str, path: str, resource: str, *, body: Any = None, token: str | None = None) -> Any:
    """tests/events/apigateway-rest-proxy.json for another route (what API Gateway sends for it)."""
    event = copy.deepcopy(json.loads((EVENTS / "apigateway-rest-proxy.json").read_text()))
    params = dict(zip(_names(resource), _values(resource, path), strict=True)) or None
    headers = {k: v for k, v in event["headers"].items() if k.lower() != "authorization"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    event.update(
        httpMethod=method,
        path=path,
        resource=resource,
        pathParameters=params,
        body=None if body is None else json.dumps(body),
        headers=headers,
        multiValueHeaders={k: [v] for k, v in headers.items()},
    )
    event["requestContext"].update(httpMethod=method, resourcePath=resource, path=f"/dev{path}")
    event["requestContext"]["requestId"] = str(uuid.uuid4())
    return event


def _names(resource: str) -> list[str]:
    return [part[1:-1] for part in resource.split("/") if part.startswith("{")]


def _values(resource: str, path: str) -> list[str]:
    pairs = zip(resource.split("/"), path.split("/"), strict=True)
    return [value for part, value in pairs if part.startswith("{")]


def reply(response: dict[str, Any]) -> tuple[int, Any]:
    body = response.get("body")
    if response.get("isBase64Encoded"):
        body = base64.b64decode(body).decode()
    return response["statusCode"], json.loads(body) if body else None


@pytest.fixture(scope="module")
def api_session(start: Any, migrated: list[list[str]]) -> dict[str, Any]:
    """Register, then a chat, a message and a generation, each through the built API function."""
    api = start("ApiFunction", "app.app")
    session: dict[str, Any] = {"api": api}

    event = json.loads((EVENTS / "apigateway-rest-proxy.json").read_text())
    email = f"aws-{uuid.uuid4().hex[:12]}@example.com"
    event["body"] = json.dumps({**json.loads(event["body"]), "email": email})
    response = api.invoke(event)
    status, body = reply(response)
    assert status == 201, body
    assert response["headers"]["X-Request-Id"] == "sample-request-1"
    session.update(token=body["accessToken"], user_id=body["user"]["id"], register=body)

    status, chat = reply(
        api.invoke(rest_event("POST", "/api/chats", "/api/chats", body={}, token=session["token"]))
    )
    assert status == 201, chat
    session["chat_id"] = chat["id"]

    # tests/events/apigateway-rest-proxy-chat-message.json, with this chat and this user's token.
    event = json.loads((EVENTS / "apigateway-rest-proxy-chat-message.json").read_text())
    event["path"] = event["path"].replace(event["pathParameters"]["chat_id"], chat["id"])
    event["pathParameters"] = {"chat_id": chat["id"]}
    event["headers"]["Authorization"] = f"Bearer {session['token']}"
    event["multiValueHeaders"]["Authorization"] = [f"Bearer {session['token']}"]
    status, message = reply(api.invoke(event))
    assert status == 201, message
    session["message"] = message
    return session


def test_api_function_registers_a_user(api_session: dict[str, Any]) -> None:
    body = api_session["register"]
    assert body["tokenType"] == "Bearer"
    assert "passwordHash" not in body["user"]


def test_api_function_serves_the_chat_routes(api_session: dict[str, Any]) -> None:
    api, token, chat_id = api_session["api"], api_session["token"], api_session["chat_id"]
    assert api_session["message"]["role"] == "user"
    resource = "/api/chats/{chat_id}/messages"
    status, page = reply(
        api.invoke(rest_event("GET", f"/api/chats/{chat_id}/messages", resource, token=token))
    )
    assert status == 200, page
    assert [item["content"] for item in page["items"]] == ["Hello"]
    status, chats = reply(api.invoke(rest_event("GET", "/api/chats", "/api/chats", token=token)))
    assert status == 200
    assert [chat["id"] for chat in chats["items"]] == [chat_id]
    status, error = reply(api.invoke(rest_event("GET", "/api/chats", "/api/chats")))
    assert status == 401
    assert error["error"]["code"] == "unauthorized"


def test_api_function_health_sees_all_three_services(api_session: dict[str, Any]) -> None:
    status, body = reply(api_session["api"].invoke(rest_event("GET", "/api/health", "/api/health")))
    assert status == 200, body
    assert body["status"] == "ok"
    assert set(body["checks"]) == {"database", "redis", "broker"}


# ---------------------------------------------------------------------------------------------------------
# The stream function: run.sh starts uvicorn, as the Lambda Web Adapter does; HTTP in, SSE out.


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def stream_server(lambda_root: Path, python312: str, services: None, tmp_path_factory: Any) -> Iterator[str]:
    task = lambda_root / "task" / "StreamFunction"
    # Lambda's `python` is the runtime's 3.12; here a wrapper runs 3.12 without site-packages.
    bin_dir = tmp_path_factory.mktemp("runtime-bin")
    wrapper = bin_dir / "python"
    wrapper.write_text(f'#!/bin/sh\nexec "{python312}" -s -S -B "$@"\n')
    wrapper.chmod(0o755)
    port = _free_port()
    env = lambda_env("stream", task, PORT=str(port), PYTHONPATH=str(lambda_root / "opt" / "python"))
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    process = subprocess.Popen(
        ["/bin/bash", str(task / "run.sh")],
        cwd=task,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:  # the Web Adapter's readiness check: GET AWS_LWA_READINESS_CHECK_PATH until it answers
            try:
                if httpx.get(f"{base}/_ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                output = process.stdout.read() if process.stdout else ""
                pytest.fail(f"run.sh did not become ready (exit {process.poll()}):\n{output}")
            time.sleep(0.1)
        yield base
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # what Lambda sends at shutdown
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if process.stdout:
            process.stdout.close()


def sse_events(text: str) -> list[dict[str, Any]]:
    events = []
    for block in text.split("\n\n"):
        data = [line[5:].strip() for line in block.splitlines() if line.startswith("data:")]
        if data:
            events.append(json.loads("\n".join(data)))
    return events


@pytest.fixture(scope="module")
def streamed(api_session: dict[str, Any], stream_server: str) -> dict[str, Any]:
    """A generation created by the API function and streamed by the stream app to its end."""
    api, token, chat_id = api_session["api"], api_session["token"], api_session["chat_id"]
    path = f"/api/chats/{chat_id}/generations"
    body = {"content": "streamed from the built artifact", "model": "mock-echo"}
    status, created = reply(
        api.invoke(rest_event("POST", path, "/api/chats/{chat_id}/generations", body=body, token=token))
    )
    assert status == 201, created
    # Behind API Gateway's default host the URL starts with the stage, which API Gateway strips before
    # the stream function sees the request: the stream app is called without it here.
    stage = "/" + json.loads((EVENTS / "apigateway-rest-proxy.json").read_text())["requestContext"]["stage"]
    url = created["streamUrl"]
    assert url.startswith(f"{stage}/api/generations/")
    with httpx.Client(base_url=stream_server, timeout=30) as client:
        response = client.get(url.removeprefix(stage))
    return {"created": created, "response": response}


def test_stream_app_streams_a_generation_to_its_end(
    streamed: dict[str, Any], api_session: dict[str, Any]
) -> None:
    response = streamed["response"]
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert "".join(e["delta"] for e in events if e["type"] == "delta") == "streamed from the built artifact"
    assert events[-1] == {"type": "done", "status": "succeeded"}
    generation_id = streamed["created"]["generationId"]
    path = f"/api/generations/{generation_id}"
    status, generation = reply(
        api_session["api"].invoke(
            rest_event("GET", path, "/api/generations/{generation_id}", token=api_session["token"])
        )
    )
    assert status == 200
    assert generation["status"] == "succeeded"


def test_stream_app_refuses_a_request_without_credentials(stream_server: str) -> None:
    response = httpx.get(f"{stream_server}/api/generations/{uuid.uuid4()}/stream", timeout=10)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"


# ---------------------------------------------------------------------------------------------------------
# The scheduled jobs and the MQ worker.


def test_reaper_handler_runs_on_its_schedule(start: Any, migrated: list[list[str]]) -> None:
    result = start("ReaperFunction", "jobs.reaper_handler").invoke(scheduled_event("reaper"))
    assert isinstance(result, dict)


def test_purge_handler_runs_on_its_schedule(start: Any, migrated: list[list[str]]) -> None:
    result = start("PurgeFunction", "jobs.purge_handler").invoke(scheduled_event("purge"))
    assert set(result) == {"idempotencyKeys", "outbox", "refreshTokens"}


def drain(queue: str) -> list[Any]:
    """Every message of a queue (acknowledged), as the local consumer's Delivery objects."""
    from minichat_local.consumer import Delivery

    connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    channel = connection.channel()
    deliveries = []
    while True:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            break
        deliveries.append(
            Delivery(
                queue=queue,
                delivery_tag=method.delivery_tag,
                redelivered=method.redelivered,
                properties=properties,
                body=body,
            )
        )
    connection.close()
    return deliveries


def test_relay_and_worker_carry_the_events_the_functions_wrote(
    start: Any, streamed: dict[str, Any], api_session: dict[str, Any]
) -> None:
    from minichat import broker
    from minichat_local.consumer import build_mq_event

    relay = start("RelayFunction", "jobs.relay_handler").invoke(scheduled_event("relay"))
    assert "published" in relay
    with psycopg.connect(DATABASE_URL) as conn:
        pending = conn.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL").fetchone()
    assert pending == (0,)

    usage = drain(broker.QUEUES[0])
    audit = drain(broker.QUEUES[1])
    assert len(usage) == 1  # the one finished generation
    assert len(audit) >= 3  # user.registered, chat.created, generation.created, ...
    # Amazon MQ's event shape: keyed `queue::vhost`, base64 data, basicProperties.
    event = build_mq_event(usage + audit, vhost=VHOST, event_source_arn="arn:aws:mq:us-east-1:1:broker:b")
    worker = start("WorkerFunction", "handler.handler")
    first = worker.invoke(event)
    assert first["usage_inserted"] == 1
    assert first["audit_inserted"] == len(audit)
    assert first["dead_lettered"] == 0
    again = worker.invoke(event)  # a redelivered batch changes nothing
    assert again["usage_inserted"] == 0
    assert again["audit_inserted"] == 0
    with psycopg.connect(DATABASE_URL) as conn:
        user = api_session["user_id"]
        used = conn.execute(
            "SELECT sum(input_tokens + output_tokens) FROM usage_events WHERE user_id = %s", (user,)
        ).fetchone()
        daily = conn.execute(
            "SELECT sum(input_tokens + output_tokens) FROM daily_usage WHERE user_id = %s", (user,)
        ).fetchone()
    assert used == daily
    assert used[0] > 0


def test_worker_handler_takes_the_sample_amazon_mq_events(start: Any, migrated: list[list[str]]) -> None:
    worker = start("WorkerFunction", "handler.handler")
    for name in ("amazon-mq-usage.json", "amazon-mq-audit.json"):
        event = json.loads((EVENTS / name).read_text())
        sent = sum(len(messages) for messages in event["rmqMessagesByQueue"].values())
        result = worker.invoke(event)
        assert result["messages"] == sent


def test_built_template_points_each_function_at_its_artifact(
    built_template: dict[str, Any], sam_build: Path
) -> None:
    # What `sam local invoke` and `sam deploy` read after `sam build`: every handler file is there.
    resources = built_template["Resources"]
    assert resources["CoreLayer"]["Properties"]["ContentUri"] == "CoreLayer"
    for name, resource in resources.items():
        if resource["Type"] != "AWS::Serverless::Function":
            continue
        props = resource["Properties"]
        folder = sam_build / props["CodeUri"]
        assert props["CodeUri"] == name
        if props["Handler"] == "run.sh":
            assert (folder / "run.sh").stat().st_mode & 0o111, name
        else:
            module = props["Handler"].rpartition(".")[0]
            assert (folder / f"{module}.py").is_file(), name
