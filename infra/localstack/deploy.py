"""Deploy MiniChat's functions and REST API to LocalStack, from the same template and build as AWS.

    .venv/aws-tools/bin/python infra/localstack/deploy.py --dry-run     # print the plan, touch nothing
    .venv/aws-tools/bin/python infra/localstack/deploy.py [--endpoint http://localhost:4566]

Runs with the AWS tools' interpreter (boto3 and SAM's translator). What it creates comes from
template.yaml as SAM translates it (infra/deploy/sam_translate.py) and from `sam build`'s artifacts:

- the JWT secret in Secrets Manager (the functions read it at cold start, as on AWS);
- the Lambda functions, each zipped with the core layer's python/ folder merged in (LocalStack's free
  edition has no Lambda layers), environment pointed at the compose services by name;
- the REST API, imported from the OpenAPI body SAM generates (the Chalice app's routes), integrations
  pointed at the LocalStack functions;
- the schedules of the outbox relay and the reaper (EventBridge rules).

Not deployed, and why: the stream function (it needs the Lambda Web Adapter layer and response streaming,
which LocalStack does not run: use local mode's stream route), the MQ event source mappings (LocalStack
has no Amazon MQ: infra/localstack/mq_bridge.py plays their part), and the VPC and data services (the
compose file's containers stand in). Then it runs the migrate function once.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import re
import secrets
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# The one loader of files by path (standard library only); this script runs with the AWS tools' Python.
sys.path.insert(0, str(ROOT / "local"))
from minichat_local.functions import load_path  # noqa: E402

REGION = "us-east-1"
ACCOUNT = "000000000000"  # LocalStack's default account
PREFIX = "minichat-local"
# Where the functions (in LocalStack's Lambda containers, on the compose network) find the services.
SERVICE_ENV = {
    "DATABASE_URL": "postgresql://postgres@postgres:5432/minichat",
    "REDIS_URL": "redis://redis:6379/0",
    "RABBITMQ_URL": "amqp://guest:guest@rabbitmq:5672/%2F",
    "MINICHAT_LOG_LEVEL": "INFO",
}
NOT_DEPLOYED = {
    "StreamFunction": "needs the Lambda Web Adapter layer and response streaming (not run by LocalStack)",
}


def function_name(logical_id: str) -> str:
    """ApiFunction -> minichat-local-api (as template.yaml names them, with the local prefix)."""
    return f"{PREFIX}-{logical_id.removesuffix('Function').lower()}"


def function_arn(logical_id: str) -> str:
    return f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{function_name(logical_id)}"


def plan(template: dict[str, Any]) -> dict[str, Any]:
    """What to create, read from the translated template."""
    resources = template["Resources"]
    functions = {}
    for logical_id, resource in sorted(resources.items()):
        if resource["Type"] != "AWS::Lambda::Function" or logical_id in NOT_DEPLOYED:
            continue
        props = resource["Properties"]
        env = {
            key: value for key, value in props["Environment"]["Variables"].items() if isinstance(value, str)
        }
        functions[logical_id] = {
            "name": function_name(logical_id),
            "handler": props["Handler"],
            "runtime": props["Runtime"],
            "timeout": props.get("Timeout", 30),
            "memory": props.get("MemorySize", 1024),
            "environment": {**{k: v for k, v in env.items() if k.startswith("MINICHAT_")}, **SERVICE_ENV},
        }
    (api,) = (r for r in resources.values() if r["Type"] == "AWS::ApiGateway::RestApi")
    body = copy.deepcopy(api["Properties"]["Body"])
    routes = []
    for path, item in list(body["paths"].items()):
        for method, operation in list(item.items()):
            integration = operation["x-amazon-apigateway-integration"]
            target = re.search(r"\$\{(\w+)\.Arn\}", json.dumps(integration["uri"]))
            assert target, integration
            logical_id = target.group(1)
            if logical_id not in functions:
                del item[method]
                routes.append((method.upper(), path, None))
                continue
            integration["uri"] = (
                f"arn:aws:apigateway:{REGION}:lambda:path/2015-03-31/functions/{function_arn(logical_id)}/invocations"
            )
            routes.append((method.upper(), path, functions[logical_id]["name"]))
        if not item:
            del body["paths"][path]
    schedules = []
    for rule in (r for r in resources.values() if r["Type"] == "AWS::Events::Rule"):
        for target in rule["Properties"]["Targets"]:
            logical_id = target["Arn"]["Fn::GetAtt"][0]
            schedules.append((function_name(logical_id), rule["Properties"]["ScheduleExpression"]))
    return {"functions": functions, "api_body": body, "routes": routes, "schedules": sorted(schedules)}


def print_plan(the_plan: dict[str, Any], *, build_dir: Path, endpoint: str, stage: str) -> None:
    print(f"LocalStack endpoint {endpoint}, region {REGION}, stage {stage}")
    print(f"secret    {PREFIX}/jwt (generated, 64 characters) -> MINICHAT_JWT_SECRET_ARN")
    for logical_id, function in the_plan["functions"].items():
        print(
            f"function  {function['name']:24} {function['handler']:22} {function['runtime']}"
            f" timeout {function['timeout']}s  code {build_dir.name}/{logical_id} + the layer"
        )
    for logical_id, reason in NOT_DEPLOYED.items():
        print(f"skip      {logical_id}: {reason}")
    print(
        "skip      MQ event source mappings: LocalStack has no Amazon MQ (run infra/localstack/mq_bridge.py)"
    )
    print(f"rest-api  {PREFIX} (OpenAPI from template.yaml), stage {stage}:")
    for method, path, target in sorted(the_plan["routes"], key=lambda route: (route[1], route[0])):
        print(f"  route   {method:6} {path:45} -> {target or 'not deployed (stream function)'}")
    for name, expression in the_plan["schedules"]:
        print(f"schedule  {name} {expression}")
    print(f"invoke    {function_name('MigrateFunction')} (apply the migrations)")


def zip_function(build_dir: Path, logical_id: str) -> bytes:
    """The function's folder with the layer's python/ merged in (what /var/task + /opt/python hold)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for base in (build_dir / "CoreLayer" / "python", build_dir / logical_id):
            for file in sorted(p for p in base.rglob("*") if p.is_file()):
                info = zipfile.ZipInfo.from_file(file, file.relative_to(base))
                with file.open("rb") as handle:
                    archive.writestr(info, handle.read(), zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


def deploy(
    the_plan: dict[str, Any], *, build_dir: Path, endpoint: str, stage: str, migrate: bool = True
) -> str:
    from urllib.parse import urlsplit

    from localstack_client.session import Session  # LocalStack's endpoint and test credentials

    session = Session(region_name=REGION, localstack_host=urlsplit(endpoint).netloc)
    client = {
        name: session.client(name) for name in ("secretsmanager", "lambda", "apigateway", "events", "iam")
    }

    secret_name = f"{PREFIX}/jwt"
    try:
        secret_arn = client["secretsmanager"].describe_secret(SecretId=secret_name)["ARN"]
    except client["secretsmanager"].exceptions.ResourceNotFoundException:
        secret_arn = client["secretsmanager"].create_secret(
            Name=secret_name, SecretString=secrets.token_urlsafe(48)
        )["ARN"]
    print(f"secret    {secret_arn}")

    role_name = f"{PREFIX}-lambda"
    assume = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"}, "Action": "sts:AssumeRole"}
        ],
    }
    try:
        role_arn = client["iam"].get_role(RoleName=role_name)["Role"]["Arn"]
    except client["iam"].exceptions.NoSuchEntityException:
        role_arn = client["iam"].create_role(RoleName=role_name, AssumeRolePolicyDocument=json.dumps(assume))[
            "Role"
        ]["Arn"]

    lam = client["lambda"]
    for logical_id, function in the_plan["functions"].items():
        code = zip_function(build_dir, logical_id)
        env = {"Variables": {**function["environment"], "MINICHAT_JWT_SECRET_ARN": secret_arn}}
        try:
            lam.get_function(FunctionName=function["name"])
            lam.update_function_code(FunctionName=function["name"], ZipFile=code)
            lam.get_waiter("function_updated_v2").wait(FunctionName=function["name"])
            lam.update_function_configuration(
                FunctionName=function["name"],
                Environment=env,
                Handler=function["handler"],
                Timeout=function["timeout"],
            )
        except lam.exceptions.ResourceNotFoundException:
            lam.create_function(
                FunctionName=function["name"],
                Runtime=function["runtime"],
                Handler=function["handler"],
                Role=role_arn,
                Code={"ZipFile": code},
                Timeout=function["timeout"],
                MemorySize=function["memory"],
                Environment=env,
            )
        lam.get_waiter("function_active_v2").wait(FunctionName=function["name"])
        print(f"function  {function['name']} ({len(code) / 1e6:.1f} MB zipped)")

    apigw = client["apigateway"]
    existing = [api["id"] for api in apigw.get_rest_apis()["items"] if api["name"] == PREFIX]
    body = dict(the_plan["api_body"], info={"title": PREFIX, "version": "1.0"})
    if existing:
        api_id = apigw.put_rest_api(restApiId=existing[0], mode="overwrite", body=json.dumps(body))["id"]
    else:
        api_id = apigw.import_rest_api(body=json.dumps(body))["id"]
    apigw.create_deployment(restApiId=api_id, stageName=stage)

    events = client["events"]
    for name, expression in the_plan["schedules"]:
        rule_arn = events.put_rule(Name=f"{name}-schedule", ScheduleExpression=expression)["RuleArn"]
        events.put_targets(Rule=f"{name}-schedule", Targets=[{"Id": name, "Arn": function_arn_of(lam, name)}])
        print(f"schedule  {rule_arn}")

    url = f"{endpoint}/restapis/{api_id}/{stage}/_user_request_"
    if migrate:
        run_migrate(lam)
    print(f"api       {url}/api/health")
    return url


