"""The functions on a real Lambda runtime: `sam local invoke` in Docker, each with its template's environment.

The base image is built here (infra/samlocal/build_image.sh, `make sam-image`); SAM adds its Runtime
Interface Emulator and runs the built artifacts (.aws-sam/checked) in it. Each function gets exactly the
variables its translated resource declares, filled with this machine's values: a variable the template
forgot is simply absent in the container, as it would be on AWS. The services are reached through the
Docker bridge (infra/samlocal/forward.py). Nothing here talks to AWS.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import psycopg
import pytest
from aws_support import ROOT, TOOL_ENV, load_script, scheduled_event
from psycopg import sql

pytestmark = pytest.mark.slow

DB_NAME = os.environ.get("MINICHAT_TEST_SAMLOCAL_DB", "minichat_test_samlocal")
REDIS_DB = os.environ.get("MINICHAT_TEST_SAMLOCAL_REDIS_DB", "9")
VHOST = os.environ.get("MINICHAT_TEST_SAMLOCAL_VHOST", "minichat_test_samlocal")
PG_ADMIN = os.environ.get("MINICHAT_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
DATABASE_URL = psycopg.conninfo.make_conninfo(PG_ADMIN, dbname=DB_NAME)
BROKER_URL = f"amqp://guest:guest@127.0.0.1:5672/{VHOST}"
EVENTS = ROOT / "tests" / "events"
BOTO_TEST = {"region_name": "us-east-1", "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


@pytest.fixture(scope="module")
def bridge(sam_image: str) -> Iterator[dict[str, str]]:
    """host.docker.internal's address, and this machine's services relayed there on free ports."""
    forward = load_script("infra/samlocal/forward.py")
    gateway = forward.bridge_gateway()
    forwarder = forward.Forwarder(gateway)
    ports = {name: str(forwarder.add(port)) for name, port in (("pg", 5432), ("redis", 6379), ("amqp", 5672))}
    yield {"gateway": gateway, **ports}
    forwarder.close()


@pytest.fixture(scope="module")
def services() -> None:
    """A database that does not exist yet (the migrate function creates it) and an empty vhost."""
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DB_NAME)))
    try:
        pika.BlockingConnection(pika.URLParameters(BROKER_URL)).close()
    except pika.exceptions.AMQPError:
        for args in (["add_vhost", VHOST], ["set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*"]):
            subprocess.run(["rabbitmqctl", *args], capture_output=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def secrets(bridge: dict[str, str]) -> Iterator[dict[str, str]]:
    """Secrets Manager for the containers: moto's server on the bridge, holding the JWT key."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address=bridge["gateway"], port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("secretsmanager", endpoint_url=endpoint, **BOTO_TEST)
    arn = client.create_secret(Name=f"minichat/samlocal/jwt-{uuid.uuid4().hex[:8]}", SecretString="k" * 64)[
        "ARN"
    ]
    yield {"AWS_ENDPOINT_URL_SECRETS_MANAGER": endpoint, "MINICHAT_JWT_SECRET_ARN": arn}
    server.stop()


@pytest.fixture(scope="module")
def env_file(
    translated: dict[str, Any], bridge: dict[str, str], secrets: dict[str, str], tmp_path_factory: Any
) -> Path:
    """`--env-vars`: each function's declared variables, filled with this machine's services (relayed)
    and the Secrets Manager stand-in."""
    samlocal_env = load_script("infra/samlocal/env.py")
    values = samlocal_env.service_values(
        pg=bridge["pg"],
        redis=bridge["redis"],
        amqp=bridge["amqp"],
        db=DB_NAME,
        redis_db=REDIS_DB,
        vhost=VHOST,
    )
    values.update(secrets)
    path: Path = tmp_path_factory.mktemp("samlocal") / "env.json"
    path.write_text(json.dumps(samlocal_env.function_env(translated, values), indent=2))
    return path


