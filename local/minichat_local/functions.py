"""Load the function entry points by file path, as Lambda would find them in their own folders."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["load_function", "repo_root"]


def repo_root() -> Path:
    """The checkout local mode serves from (`MINICHAT_ROOT` overrides)."""
    env = os.environ.get("MINICHAT_ROOT")
    return Path(env) if env else Path(__file__).resolve().parents[2]


def load_function(name: str, module: str = "app") -> ModuleType:
    """Import functions/<name>/<module>.py under a unique module name (functions never import each other)."""
    qualified = f"minichat_function_{name}_{module}"
    if qualified in sys.modules:
        return sys.modules[qualified]
    path = repo_root() / "functions" / name / f"{module}.py"
    spec = importlib.util.spec_from_file_location(qualified, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[qualified] = loaded
    spec.loader.exec_module(loaded)
    return loaded
