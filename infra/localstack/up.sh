#!/usr/bin/env bash
# The LocalStack loop, for machines with Docker (docs/aws.md):
#   1. the compose file's LocalStack, PostgreSQL, Redis and RabbitMQ;
#   2. sam build (the same artifacts as for AWS);
#   3. infra/localstack/deploy.py: secret, functions, REST API, schedules, migrations;
#   4. infra/localstack/mq_bridge.py in the foreground: RabbitMQ -> the worker function (Ctrl-C stops it).
# With --dry-run it prints what each step would do and runs nothing that needs Docker or LocalStack.
set -euo pipefail
cd "$(dirname "$0")/../.."

dry_run=""
if [[ ${1:-} == "--dry-run" ]]; then
  dry_run="--dry-run"
elif [[ $# -gt 0 ]]; then
  echo "usage: $0 [--dry-run]" >&2
  exit 2
fi

compose=(docker compose -f localstack-compose.yml)
endpoint=${LOCALSTACK_ENDPOINT:-http://localhost:4566}
tools=$(bash infra/deploy/aws_tools.sh)

if [[ -n $dry_run ]]; then
  echo "would run: ${compose[*]} up -d --wait"
else
  if [[ -z ${LOCALSTACK_AUTH_TOKEN:-} ]]; then
    echo "up.sh: set LOCALSTACK_AUTH_TOKEN (LocalStack requires an auth token)" >&2
    exit 1
  fi
  "${compose[@]}" up -d --wait
fi

"$tools/python" infra/localstack/deploy.py --endpoint "$endpoint" ${dry_run:+"$dry_run"}

if [[ ! -x .venv/bin/python ]]; then
  make setup
fi
exec env RABBITMQ_URL="${RABBITMQ_URL:-amqp://guest:guest@127.0.0.1:5672/%2F}" \
  .venv/bin/python infra/localstack/mq_bridge.py --endpoint "$endpoint" ${dry_run:+"$dry_run"}
