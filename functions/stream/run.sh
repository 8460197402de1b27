#!/bin/bash
# Entry point of the stream function on AWS Lambda. The Lambda Web Adapter layer
# (AWS_LAMBDA_EXEC_WRAPPER=/opt/bootstrap, AWS_LWA_INVOKE_MODE=response_stream) runs this script,
# waits for the readiness check on $PORT, then forwards each invocation as an HTTP request and streams
# the response back. One uvicorn worker: a Lambda environment serves one request at a time.
export PYTHONPATH="${LAMBDA_TASK_ROOT:-.}:/opt/python:${PYTHONPATH:-}"
exec python -m uvicorn app:app \
  --host 127.0.0.1 --port "${PORT:-8080}" \
  --no-access-log --log-level warning --timeout-graceful-shutdown 5