def sam_flags(env_file: Path, bridge: dict[str, str], secrets: dict[str, str]) -> list[str]:
    """What samconfig.toml gives a developer, with this run's addresses; the template's optional Secrets
    Manager endpoint set, so that its variable exists in the containers."""
    return [
        "--env-vars",
        str(env_file),
        "--skip-pull-image",
        "--add-host",
        f"host.docker.internal:{bridge['gateway']}",
        "--parameter-overrides",
        f"SecretsManagerEndpointUrl={secrets['AWS_ENDPOINT_URL_SECRETS_MANAGER']}",
    ]


@pytest.fixture(scope="module")
def invoke(
    sam_build: Path,
    aws_tools: Path,
    env_file: Path,
    bridge: dict[str, str],
    secrets: dict[str, str],
    services: None,
    tmp_path_factory: Any,
) -> Any:
    """invoke(function, event) -> the function's result, through `sam local invoke` (one container a call)."""
    folder = tmp_path_factory.mktemp("events")
    timings: list[tuple[str, float]] = []

    def run(function: str, event: dict[str, Any]) -> Any:
        event_path = folder / f"{uuid.uuid4().hex}.json"
        event_path.write_text(json.dumps(event))
        args = [
            str(aws_tools / "sam"),
            "local",
            "invoke",
            function,
            "--template",
            str(sam_build / "template.yaml"),
            "--event",
            str(event_path),
            *sam_flags(env_file, bridge, secrets),
        ]
        started = time.monotonic()
        result = subprocess.run(
            args, cwd=ROOT, env={**os.environ, **TOOL_ENV}, capture_output=True, text=True, timeout=300
        )
        elapsed = time.monotonic() - started
        timings.append((function, elapsed))
        print(f"sam local invoke {function}: {elapsed:.1f} s\n{result.stderr[-3000:]}")
        assert result.returncode == 0, result.stderr[-3000:]
        lines = [line for line in result.stdout.splitlines() if line.strip()]
        assert lines, f"{function} returned nothing:\n{result.stderr[-3000:]}"
        reply = json.loads(lines[-1])
        assert not (isinstance(reply, dict) and "errorType" in reply), f"{function} failed: {reply}"
        return reply

    return run


@pytest.fixture(scope="module")
def migrated(invoke: Any) -> dict[str, Any]:
    """The migrate function on a database that does not exist yet (that a second run applies nothing is
    the built-artifact tests' to show: one invoke here costs a container)."""
    result: dict[str, Any] = invoke("MigrateFunction", {})
    return result


def test_migrate_function_creates_the_database_migrates_and_declares_the_queues(
    migrated: dict[str, Any],
) -> None:
    from minichat import broker

    expected = sorted(path.name for path in (ROOT / "infra" / "migrations").glob("*.sql"))
    assert migrated["applied"] == expected
    with psycopg.connect(DATABASE_URL) as conn:
        recorded = [row[0] for row in conn.execute("SELECT version FROM schema_migrations ORDER BY 1")]
    assert len(recorded) == len(expected)
    connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    channel = connection.channel()
    for queue in broker.QUEUES:
        channel.queue_declare(queue, passive=True)  # raises when the function did not declare it
    connection.close()


def _drain(queue: str) -> list[bytes]:
    connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    channel = connection.channel()
    bodies = []
    while True:
        method, _properties, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            break
        bodies.append(body)
    connection.close()
    return bodies


def test_relay_function_publishes_the_pending_outbox(invoke: Any, migrated: dict[str, Any]) -> None:
    event_id = uuid.uuid4()
    payload = {"eventId": str(event_id), "type": "samlocal.check"}
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO outbox (event_id, queue, payload) VALUES (%s, 'audit_event', %s)",
            (event_id, json.dumps(payload)),
        )
    _drain("audit_event")
    result = invoke("RelayFunction", scheduled_event("relay"))
    assert result["published"] >= 1
    with psycopg.connect(DATABASE_URL) as conn:
        published = conn.execute(
            "SELECT published_at FROM outbox WHERE event_id = %s", (event_id,)
        ).fetchone()
    assert published is not None and published[0] is not None
    assert any(json.loads(body).get("eventId") == str(event_id) for body in _drain("audit_event"))


