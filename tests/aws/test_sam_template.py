"""template.yaml checked statically: cfn-lint, `sam validate --lint`, and what SAM's transform makes of it.

The transform's output (infra/deploy/sam_translate.py, the same library CloudFormation runs) is what gets
deployed, so the REST API, the event source mappings and the IAM policies are checked there — against
the code: the Chalice app's routes, the stream app's route, the queue names of minichat.broker.
"""

from __future__ import annotations

import ast
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from aws_support import ROOT, load_script, run_tool

pytestmark = pytest.mark.slow

STREAM_TIMEOUT_MS = 900_000
NO_VALUE = {"Ref": "AWS::NoValue"}


def _resources(translated: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {name: res for name, res in translated["Resources"].items() if res["Type"] == kind}


def _function_of(uri: Any) -> str:
    """The function logical id an API Gateway integration URI points at."""
    text = json.dumps(uri)
    match = re.search(r"\$\{(\w+)\.Arn\}", text)
    assert match, text
    return match.group(1)


def test_cfn_lint_reports_nothing(aws_tools: Path) -> None:
    # Errors and warnings both fail (exit code 0 only when cfn-lint matched no rule at all).
    run_tool([str(aws_tools / "cfn-lint"), "--format", "parseable", "template.yaml"])


def test_sam_validate_lint(aws_tools: Path) -> None:
    result = run_tool([str(aws_tools / "sam"), "validate", "--lint", "--template", "template.yaml"])
    assert "is a valid SAM Template" in result.stdout + result.stderr


def test_template_events_match_the_chalice_app() -> None:
    # The plain-text check infra/deploy/api_routes.py --check makes (it prints the block to paste).
    api_routes = load_script("infra/deploy/api_routes.py")
    assert api_routes.template_events("ApiFunction") == api_routes.chalice_routes()
    assert api_routes.template_events("StreamFunction") == api_routes.stream_routes()


def test_rest_api_routes_are_exactly_the_apps_routes(translated: dict[str, Any]) -> None:
    api_routes = load_script("infra/deploy/api_routes.py")
    (api,) = _resources(translated, "AWS::ApiGateway::RestApi").values()
    paths = api["Properties"]["Body"]["paths"]
    deployed = {
        (path, method.upper()): op["x-amazon-apigateway-integration"]
        for path, item in paths.items()
        for method, op in item.items()
    }
    chalice, stream = api_routes.chalice_routes(), api_routes.stream_routes()
    assert set(deployed) == chalice | stream
    for route in chalice:
        integration = deployed[route]
        assert integration["type"] == "aws_proxy"
        assert _function_of(integration["uri"]) == "ApiFunction"
        assert "responseTransferMode" not in integration
    for route in stream:
        integration = deployed[route]
        assert integration["type"] == "aws_proxy"
        assert _function_of(integration["uri"]) == "StreamFunction"
        assert integration["responseTransferMode"] == "STREAM"
        assert integration["timeoutInMillis"] == STREAM_TIMEOUT_MS
        assert "/2021-11-15/functions/" in json.dumps(integration["uri"])
        assert "/response-streaming-invocations" in json.dumps(integration["uri"])


def test_one_rest_api_and_an_api_url_output(translated: dict[str, Any]) -> None:
    assert len(_resources(translated, "AWS::ApiGateway::RestApi")) == 1
    assert not _resources(translated, "AWS::ApiGatewayV2::Api")  # HTTP APIs cannot stream
    assert "MiniChatApi" in json.dumps(translated["Outputs"]["ApiUrl"]["Value"])


def _function(translated: dict[str, Any], name: str) -> dict[str, Any]:
    props: dict[str, Any] = translated["Resources"][name]["Properties"]
    return props


def _handler_exists(code_dir: str, handler: str) -> bool:
    module, _, attribute = handler.rpartition(".")
    tree = ast.parse((ROOT / code_dir / f"{module}.py").read_text())
    names = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            names |= {target.id for target in node.targets if isinstance(target, ast.Name)}
    return attribute in names


@pytest.mark.parametrize(
    ("name", "code_dir", "handler"),
    [
        ("ApiFunction", "functions/api", "app.app"),
        ("WorkerFunction", "functions/worker", "handler.handler"),
        ("RelayFunction", "functions/worker", "jobs.relay_handler"),
        ("ReaperFunction", "functions/worker", "jobs.reaper_handler"),
        ("PurgeFunction", "functions/worker", "jobs.purge_handler"),
        ("MigrateFunction", "functions/worker", "jobs.migrate_handler"),
    ],
)
def test_python_handlers_exist(translated: dict[str, Any], name: str, code_dir: str, handler: str) -> None:
    function = _function(translated, name)
    assert function["Handler"] == handler
    assert function["Runtime"] == "python3.12"
    assert _handler_exists(code_dir, handler)


def test_stream_function_runs_behind_the_web_adapter(translated: dict[str, Any]) -> None:
    function = _function(translated, "StreamFunction")
    assert function["Handler"] == "run.sh"
    assert (ROOT / "functions" / "stream" / "run.sh").stat().st_mode & 0o111
    assert function["Timeout"] == 900
    env = function["Environment"]["Variables"]
    # SPEC §7.4: connections per user are limited, and the function's concurrency is reserved (and capped).
    reserved = function["ReservedConcurrentExecutions"]
    assert reserved == {
        "Fn::If": ["ReservesStreamConcurrency", {"Ref": "StreamReservedConcurrency"}, NO_VALUE]
    }
    prod = tomllib.loads((ROOT / "samconfig.toml").read_text())["prod"]["deploy"]["parameters"]
    assert "StreamReservedConcurrency=" in prod["parameter_overrides"]
    assert env["MINICHAT_MAX_STREAMS_PER_USER"] == {"Ref": "MaxStreamsPerUser"}
    assert env["AWS_LAMBDA_EXEC_WRAPPER"] == "/opt/bootstrap"
    assert env["AWS_LWA_INVOKE_MODE"] == "response_stream"
    assert env["AWS_LWA_READINESS_CHECK_PATH"] == "/_ready"
    layers = json.dumps(function["Layers"])
    assert ":753240598075:layer:LambdaAdapterLayerX86:" in layers
    assert layers.count("CoreLayer") == 1  # Globals' layer plus the adapter, not the core twice
    # The readiness path is a route of the stream app.
    assert '"/_ready"' in (ROOT / "functions" / "stream" / "app.py").read_text()


def test_worker_consumes_both_queues_from_amazon_mq(translated: dict[str, Any]) -> None:
    from minichat import broker

    mappings = _resources(translated, "AWS::Lambda::EventSourceMapping")
    queues = {}
    for mapping in mappings.values():
        props = mapping["Properties"]
        assert props["FunctionName"] == {"Ref": "WorkerFunction"}
        assert "Broker" in json.dumps(props["EventSourceArn"])
        assert 1 <= props["BatchSize"] <= 10_000
        assert 0 <= props["MaximumBatchingWindowInSeconds"] <= 300
        access = {item["Type"]: item["URI"] for item in props["SourceAccessConfigurations"]}
        assert "BrokerSecret" in json.dumps(access["BASIC_AUTH"])
        assert access["VIRTUAL_HOST"] == "/"
        (queue,) = props["Queues"]
        queues[queue] = props
    assert set(queues) == set(broker.QUEUES)


def _statements(translated: dict[str, Any], role: str) -> list[dict[str, Any]]:
    policies = translated["Resources"][role]["Properties"].get("Policies", [])
    # A conditional policy ({"Fn::If": [condition, policy, AWS::NoValue]}) counts with its condition true.
    policies = [p["Fn::If"][1] if "Fn::If" in p else p for p in policies]
    return [st for policy in policies for st in policy["PolicyDocument"]["Statement"]]


def test_worker_role_has_the_mq_network_permissions(translated: dict[str, Any]) -> None:
    actions = {a for st in _statements(translated, "WorkerFunctionRole") for a in _actions(st)}
    assert {
        "ec2:CreateNetworkInterface",
        "ec2:DeleteNetworkInterface",
        "ec2:DescribeNetworkInterfaces",
        "ec2:DescribeSecurityGroups",
        "ec2:DescribeSubnets",
        "ec2:DescribeVpcs",
        "mq:DescribeBroker",
        "secretsmanager:GetSecretValue",
    } <= actions


def _actions(statement: dict[str, Any]) -> list[str]:
    actions = statement["Action"]
    return [actions] if isinstance(actions, str) else list(actions)


def test_iam_is_least_privilege(translated: dict[str, Any]) -> None:
    network = {
        "ec2:CreateNetworkInterface",
        "ec2:DeleteNetworkInterface",
        "ec2:DescribeNetworkInterfaces",
        "ec2:DescribeSecurityGroups",
        "ec2:DescribeSubnets",
        "ec2:DescribeVpcs",
    }
    for role in _resources(translated, "AWS::IAM::Role"):
        for statement in _statements(translated, role):
            assert statement["Effect"] == "Allow"
            for action in _actions(statement):
                assert "*" not in action, (role, action)
            if statement["Resource"] == "*":
                assert set(_actions(statement)) <= network, (role, statement)
            if "secretsmanager:GetSecretValue" in _actions(statement):
                assert "Secret" in json.dumps(statement["Resource"]), (role, statement)
        allowed = {"AWSLambdaBasicExecutionRole", "AWSLambdaVPCAccessExecutionRole"}
        for arn in translated["Resources"][role]["Properties"].get("ManagedPolicyArns", []):
            assert arn.rsplit("/", 1)[-1] in allowed, (role, arn)


def test_each_function_reads_only_the_secrets_its_environment_names(translated: dict[str, Any]) -> None:
    for name, function in _resources(translated, "AWS::Lambda::Function").items():
        env = function["Properties"]["Environment"]["Variables"]
        named = {json.dumps(value) for key, value in env.items() if key.endswith("_SECRET_ARN")}
        role = function["Properties"]["Role"]["Fn::GetAtt"][0]
        readable = {
            json.dumps(st["Resource"])
            for st in _statements(translated, role)
            if "secretsmanager:GetSecretValue" in _actions(st)
        }
        for secret in named:
            reference = [ref for ref in re.findall(r'"Ref": "([\w:]+)"', secret) if ref != "AWS::NoValue"]
            assert reference, (name, secret)
            assert any(all(f'"{ref}"' in r for ref in reference) for r in readable), (name, secret)


def test_no_credential_sits_in_a_function_configuration(translated: dict[str, Any]) -> None:
    for name, function in _resources(translated, "AWS::Lambda::Function").items():
        for key, value in function["Properties"]["Environment"]["Variables"].items():
            text = json.dumps(value)
            assert "{{resolve:" not in text, (name, key)
            assert "@" not in text, (name, key)  # URLs name hosts only; minichat.secrets adds the user


def test_schedules_run_the_relay_and_the_reaper_every_minute(translated: dict[str, Any]) -> None:
    rules = _resources(translated, "AWS::Events::Rule")
    targets = {
        json.dumps(target["Arn"]): rule["Properties"]["ScheduleExpression"]
        for rule in rules.values()
        for target in rule["Properties"]["Targets"]
    }
    by_function = {re.search(r'"(\w+Function)"', arn).group(1): expr for arn, expr in targets.items()}  # type: ignore[union-attr]
    assert by_function.pop("PurgeFunction") == "rate(1 hour)"  # issue 11: expired keys, old rows
    assert by_function == {"RelayFunction": "rate(1 minute)", "ReaperFunction": "rate(1 minute)"}


def test_each_reaper_run_covers_its_minute(translated: dict[str, Any]) -> None:
    """SPEC: a generation queued with no stream is failed at 60 s. The schedule fires once a minute; each
    run watches jobs.REAPER_WINDOW_S (at least that minute) and needs the time to finish its last round."""
    tree = ast.parse((ROOT / "functions" / "worker" / "jobs.py").read_text())
    window = next(
        node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "REAPER_WINDOW_S" for t in node.targets)
        and isinstance(node.value, ast.Constant)
    )
    assert window >= 60
    assert _function(translated, "ReaperFunction")["Timeout"] >= window + 10


