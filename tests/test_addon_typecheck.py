"""The add-on type-checks (mypy) against the Python API of every supported Blender: fake-bpy-module 4.2,
4.5, 5.0 and 5.2, one venv each (``.venv-fakebpy<version>``, made by ``scripts/install_deps.py --dev``).

Zero errors (of the codes below), so an API that one version lacks (a renamed property, a function 5.0 moved) fails here before
a Blender run does; what differs between versions is reached only through ``compat.py``. A missing venv is
a skip with the reason.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VERSIONS = ("4.2", "4.5", "5.0", "5.2")
# What is checked: attribute and name errors (an API a version lacks: a renamed property, a moved function,
# a module attribute) and wrong call signatures. Off: the narrowing noise of the stubs, which type
# ``obj.data`` as a union of every data-block type and the generic ``Attribute``/``Modifier`` without their
# subclasses' fields (union-attr, arg-type, assignment, ...), and Blender's class-annotation idiom for
# properties (valid-type).
NOISE = ("valid-type", "union-attr", "arg-type", "assignment", "misc", "call-overload", "type-var",
         "func-returns-value", "return-value")  # fmt: skip
MYPY_ARGS = ["--ignore-missing-imports", "--no-error-summary", "--check-untyped-defs", "--no-incremental",
             *(f"--disable-error-code={c}" for c in NOISE)]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_addon_typechecks_against_blender(version: str, tmp_path) -> None:
    venv = ROOT / f".venv-fakebpy{version}"
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    if not python.exists():
        pytest.skip(f"{venv.name} is missing: create it with `scripts/install_deps.py --dev`")
    proc = subprocess.run(
        [str(python), "-m", "mypy", *MYPY_ARGS, "--cache-dir", str(tmp_path / "cache"), "ex4d_addon"],
        cwd=ROOT / "blender_addon",
        capture_output=True,
        text=True,
        timeout=600,
    )
    errors = [line for line in proc.stdout.splitlines() if ": error:" in line]
    assert proc.returncode == 0 and not errors, f"mypy with fake-bpy-module {version}:\n" + "\n".join(
        errors or [proc.stdout[-3000:], proc.stderr[-3000:]]
    )
