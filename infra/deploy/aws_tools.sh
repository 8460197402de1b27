#!/usr/bin/env bash
# Installs the AWS tools (SAM CLI, cfn-lint, compose-spec, shellcheck) pinned by infra/deploy/aws-tools.txt
# into their own virtualenv, .venv/aws-tools (the SAM CLI's pins clash with the app's constraints.txt).
# Re-installs only when aws-tools.txt changes. Prints the virtualenv's bin directory.
set -euo pipefail
cd "$(dirname "$0")/../.."

venv=${AWS_TOOLS_VENV:-.venv/aws-tools}
requirements=infra/deploy/aws-tools.txt
wanted=$(sha256sum "$requirements" | cut -d' ' -f1)
stamp=$venv/.installed-stamp

if [[ ! -f $stamp || $(cat "$stamp") != "$wanted" ]]; then
  echo "aws_tools: installing $requirements into $venv" >&2
  "${PYTHON:-python3}" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "pip>=24" >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$requirements" >&2
  echo "$wanted" >"$stamp"
fi
cd "$venv/bin" && pwd
