"""Builds one Lambda artifact for `sam build` (called by infra/deploy/Makefile, one target per resource).

    python3 infra/deploy/build_artifacts.py {layer|api|stream|worker} ARTIFACTS_DIR

Every artifact is built by the Python 3.12 interpreter for the Lambda runtime `python3.12` on x86_64:
dependencies come from PyPI as manylinux wheels (never from the dev environment), pinned by
constraints.txt, and every .py file is byte-compiled with `unchecked-hash` invalidation, so a cold start
on Lambda's read-only /var/task and /opt reads .pyc files instead of compiling every module again.

- layer:  python/minichat (layers/core/minichat), python/minichat/migrations/*.sql (infra/migrations),
          and pyproject.toml's [project.dependencies] with their dependencies, minus boto3 (the runtime
          has it).
- api:    app.py plus Chalice's runtime (chalice/__init__.py and chalice/app.py, exactly what
          `chalice package` ships: the CLI and its dependencies stay out).
- stream: app.py, run.sh (executable), starlette and uvicorn (without the [standard] extras: reload,
          websockets and dotenv are not used behind the Lambda Web Adapter).
- worker: handler.py and jobs.py (the MQ worker and the scheduled jobs share one artifact).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CONSTRAINTS = ROOT / "constraints.txt"
# Lambda's python3.12 runtime runs on Amazon Linux 2023 (glibc 2.34): wheels for manylinux <= 2.34.
PLATFORMS = ("manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux2014_x86_64")
PYTHON_VERSION = "3.12"
# The function's own third-party dependencies (names only: versions come from constraints.txt).
FUNCTION_DEPENDENCIES = {"api": ["chalice"], "stream": ["starlette", "uvicorn"], "worker": []}
# Provided by the Lambda runtime; shipping them would only add megabytes.
RUNTIME_PROVIDED = {"boto3", "botocore", "s3transfer", "jmespath"}
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".chalice", "requirements.txt")


def _run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a build step; every argument is built here, none comes from outside."""
    return subprocess.run(args, check=kwargs.pop("check", True), text=True, **kwargs)  # noqa: S603


