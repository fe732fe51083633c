"""Runs the add-on's Blender test suites (tests/blender) in both bpy venvs, as subprocesses.

Each suite runs inside real headless Blender (``bpy`` from PyPI): ``.venv-bpy5.0`` (bpy 5.0.1) and
``.venv-bpy4.2`` (bpy 4.2 LTS). A missing venv is a skip with the reason; a failing suite fails here with
its output. The backend those suites start is this venv's Python (``$EX4D_BACKEND_PYTHON``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUITES = {"bpy5.0": ROOT / ".venv-bpy5.0", "bpy4.2": ROOT / ".venv-bpy4.2"}


@pytest.mark.blender
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SUITES))
def test_blender_suite(name: str) -> None:
    venv = SUITES[name]
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    if not python.exists():
        pytest.skip(f"{venv.name} is missing: create it with `scripts/install_deps.py --dev` (bpy from PyPI)")
    check = subprocess.run([str(python), "-c", "import bpy, numpy, pytest"], capture_output=True, text=True)
    if check.returncode != 0:
        pytest.skip(f"{venv.name} cannot import bpy, numpy and pytest: {check.stderr.strip()[-300:]}")
    env = dict(os.environ)
    env.setdefault("EX4D_BACKEND_PYTHON", sys.executable)
    env.pop("BLENDER_USER_RESOURCES", None)  # the suite makes its own temporary one
    proc = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/blender"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        pytest.fail(f"the {name} suite failed (exit {proc.returncode}):\n{proc.stdout[-12000:]}\n{proc.stderr[-4000:]}")
