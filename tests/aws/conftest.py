"""The AWS deployment's checks: the pinned AWS tools, `sam build` (cached on its inputs), the artifacts.

Nothing here talks to AWS. The tools live in .venv/aws-tools (infra/deploy/aws_tools.sh); `sam build`
runs once per change of its inputs (a fresh clone builds once, in about half a minute).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aws_support import FUNCTIONS, load_script, run_tool


@pytest.fixture(scope="session")
def aws_tools() -> Path:
    """The bin directory of the pinned AWS tools (installed on first use)."""
    tools: Path = load_script("infra/deploy/sam_build.py").aws_tools()
    return tools


@pytest.fixture(scope="session")
def python312() -> str:
    """The Python 3.12 interpreter the artifacts are built for and run with here."""
    found: str = load_script("infra/deploy/sam_build.py").python312()
    return found


@pytest.fixture(scope="session")
def translated(aws_tools: Path) -> dict[str, Any]:
    """template.yaml after SAM's transform (CloudFormation JSON)."""
    result = run_tool([str(aws_tools / "python"), "infra/deploy/sam_translate.py", "template.yaml"])
    resources: dict[str, Any] = json.loads(result.stdout)
    return resources


@pytest.fixture(scope="session")
def sam_build(aws_tools: Path) -> Path:
    """`sam build` of template.yaml (.aws-sam/build), rebuilt only when one of its inputs changed."""
    built: Path = load_script("infra/deploy/sam_build.py").ensure_built()
    return built


@pytest.fixture(scope="session")
def built_template(sam_build: Path, aws_tools: Path) -> dict[str, object]:
    """The template `sam build` wrote (local artifact paths), as JSON via the tools' YAML reader."""
    result = run_tool(
        [
            str(aws_tools / "python"),
            "-c",
            "import json, sys; from samcli.yamlhelper import yaml_parse;"
            " print(json.dumps(yaml_parse(open(sys.argv[1]).read())))",
            str(sam_build / "template.yaml"),
        ]
    )
    loaded: dict[str, object] = json.loads(result.stdout)
    return loaded


@pytest.fixture(scope="session")
def lambda_root(sam_build: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The artifacts laid out as Lambda does, outside the repository: <root>/opt/python and
    <root>/task/<Function>, so nothing can be found by walking up to the source tree."""
    root = tmp_path_factory.mktemp("lambda")
    shutil.copytree(sam_build / "CoreLayer" / "python", root / "opt" / "python", symlinks=True)
    for name in FUNCTIONS:
        shutil.copytree(sam_build / name, root / "task" / name, symlinks=True)
    yield root
    shutil.rmtree(root, ignore_errors=True)