def python312() -> str:
    """The Python 3.12 interpreter: $PYTHON312, python3.12 on PATH, or pyenv's 3.12.x."""
    candidates = [os.environ.get("PYTHON312", ""), shutil.which("python3.12") or ""]
    pyenv_root = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    candidates += sorted(glob.glob(f"{pyenv_root}/versions/3.12.*/bin/python3.12"), reverse=True)
    for candidate in filter(None, candidates):
        probe = _run(
            [candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 12))"],
            capture_output=True,
            check=False,
        )
        if probe.returncode == 0 and probe.stdout.strip() == "True":  # a pyenv shim may say no
            return candidate
    raise SystemExit("build_artifacts: no Python 3.12 found (set PYTHON312 or install it with pyenv)")


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def layer_requirements() -> list[str]:
    """pyproject.toml's [project.dependencies]: the one list of what the core package needs."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [req for req in project["dependencies"] if _name(req) not in RUNTIME_PROVIDED]


def function_requirements(kind: str) -> list[str]:
    """The function's dependencies as pyproject.toml's `functions` extra names them, without extras."""
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    declared = {_name(req): req for req in extra["functions"]}
    wanted = []
    for name in FUNCTION_DEPENDENCIES[kind]:
        if name not in declared:
            raise SystemExit(f"build_artifacts: {name} is not in pyproject.toml's `functions` extra")
        wanted.append(re.sub(r"\[[^\]]*\]", "", declared[name]))  # uvicorn[standard] -> uvicorn
    return wanted


def pip_install(requirements: list[str], target: Path) -> None:
    """Install wheels for Lambda (python3.12, x86_64 manylinux) into target, pinned by constraints.txt."""
    if not requirements:
        return
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    _run(
        [
            python312(),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-compile",
            "--target",
            str(target),
            "--implementation",
            "cp",
            "--python-version",
            PYTHON_VERSION,
            *platforms,
            "--only-binary=:all:",
            "--upgrade",
            "-c",
            str(CONSTRAINTS),
            *requirements,
        ],
    )
    # Whatever a dependency pulled in that the runtime already provides.
    for pattern in RUNTIME_PROVIDED:
        for path in target.glob(f"{pattern}*"):
            if path.name.split("-")[0].lower() == pattern:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.rmtree(target / "bin", ignore_errors=True)  # console scripts point at the build interpreter


def chalice_runtime(target: Path) -> None:
    """chalice/__init__.py and chalice/app.py from the pinned wheel: what `chalice package` ships."""
    with tempfile.TemporaryDirectory() as tmp:
        _run(
            [
                python312(),
                "-m",
                "pip",
                "download",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--only-binary=:all:",
                "-d",
                tmp,
                "-c",
                str(CONSTRAINTS),
                *function_requirements("api"),
            ],
        )
        (wheel,) = Path(tmp).glob("chalice-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            for member in ("chalice/__init__.py", "chalice/app.py"):
                destination = target / member
                destination.parent.mkdir(parents=True, exist_ok=True)
                destination.write_bytes(archive.read(member))


def copy_tree(source: Path, destination: Path) -> None:
    shutil.copytree(source, destination, ignore=_IGNORE, dirs_exist_ok=True)


def byte_compile(*paths: Path, sourceless: bool = False) -> None:
    """Compile for 3.12 (Lambda's code directories are read-only: nothing compiled there is kept).

    Own code keeps its .py (tracebacks show the lines) with `unchecked-hash` .pyc files beside it in
    __pycache__, valid whatever the file times after zip and unzip. Third-party code is shipped
    sourceless (the .pyc in place of the .py), which halves its size: that is what keeps the layer
    under 50 MB with every module precompiled.
    """
    mode = ["-b"] if sourceless else ["--invalidation-mode", "unchecked-hash"]
    _run(
        [python312(), "-m", "compileall", "-q", "-j", "0", *mode, *map(str, paths)],
        stdout=subprocess.DEVNULL,
    )
    if sourceless:
        for path in paths:
            for source in [path] if path.is_file() else list(path.rglob("*.py")):
                if source.suffix == ".py" and source.with_suffix(".pyc").is_file():
                    source.unlink()
            for stale in [] if path.is_file() else list(path.rglob("__pycache__")):
                shutil.rmtree(stale)


def third_party(site: Path, own: set[str]) -> list[Path]:
    """What pip installed into site: packages and single-file modules, not metadata nor our own code."""
    return [
        entry
        for entry in sorted(site.iterdir())
        if entry.name not in own
        and not entry.name.endswith((".dist-info", ".libs"))
        and (entry.is_dir() or entry.suffix == ".py")
    ]


def build(kind: str, artifacts: Path) -> None:
    artifacts.mkdir(parents=True, exist_ok=True)
    if kind == "layer":
        site = artifacts / "python"
        pip_install(layer_requirements(), site)
        byte_compile(*third_party(site, own=set()), sourceless=True)
        copy_tree(ROOT / "layers" / "core" / "minichat", site / "minichat")
        migrations = site / "minichat" / "migrations"
        migrations.mkdir(exist_ok=True)
        for sql in sorted((ROOT / "infra" / "migrations").glob("*.sql")):
            shutil.copy2(sql, migrations / sql.name)
        byte_compile(site / "minichat")
    elif kind in FUNCTION_DEPENDENCIES:
        copy_tree(ROOT / "functions" / kind, artifacts)
        if kind == "api":
            chalice_runtime(artifacts)
        else:
            pip_install(function_requirements(kind), artifacts)
        if kind == "stream":
            (artifacts / "run.sh").chmod(0o755)
        own = {path.name for path in (ROOT / "functions" / kind).iterdir()} | {"chalice"}
        dependencies = third_party(artifacts, own=own)
        if dependencies:
            byte_compile(*dependencies, sourceless=True)
        byte_compile(*(artifacts / name for name in sorted(own) if (artifacts / name).exists()))
    else:
        raise SystemExit(f"build_artifacts: unknown artifact {kind!r}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    build(sys.argv[1], Path(sys.argv[2]).resolve())
