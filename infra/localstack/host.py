"""LocalStack without its Docker image: `localstack-core` in host mode, on loopback, for the deploy loop.

    python3 infra/localstack/host.py [--port 4566] [--root .localstack]

Installs infra/localstack/host/requirements.txt into .venv/localstack (Python 3.13, which the last core
release needs; reinstalled only when that file changes), then runs LocalStack in the foreground with
every listener on 127.0.0.1, no DNS server, no telemetry, its files under --root. It serves API Gateway,
Lambda's management API, Secrets Manager, IAM, EventBridge, S3 and SQS; `infra/localstack/deploy.py
--endpoint http://127.0.0.1:PORT --no-migrate` deploys MiniChat into it. Functions are created and
wired but not executed: LocalStack's runtime-init binary is downloaded from outside (a stand-in that
refuses stands in its place), and `sam local` runs the functions instead (tests/aws/test_sam_local.py).
LocalStack's own image with an auth token (localstack-compose.yml) executes them too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent / "host"
VENV = ROOT / ".venv" / "localstack"
RUNTIME_IMAGE = "public.ecr.aws/lambda/python:3.12-x86_64"  # built by `make sam-image`
INIT_VERSION = "minichat-no-execution"
SERVICES = "lambda,apigateway,secretsmanager,events,iam,sts,logs,s3,sqs"


def python313() -> str:
    """An interpreter for localstack-core (3.13: it imports `warnings.deprecated`); pyenv's shims are
    skipped (they answer only for the selected version)."""
    candidates = [os.environ.get("MINICHAT_PYTHON313", "")]
    candidates += [str(p) for p in sorted((Path.home() / ".pyenv" / "versions").glob("3.13*/bin/python3.13"))]
    candidates.append(shutil.which("python3.13") or "")
    for candidate in candidates:
        if candidate and "shims" not in candidate and Path(candidate).exists():
            return candidate
    raise SystemExit("host.py: no Python 3.13 found (set MINICHAT_PYTHON313)")


def ensure_venv() -> Path:
    """.venv/localstack with the pinned LocalStack; returns its python."""
    requirements = HERE / "requirements.txt"
    wanted = hashlib.sha256(requirements.read_bytes()).hexdigest() + " compiled"  # the .pyc files too
    stamp = VENV / ".installed-stamp"
    python = VENV / "bin" / "python"
    if not stamp.exists() or stamp.read_text() != wanted:
        print("host.py: installing LocalStack into .venv/localstack", file=sys.stderr)
        uv = ROOT / ".venv" / "bin" / "uv"  # `make setup`'s uv: seconds instead of most of a minute
        if uv.exists():
            venv = [str(uv), "venv", "-q", "--seed", "--allow-existing", "--python", python313(), str(VENV)]
            # --compile-bytecode: the .pyc files pip writes (uv writes none by default, and compiles only what
            # it installs: --reinstall); without them, where PYTHONDONTWRITEBYTECODE is set, each start of
            # LocalStack compiles what it imports.
            install = [str(uv), "pip", "install", "-q", "--reinstall", "--compile-bytecode"]
            install += ["--python", str(python)]
        else:
            venv = [python313(), "-m", "venv", str(VENV)]
            install = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run(venv, check=True)  # noqa: S603 (our own paths)
        subprocess.run([*install, "-r", str(requirements)], check=True)  # noqa: S603
        stamp.write_text(wanted)
    return python


def environment(*, port: int, root: Path) -> dict[str, str]:
    """LocalStack's settings for host mode on loopback (see the module docstring)."""
    init = root / "var/lib/localstack/lib/lambda-runtime" / INIT_VERSION / "x86_64/var/rapid/init"
    init.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(HERE / "no-execution-init", init)
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "GATEWAY_LISTEN": f"127.0.0.1:{port}",
        "GATEWAY_SERVER": "hypercorn",  # the default server binds every interface
        "LOCALSTACK_HOST": f"127.0.0.1:{port}",
        "DNS_ADDRESS": "0",
        "DISABLE_EVENTS": "1",
        "SKIP_SSL_CERT_DOWNLOAD": "1",
        "SQS_ENDPOINT_STRATEGY": "path",
        "OVERRIDE_IN_DOCKER": "0",
        "FILESYSTEM_ROOT": str(root),
        "TMPDIR": str(root / "tmp"),
        "SERVICES": SERVICES,
        "LAMBDA_INIT_RELEASE_VERSION": INIT_VERSION,
        "LAMBDA_RUNTIME_IMAGE_MAPPING": json.dumps({"python3.12": RUNTIME_IMAGE}),
        "DOCKER_CMD": str(HERE / "docker-shim.sh"),
        # Its containers (a function environment it tries to start) are named after this, one per port.
        "MAIN_CONTAINER_NAME": container_prefix(port),
    }


def container_prefix(port: int) -> str:
    """The name LocalStack gives itself and puts before its Lambda containers' names."""
    return f"minichat-localstack-{port}"


def remove_containers(port: int) -> None:
    """Remove the containers the LocalStack on `port` made (it leaves them when stopped)."""
    names = subprocess.run(  # noqa: S603 (fixed arguments)
        ["docker", "ps", "-aq", "--filter", f"name={container_prefix(port)}"],  # noqa: S607
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    if names:
        subprocess.run(["docker", "rm", "-f", *names], capture_output=True, check=False)  # noqa: S603, S607


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=4566)
    parser.add_argument("--root", type=Path, default=ROOT / ".localstack")
    args = parser.parse_args()
    python = ensure_venv()
    env = environment(port=args.port, root=args.root.resolve())
    os.execve(str(python), [str(python), "-m", "localstack.runtime.main"], env)  # noqa: S606


if __name__ == "__main__":
    sys.exit(main())
