"""Shared pytest configuration (kept minimal: other areas rely on it).

- Tests marked ``@pytest.mark.cuda`` are skipped where no CUDA device is usable (torch is imported
  lazily, only when such a test is collected, so environments without torch still collect).
- ``repo_root`` / ``ex4d_cmd``: the repository root and the command line that runs the backend CLI
  as a subprocess (``<python> -m ex4d_backend``) with the repository on PYTHONPATH.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config, items):
    cuda_items = [item for item in items if "cuda" in item.keywords]
    if not cuda_items or _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is false)")
    for item in cuda_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def ex4d_cmd() -> list[str]:
    """argv prefix running ``ex4d`` in a subprocess with this interpreter."""
    return [sys.executable, "-m", "ex4d_backend"]


@pytest.fixture(scope="session")
def subprocess_env() -> dict[str, str]:
    """Environment for CLI subprocesses: the repository importable, no colour/tty surprises."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
