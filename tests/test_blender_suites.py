"""Runs the add-on's Blender test suites (tests/blender) in every supported Blender, as subprocesses.

Each suite runs inside real headless Blender (``bpy`` from PyPI): ``.venv-bpy4.2`` (4.2 LTS),
``.venv-bpy4.5`` (4.5 LTS), ``.venv-bpy5.0`` (5.0.1) and ``.venv-bpy5.2`` (5.2, Python 3.13), created by
``scripts/install_deps.py --dev``. A missing venv is a skip with the reason (e.g. no Python 3.13 for 5.2);
a failing suite fails here with its output. The backend those suites start is this venv's Python
(``$EX4D_BACKEND_PYTHON``). 5.0 and the newest (5.2) run the whole suite; the LTS versions 4.2 and 4.5
run it without the tests marked ``slow`` inside it (timings, the Workbench render match, long cancels:
the same code paths, within CI's time budget).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUITES = {"bpy4.2": "fast", "bpy4.5": "fast", "bpy5.0": "full", "bpy5.2": "fast"}  # fast: without the slow tests


@pytest.mark.blender
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SUITES))
def test_blender_suite(name: str, record_property) -> None:
    venv = ROOT / f".venv-{name}"
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    if not python.exists():
        pytest.skip(f"{venv.name} is missing: create it with `scripts/install_deps.py --dev` (bpy from PyPI)")
    check = subprocess.run([str(python), "-c", "import bpy, numpy, pytest"], capture_output=True, text=True)
    if check.returncode != 0:
        pytest.skip(f"{venv.name} cannot import bpy, numpy and pytest: {check.stderr.strip()[-300:]}")
    env = dict(os.environ)
    env.setdefault("EX4D_BACKEND_PYTHON", sys.executable)
    env.pop("BLENDER_USER_RESOURCES", None)  # the suite makes its own temporary one
    cmd = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/blender"]
    if SUITES[name] == "fast":
        cmd += ["-m", "not slow"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    record_property(f"{name}_seconds", round(time.monotonic() - t0, 1))
    if proc.returncode != 0:
        pytest.fail(f"the {name} suite failed (exit {proc.returncode}):\n{proc.stdout[-12000:]}\n{proc.stderr[-4000:]}")