def test_reaper_function_fails_a_generation_whose_stream_never_opened(
    invoke: Any, migrated: dict[str, Any]
) -> None:
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        user = conn.execute(
            "INSERT INTO users (email, password_hash) VALUES (%s, 'x') RETURNING id",
            (f"sam-{uuid.uuid4().hex[:10]}@example.com",),
        ).fetchone()
        assert user is not None
        chat = conn.execute("INSERT INTO chats (user_id) VALUES (%s) RETURNING id", (user[0],)).fetchone()
        assert chat is not None
        generation = conn.execute(
            "INSERT INTO generations (chat_id, user_id, model, created_at)"
            " VALUES (%s, %s, 'mock-echo', now() - interval '10 minutes') RETURNING id",
            (chat[0], user[0]),
        ).fetchone()
        assert generation is not None
    result = invoke("ReaperFunction", scheduled_event("reaper"))
    assert result["streamNotOpened"] >= 1, result
    with psycopg.connect(DATABASE_URL) as conn:
        status = conn.execute(
            "SELECT status, error_code FROM generations WHERE id = %s", (generation[0],)
        ).fetchone()
    assert status == ("failed", "stream_not_opened")


def test_worker_function_records_a_usage_batch_and_dead_letters_a_malformed_message(
    invoke: Any, migrated: dict[str, Any]
) -> None:
    event = json.loads((EVENTS / "amazon-mq-usage.json").read_text())
    bodies = [
        json.loads(base64.b64decode(m["data"])) for ms in event["rmqMessagesByQueue"].values() for m in ms
    ]
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:  # the users the sample's events name
        for user_id in {body["userId"] for body in bodies}:
            conn.execute(
                "INSERT INTO users (id, email, password_hash) VALUES (%s, %s, 'x') ON CONFLICT DO NOTHING",
                (user_id, f"{user_id}@example.com"),
            )
    # One batch as Amazon MQ delivers it: the sample's messages plus one that is not JSON.
    (messages,) = event["rmqMessagesByQueue"].values()
    messages.append({**messages[0], "data": "bm90IGpzb24="})  # base64 of "not json"
    result = invoke("WorkerFunction", event)
    assert result["messages"] == len(bodies) + 1
    assert result["dead_lettered"] == 1
    with psycopg.connect(DATABASE_URL) as conn:
        usage = conn.execute("SELECT count(*) FROM usage_events").fetchone()
        dead = conn.execute("SELECT count(*) FROM dead_letters").fetchone()
    assert usage == (result["usage_inserted"],) and result["usage_inserted"] == len(bodies)
    assert dead == (1,)


def _rest_event(method: str, path: str, resource: str, *, body: Any = None, token: str | None = None) -> Any:
    """The sample API Gateway REST proxy event, for another route."""
    event = json.loads((EVENTS / "apigateway-rest-proxy.json").read_text())
    event.update(
        httpMethod=method, path=path, resource=resource, body=None if body is None else json.dumps(body)
    )
    event["requestContext"].update(httpMethod=method, path=f"/dev{path}", resourcePath=resource)
    event["requestContext"]["requestId"] = str(uuid.uuid4())
    if token:
        event["headers"]["Authorization"] = f"Bearer {token}"
        event["multiValueHeaders"]["Authorization"] = [f"Bearer {token}"]
    return event


def test_api_function_registers_a_user_and_serves_a_chat_route(invoke: Any, migrated: dict[str, Any]) -> None:
    """The Chalice app on the Lambda runtime: the JWT key from Secrets Manager (the stand-in), boto3 from
    the runtime, the database through the bridge."""
    email = f"sam-{uuid.uuid4().hex[:10]}@example.com"
    register = invoke(
        "ApiFunction",
        _rest_event(
            "POST",
            "/api/auth/register",
            "/api/auth/register",
            body={"email": email, "password": "pw-" + "x" * 12},
        ),
    )
    assert register["statusCode"] == 201, register
    token = json.loads(register["body"])["accessToken"]
    created = invoke(
        "ApiFunction",
        _rest_event("POST", "/api/chats", "/api/chats", body={"title": "on Lambda"}, token=token),
    )
    assert created["statusCode"] == 201, created
    assert created["headers"]["X-Request-Id"]
    chat_id = json.loads(created["body"])["id"]
    with psycopg.connect(DATABASE_URL) as conn:
        row = conn.execute(
            "SELECT c.title FROM chats c JOIN users u ON u.id = c.user_id WHERE c.id = %s AND u.email = %s",
            (chat_id, email),
        ).fetchone()
    assert row == ("on Lambda",)


