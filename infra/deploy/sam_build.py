"""`sam build` for the checks, once per state of its inputs.

    python3 infra/deploy/sam_build.py          # prints the build folder

Installs the pinned AWS tools first (infra/deploy/aws_tools.sh). The inputs (and the Python 3.12
interpreter's path) are hashed; the build goes to .aws-sam/checked/<hash>, is written under a lock into a
temporary folder and renamed when complete, and is never changed afterwards. So the tests (tests/aws) and
the cold-start benchmark (bench/bench_coldstart.py) reuse a build while nothing changed, two test runs at
once neither build twice nor read a half-written build, and a developer's own `sam build`
(.aws-sam/build, what `sam deploy` uploads) is left alone.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# The one loader of files by path (standard library only); this script also runs outside .venv.
sys.path.insert(0, str(ROOT / "local"))
from minichat_local.functions import load_path  # noqa: E402

CHECKED = ROOT / ".aws-sam" / "checked"
KEEP = 3  # builds kept (the newest), so a test run still reading an older one is not disturbed
# What the built artifacts are made of: a change to any of these rebuilds.
INPUTS = (
    "template.yaml",
    "samconfig.toml",
    "pyproject.toml",
    "constraints.txt",
    "infra/deploy/Makefile",
    "infra/deploy/build_artifacts.py",
    "infra/migrations",
    "layers/core/minichat",
    "functions",
)
# The template's Lambda functions (tests/aws reads this list too), and what `sam build` makes of them.
FUNCTIONS = (
    "ApiFunction",
    "StreamFunction",
    "WorkerFunction",
    "RelayFunction",
    "ReaperFunction",
    "PurgeFunction",
    "MigrateFunction",
)
ARTIFACTS = ("CoreLayer", *FUNCTIONS)
# No telemetry, no AWS account: `sam build` needs neither.
TOOL_ENV = {"SAM_CLI_TELEMETRY": "0", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def _run(
    args: list[str], *, env: dict[str, str] | None = None, stdout: Any = None
) -> subprocess.CompletedProcess[str]:
    """Run a step from the repository root; every argument is built here, none comes from outside."""
    full_env = {**os.environ, **TOOL_ENV, **(env or {})}
    return subprocess.run(args, cwd=ROOT, env=full_env, text=True, check=True, stdout=stdout)  # noqa: S603


def aws_tools() -> Path:
    """The bin folder of the pinned AWS tools, installed when missing or out of date."""
    output = _run(["bash", str(ROOT / "infra" / "deploy" / "aws_tools.sh")], stdout=subprocess.PIPE).stdout
    return Path(output.strip().splitlines()[-1])


def python312() -> str:
    """The Python 3.12 the artifacts are built for (see build_artifacts.python312)."""
    found: str = load_path(ROOT / "infra" / "deploy" / "build_artifacts.py").python312()
    return found


def inputs_digest(interpreter: str) -> str:
    digest = hashlib.sha256(interpreter.encode())
    for entry in INPUTS:
        path = ROOT / entry
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            if "__pycache__" in file.parts or file.suffix == ".pyc":
                continue
            digest.update(str(file.relative_to(ROOT)).encode())
            digest.update(file.read_bytes())
            digest.update(str(file.stat().st_mode & 0o111).encode())  # run.sh must stay executable
    return digest.hexdigest()


def ensure_built() -> Path:
    """The build folder for the current inputs (built now when there is none yet)."""
    tools = aws_tools()
    interpreter = python312()
    target = CHECKED / inputs_digest(interpreter)[:16]
    if (target / "template.yaml").is_file():
        return target
    CHECKED.mkdir(parents=True, exist_ok=True)
    with (CHECKED / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be building the same inputs right now
        if (target / "template.yaml").is_file():
            return target
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        _run(
            [str(tools / "sam"), "build", "--template", "template.yaml", "--build-dir", str(partial)],
            env={"BUILD_PYTHON": sys.executable, "PYTHON312": interpreter},
            stdout=sys.stderr,
        )
        assert all((partial / name).is_dir() for name in ARTIFACTS), sorted(p.name for p in partial.iterdir())
        partial.rename(target)
        builds = sorted(
            (p for p in CHECKED.iterdir() if p.is_dir() and "." not in p.name), key=os.path.getmtime
        )
        for old in builds[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    return target


if __name__ == "__main__":
    print(ensure_built())