def run_migrate(lam: Any) -> None:
    """Invoke the migrate function (needs LocalStack's Lambda to execute functions)."""
    migrate = function_name("MigrateFunction")
    for attempt in range(3):
        result = lam.invoke(FunctionName=migrate, Payload=b"{}")
        payload = result["Payload"].read().decode()
        if "FunctionError" not in result:
            print(f"migrate   {payload}")
            break
        print(f"migrate   failed ({payload}); retrying", file=sys.stderr)
        time.sleep(2 * (attempt + 1))
    else:
        raise SystemExit("the migrate function failed three times")


def function_arn_of(lam: Any, name: str) -> str:
    arn: str = lam.get_function(FunctionName=name)["Configuration"]["FunctionArn"]
    return arn


def main() -> int:
    parser = argparse.ArgumentParser(description="Deploy MiniChat to LocalStack (see the module docstring).")
    parser.add_argument("--dry-run", action="store_true", help="print what would be created and stop")
    parser.add_argument("--endpoint", default="http://localhost:4566")
    parser.add_argument("--stage", default="dev")
    parser.add_argument(
        "--no-migrate",
        action="store_true",
        help="deploy only: skip the migrate invocation (a LocalStack that cannot execute functions)",
    )
    args = parser.parse_args()

    template = load_path(ROOT / "infra" / "deploy" / "sam_translate.py").translate(ROOT / "template.yaml")
    the_plan = plan(template)
    build_dir = Path("(sam build)")
    if args.dry_run:
        print_plan(the_plan, build_dir=build_dir, endpoint=args.endpoint, stage=args.stage)
        return 0
    build_dir = load_path(ROOT / "infra" / "deploy" / "sam_build.py").ensure_built()
    print_plan(the_plan, build_dir=build_dir, endpoint=args.endpoint, stage=args.stage)
    deploy(
        the_plan, build_dir=build_dir, endpoint=args.endpoint, stage=args.stage, migrate=not args.no_migrate
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
