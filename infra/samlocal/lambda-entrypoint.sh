#!/bin/bash
# The image's entry point, as in AWS's base images: under the Runtime Interface Emulator when it is there
# (SAM mounts its own at /var/rapid and starts it itself), else the runtime bootstrap alone.
if [[ $# -gt 0 ]]; then export _HANDLER=$1; fi
if [[ -z ${AWS_LAMBDA_RUNTIME_API:-} && -x /usr/local/bin/aws-lambda-rie ]]; then
  exec /usr/local/bin/aws-lambda-rie /var/runtime/bootstrap
fi
exec /var/runtime/bootstrap
