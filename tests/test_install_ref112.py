"""scripts/install_deps.py's reference side environment (``--dev``): ``.venv-ref112`` with diffsynth 1.1.2 and
transformers 4.51.3 of its own, every other package (torch ...) from the backend environment through a .pth
file. A real fresh install into a temporary folder, run again (no-op), its isolation (own diffsynth and
transformers, the main torch, no second torch), and a failure that leaves nothing marked ready."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("install_deps_ref112", ROOT / "scripts" / "install_deps.py")
inst = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(inst)
MAIN_PY = Path(sys.executable)

PROBE = """
import importlib.metadata as md, importlib.util, json, sys, torch, transformers, tokenizers
print(json.dumps({"diffsynth": md.version("diffsynth"), "diffsynth_at": importlib.util.find_spec("diffsynth").origin,
                  "transformers": transformers.__version__, "transformers_at": transformers.__file__,
                  "tokenizers": tokenizers.__version__, "torch_at": torch.__file__}))
"""


def _probe(py: Path) -> dict:
    done = subprocess.run([str(py), "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _check_isolation(venv: Path) -> None:
    """Own diffsynth 1.1.2 / transformers 4.51.3 / tokenizers 0.21; torch from the main environment only."""
    info = _probe(inst.venv_python(venv))
    assert info["diffsynth"] == "1.1.2" and info["transformers"] == "4.51.3" and info["tokenizers"].startswith("0.21.")
    assert Path(info["diffsynth_at"]).is_relative_to(venv) and Path(info["transformers_at"]).is_relative_to(venv)
    assert not Path(info["torch_at"]).is_relative_to(venv)
    assert not list(venv.glob("lib/python*/site-packages/torch"))  # no second 2.6 GB torch


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fresh_install_run_again_and_isolation(tmp_path):
    """Wrong code it catches: a side environment that shadows the main one's torch or misses a package
    (imports fail), one that is rebuilt on every run, or a marker written before the libraries import."""
    if importlib.util.find_spec("diffsynth") is None:
        pytest.skip("the backend environment has no generation libraries")
    args = inst.parse_args(["--dev", "--quiet"])
    runner = inst.Runner(tmp_path / "log", quiet=True)
    venv = tmp_path / ".venv-ref112"
    t0 = time.monotonic()
    py = inst.setup_reference_venv(args, runner, MAIN_PY, venv)
    print(f"reference side environment: {time.monotonic() - t0:.0f} s")
    assert py == inst.venv_python(venv)
    marker = json.loads((venv / inst.MARKER).read_text())
    assert marker["key"]["requirements"] == list(inst.REF112_REQS)
    _check_isolation(venv)
    before = (venv / inst.MARKER).stat().st_mtime_ns
    t0 = time.monotonic()
    inst.setup_reference_venv(args, runner, MAIN_PY, venv)
    assert time.monotonic() - t0 < 20
    assert (venv / inst.MARKER).stat().st_mtime_ns == before  # up to date: nothing done


def test_failure_leaves_nothing_ready(tmp_path, monkeypatch):
    """No network: an offline install from an empty wheelhouse fails with one clear error and no marker."""
    (tmp_path / "wheels").mkdir()
    args = inst.parse_args(["--dev", "--offline", "--wheelhouse", str(tmp_path / "wheels"), "--quiet"])
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    venv = tmp_path / "side"
    with pytest.raises(inst.InstallError) as info:
        inst.setup_reference_venv(args, inst.Runner(tmp_path / "log", quiet=True), MAIN_PY, venv)
    assert "reference side environment" in info.value.what and info.value.todo
    assert (venv / "pyvenv.cfg").is_file() and not (venv / inst.MARKER).exists()


def test_repository_side_environment_is_current():
    """The dev install made <repo>/.venv-ref112 for this backend environment (what the parity tests run)."""
    venv = ROOT / inst.REF112_VENV
    if importlib.util.find_spec("diffsynth") is None:
        pytest.skip("the backend environment has no generation libraries")
    assert (venv / inst.MARKER).is_file(), "run `python3 scripts/install_deps.py --dev`"
    key = json.loads((venv / inst.MARKER).read_text())["key"]
    assert key["requirements"] == list(inst.REF112_REQS) and key["installer"] == inst.INSTALLER_VERSION
    _check_isolation(venv)
