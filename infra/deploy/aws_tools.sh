#!/usr/bin/env bash
# Installs the AWS tools (SAM CLI, cfn-lint, compose-spec, shellcheck) pinned by infra/deploy/aws-tools.txt
# into their own virtualenv, .venv/aws-tools (the SAM CLI's pins clash with the app's constraints.txt).
# Re-installs only when aws-tools.txt changes. Prints the virtualenv's bin directory.
set -euo pipefail
cd "$(dirname "$0")/../.."

venv=${AWS_TOOLS_VENV:-.venv/aws-tools}
requirements=infra/deploy/aws-tools.txt
wanted="$(sha256sum "$requirements" | cut -d' ' -f1) compiled"  # the .pyc files too (below)
stamp=$venv/.installed-stamp

if [[ ! -f $stamp || $(cat "$stamp") != "$wanted" ]]; then
  echo "aws_tools: installing $requirements into $venv" >&2
  if [[ -x .venv/bin/uv ]]; then  # `make setup`'s uv: seconds instead of half a minute
    .venv/bin/uv venv -q --seed --allow-existing --python "${PYTHON:-python3}" "$venv" >&2
    # --compile-bytecode: the .pyc files pip writes (uv writes none by default, and compiles only what it
    # installs: --reinstall); without them, where PYTHONDONTWRITEBYTECODE is set, every sam or cfn-lint call
    # compiles what it imports (`sam local invoke --help`: 1.57 s, not 0.58).
    .venv/bin/uv pip install -q --reinstall --compile-bytecode --python "$venv/bin/python" -r "$requirements" >&2
  else
    "${PYTHON:-python3}" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "pip>=24" >&2
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$requirements" >&2
  fi
  echo "$wanted" >"$stamp"
fi
cd "$venv/bin" && pwd