def test_start_api_serves_register_chat_and_a_generation(
    sam_build: Path,
    aws_tools: Path,
    env_file: Path,
    bridge: dict[str, str],
    secrets: dict[str, str],
    migrated: dict[str, Any],
) -> None:
    """`sam local start-api`: API Gateway's routes in front of the function containers, over HTTP."""
    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [
            str(aws_tools / "sam"),
            "local",
            "start-api",
            "--template",
            str(sam_build / "template.yaml"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--warm-containers",
            "LAZY",
            *sam_flags(env_file, bridge, secrets),
        ],
        cwd=ROOT,
        env={**os.environ, **TOOL_ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=120) as http:
            deadline = time.monotonic() + 120
            while True:
                try:
                    http.get("/api/health")
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline and process.poll() is None, "start-api did not come up"
                    time.sleep(0.5)
            email = f"sam-{uuid.uuid4().hex[:10]}@example.com"
            started = time.monotonic()
            register = http.post("/api/auth/register", json={"email": email, "password": "pw-" + "x" * 12})
            assert register.status_code == 201, register.text
            headers = {"Authorization": f"Bearer {register.json()['accessToken']}"}
            chat = http.post("/api/chats", json={}, headers=headers)
            assert chat.status_code == 201, chat.text
            generation = http.post(
                f"/api/chats/{chat.json()['id']}/generations", json={"content": "hello"}, headers=headers
            )
            assert generation.status_code == 201, generation.text
            print(f"start-api: register, chat, generation in {time.monotonic() - started:.1f} s")
            body = generation.json()
            assert body["generation"]["status"] == "queued"
            assert body["streamUrl"].split("?")[0].endswith(f"/api/generations/{body['generationId']}/stream")
    finally:
        process.terminate()
        try:
            process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    with psycopg.connect(DATABASE_URL) as conn:
        status = conn.execute(
            "SELECT status FROM generations WHERE id = %s", (body["generationId"],)
        ).fetchone()
    assert status == ("queued",)


def test_the_sam_local_env_file_declares_each_functions_variables(translated: dict[str, Any]) -> None:
    """samconfig.toml's env file for a developer's `sam local`: every variable the template declares,
    nothing it does not (SAM ignores those silently)."""
    written = json.loads((ROOT / "infra" / "samlocal" / "env.json").read_text())
    declared = {
        name: set(resource["Properties"].get("Environment", {}).get("Variables", {}))
        for name, resource in translated["Resources"].items()
        if resource["Type"] == "AWS::Lambda::Function"
    }
    assert {name: set(values) for name, values in written.items()} == declared


def test_purge_function_deletes_week_old_published_outbox_rows(invoke: Any, migrated: dict[str, Any]) -> None:
    old, fresh = uuid.uuid4(), uuid.uuid4()
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        for event_id, age in ((old, "8 days"), (fresh, "1 day")):
            conn.execute(
                "INSERT INTO outbox (event_id, queue, payload, created_at, published_at)"
                " VALUES (%s, 'audit_event', '{}', now() - %s::interval, now() - %s::interval)",
                (event_id, age, age),
            )
    result = invoke("PurgeFunction", scheduled_event("purge"))
    assert result["outbox"] >= 1, result
    with psycopg.connect(DATABASE_URL) as conn:
        left = {
            row[0]
            for row in conn.execute("SELECT event_id FROM outbox WHERE event_id IN (%s, %s)", (old, fresh))
        }
    assert left == {fresh}