def test_data_services_are_created_or_taken_as_parameters(translated: dict[str, Any]) -> None:
    resources = translated["Resources"]
    for name in ("Database", "Cache", "Broker", "Vpc", "NatGateway", "DatabaseSecret", "BrokerSecret"):
        assert resources[name]["Condition"] == "CreateData", name
    assert resources["Cache"]["Properties"]["TransitEncryptionEnabled"] is True
    assert resources["Broker"]["Properties"]["EngineType"] == "RABBITMQ"
    assert resources["Broker"]["Properties"]["PubliclyAccessible"] is False
    assert resources["Database"]["Properties"]["PubliclyAccessible"] is False
    rules = yaml_free_rules()
    for parameter in (
        "ExistingDatabaseUrl",
        "ExistingDatabaseSecretArn",
        "ExistingRedisUrl",
        "ExistingBrokerArn",
        "ExistingBrokerAmqpsUrl",
        "ExistingBrokerSecretArn",
    ):
        assert parameter in rules, parameter
    # Amazon MQ for RabbitMQ speaks AMQPS on 5671 only.
    ingress = resources["BrokerSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    assert {(rule["FromPort"], rule["ToPort"]) for rule in ingress} == {(5671, 5671)}


def yaml_free_rules() -> str:
    """The template's Rules section as text (enough to see which parameters it asserts on)."""
    text = (ROOT / "template.yaml").read_text()
    return text.split("\nRules:\n", 1)[1].split("\nConditions:\n", 1)[0]


def test_the_jwt_key_is_generated_and_read_from_secrets_manager(translated: dict[str, Any]) -> None:
    secret = translated["Resources"]["JwtSecret"]["Properties"]
    assert secret["GenerateSecretString"]["PasswordLength"] >= 32  # 256 bits, as config.py requires
    for name in ("ApiFunction", "StreamFunction"):
        env = _function(translated, name)["Environment"]["Variables"]
        assert env["MINICHAT_JWT_SECRET_ARN"] == {"Ref": "JwtSecret"}


def test_samconfig_has_a_dev_and_a_prod_environment() -> None:
    config = tomllib.loads((ROOT / "samconfig.toml").read_text())
    for env, stack in (("default", "minichat-dev"), ("prod", "minichat-prod")):
        assert config[env]["global"]["parameters"]["stack_name"] == stack
        deploy = config[env]["deploy"]["parameters"]
        assert "CAPABILITY_IAM" in deploy["capabilities"]
        name = "dev" if env == "default" else "prod"
        assert f"Environment={name}" in deploy["parameter_overrides"]


def test_sample_events_exist_for_sam_local_invoke(translated: dict[str, Any]) -> None:
    # `sam local invoke -e` takes these (docs/aws.md); they must stay valid JSON of the shapes the
    # functions receive, on routes the REST API has (the stream one is what the Web Adapter turns into
    # GET /api/generations/{id}/stream?ticket=... with Last-Event-ID).
    for name in ("apigateway-rest-proxy.json", "amazon-mq-usage.json", "amazon-mq-audit.json"):
        event = json.loads((ROOT / "tests" / "events" / name).read_text())
        assert event
    (api,) = _resources(translated, "AWS::ApiGateway::RestApi").values()
    paths = api["Properties"]["Body"]["paths"]
    for name in ("apigateway-rest-proxy.json", "apigateway-rest-proxy-stream.json"):
        proxy = json.loads((ROOT / "tests" / "events" / name).read_text())
        assert proxy["requestContext"]["resourcePath"] == proxy["resource"]
        assert proxy["httpMethod"].lower() in paths[proxy["resource"]], name
    stream = json.loads((ROOT / "tests" / "events" / "apigateway-rest-proxy-stream.json").read_text())
    assert stream["queryStringParameters"]["ticket"] and stream["headers"]["Last-Event-ID"]


def test_the_web_adapter_layer_is_a_version_the_adapter_publishes(translated: dict[str, Any]) -> None:
    # 26 is the version the adapter's README gives for zip functions (LambdaAdapterLayerX86:26; see the
    # parameter's comment for where and when). 30 was never published: it rolled the stack back.
    parameter = translated["Parameters"]["WebAdapterLayerVersion"]
    assert parameter["Default"] == 26
    layers = json.dumps(_function(translated, "StreamFunction")["Layers"])
    assert "LambdaAdapterLayerX86:${WebAdapterLayerVersion}" in layers


def test_gateway_responses_carry_the_request_id_and_retry_after(translated: dict[str, Any]) -> None:
    (api,) = _resources(translated, "AWS::ApiGateway::RestApi").values()
    responses = api["Properties"]["Body"]["x-amazon-apigateway-gateway-responses"]
    assert {"DEFAULT_4XX", "DEFAULT_5XX", "THROTTLED", "MISSING_AUTHENTICATION_TOKEN"} <= set(responses)
    for name, response in responses.items():
        headers = response.get("responseParameters", {})
        assert headers.get("gatewayresponse.header.X-Request-Id") == "context.requestId", name
        body = response["responseTemplates"]["application/json"]
        assert '"requestId": "$context.requestId"' in body, name
    assert responses["THROTTLED"]["responseParameters"]["gatewayresponse.header.Retry-After"] == "'1'"


def test_every_function_logs_to_a_group_with_a_retention(translated: dict[str, Any]) -> None:
    groups = _resources(translated, "AWS::Logs::LogGroup")
    for name, function in _resources(translated, "AWS::Lambda::Function").items():
        ref = function["Properties"].get("LoggingConfig", {}).get("LogGroup", {}).get("Ref")
        assert ref in groups, name
        assert groups[ref]["Properties"]["RetentionInDays"] == {"Ref": "LogRetentionDays"}


def test_each_lambda_environment_holds_a_small_database_pool(translated: dict[str, Any]) -> None:
    # Environments x pool size must fit the database's max_connections (no RDS Proxy by default).
    assert translated["Parameters"]["DatabasePoolSize"]["Default"] == 2
    for name, function in _resources(translated, "AWS::Lambda::Function").items():
        env = function["Properties"]["Environment"]["Variables"]
        assert env["MINICHAT_DB_POOL_MAX"] == {"Ref": "DatabasePoolSize"}, name


def test_every_function_knows_the_daily_budget(translated: dict[str, Any]) -> None:
    # The API checks it; the stream and reaper functions add each generation's usage to its counter.
    assert translated["Parameters"]["DailyTokenBudget"]["Default"] == 0
    for name, function in _resources(translated, "AWS::Lambda::Function").items():
        env = function["Properties"]["Environment"]["Variables"]
        assert env["MINICHAT_DAILY_TOKEN_BUDGET"] == {"Ref": "DailyTokenBudget"}, name


def test_an_optional_rds_proxy_stands_between_the_functions_and_the_database(
    translated: dict[str, Any],
) -> None:
    resources = translated["Resources"]
    proxy = resources["DatabaseProxy"]
    assert proxy["Condition"] == "CreateProxy"
    assert proxy["Properties"]["RequireTLS"] is True
    assert proxy["Properties"]["Auth"][0]["SecretArn"] == {"Ref": "DatabaseSecret"}
    targets = resources["DatabaseProxyTargets"]["Properties"]
    assert targets["DBInstanceIdentifiers"] == [{"Ref": "Database"}]
    # Only the functions reach the proxy, and the database admits the proxy.
    (ingress,) = resources["DatabaseProxySecurityGroup"]["Properties"]["SecurityGroupIngress"]
    assert ingress["SourceSecurityGroupId"] == {"Ref": "FunctionSecurityGroup"}
    assert resources["DatabaseFromProxyIngress"]["Properties"]["SourceSecurityGroupId"] == {
        "Ref": "DatabaseProxySecurityGroup"
    }
    # With the proxy, every function's DATABASE_URL names its endpoint.
    for name, function in _resources(translated, "AWS::Lambda::Function").items():
        url = function["Properties"]["Environment"]["Variables"]["DATABASE_URL"]
        assert url["Fn::If"][0] == "CreateProxy", name
        assert "DatabaseProxy.Endpoint" in json.dumps(url["Fn::If"][1]), name


def _evaluate(node: Any, params: dict[str, Any]) -> Any:
    """The few intrinsic functions the Bedrock policy uses (Ref, Fn::Sub, Fn::Join, Fn::Split)."""
    if isinstance(node, list):
        return [_evaluate(item, params) for item in node]
    if not isinstance(node, dict):
        return node
    if "Ref" in node:
        return params[node["Ref"]]
    if "Fn::Join" in node:
        separator, items = _evaluate(node["Fn::Join"], params)
        return separator.join(items)
    if "Fn::Split" in node:
        separator, text = _evaluate(node["Fn::Split"], params)
        return text.split(separator)
    if "Fn::Sub" in node:
        spec = node["Fn::Sub"]
        text, names = (spec, {}) if isinstance(spec, str) else (spec[0], _evaluate(spec[1], params))
        return re.sub(r"\$\{([\w:]+)\}", lambda m: str({**params, **names}[m.group(1)]), text)
    return {key: _evaluate(value, params) for key, value in node.items()}


def test_only_the_stream_function_may_invoke_the_configured_bedrock_models(
    translated: dict[str, Any],
) -> None:
    bedrock = [
        (role, st)
        for role in _resources(translated, "AWS::IAM::Role")
        for st in _statements(translated, role)
        if any(action.startswith("bedrock:") for action in _actions(st))
    ]
    assert [role for role, _ in bedrock] == ["StreamFunctionRole"]
    (_, statement), *_ = bedrock
    assert sorted(_actions(statement)) == ["bedrock:InvokeModel", "bedrock:InvokeModelWithResponseStream"]
    params = {
        "AWS::Partition": "aws",
        "AWS::AccountId": "123456789012",
        "BedrockModels": "us.anthropic.claude-3-5-haiku-20241022-v1:0,amazon.nova-lite-v1:0",
    }
    resources = set(_evaluate(statement["Resource"], params))
    assert resources == {
        "arn:aws:bedrock:*::foundation-model/us.anthropic.claude-3-5-haiku-20241022-v1:0",
        "arn:aws:bedrock:*::foundation-model/amazon.nova-lite-v1:0",
        "arn:aws:bedrock:*:123456789012:inference-profile/us.anthropic.claude-3-5-haiku-20241022-v1:0",
        "arn:aws:bedrock:*:123456789012:inference-profile/amazon.nova-lite-v1:0",
        # the foundation model the US profile routes to, in whichever region it picks
        "arn:aws:bedrock:*::foundation-model/anthropic.claude-3-5-haiku-20241022-v1:0",
    }
    for name in ("ApiFunction", "StreamFunction"):
        env = translated["Resources"][name]["Properties"]["Environment"]["Variables"]
        assert env["MINICHAT_BEDROCK_MODELS"] == {"Ref": "BedrockModels"}
        assert "MINICHAT_BEDROCK_REGION" in env and "MINICHAT_OPENAI_SERVERS" in env
