"""Load modules by file path: the function entry points (as Lambda finds them, each in its own folder)
and the repository's scripts (infra/, bench/), which are files in folders rather than packages.

Standard library only: scripts that run outside the project's virtualenv (infra/deploy/sam_build.py,
infra/localstack/deploy.py under the AWS tools' interpreter) import this module too.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["load_function", "load_path", "repo_root"]


def repo_root() -> Path:
    """The checkout local mode serves from (`MINICHAT_ROOT` overrides)."""
    env = os.environ.get("MINICHAT_ROOT")
    return Path(env) if env else Path(__file__).resolve().parents[2]


def load_path(path: Path | str, name: str | None = None) -> ModuleType:
    """Import the Python file at `path` as module `name`, once per process (later calls get the same module).

    The default name is derived from the whole path, so two files of the same name never share a module;
    the module is in `sys.modules` while it runs, as an import's would be (dataclasses and typing need it).
    """
    path = Path(path).resolve()
    name = name or "minichat_file_" + re.sub(r"\W", "_", path.with_suffix("").as_posix().lstrip("/"))
    loaded = sys.modules.get(name)
    if loaded is not None:
        return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load_function(name: str, module: str = "app") -> ModuleType:
    """Import functions/<name>/<module>.py under a unique module name (functions never import each other)."""
    return load_path(repo_root() / "functions" / name / f"{module}.py", f"minichat_function_{name}_{module}")
