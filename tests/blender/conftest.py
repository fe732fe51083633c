"""Fixtures for the add-on tests that run INSIDE a bpy venv (bpy from PyPI, no torch):

    .venv-bpy5.0/bin/python -m pytest tests/blender      (and the same with .venv-bpy4.2)

- the extension is installed the real way: the zip is built with Blender's own extension tool
  (scripts/build_extension.py), installed with ``bpy.ops.extensions.package_install_files`` into a local
  repository in a temporary folder, and enabled from there (``ADDON`` = its module name);
- Blender's user folder is a temporary one (``BLENDER_USER_RESOURCES``): the tests never touch the user's;
- the backend runs as a subprocess of the main .venv (``$EX4D_BACKEND_PYTHON``, default
  ``<repo>/.venv/bin/python``) with a temporary job store (``$EX4D_STORE``);
- ``clip``: a tiny synthetic clip (64 x 48, 6 frames: wall, card, moving sphere) with its exact depth, written
  once per session by ``ex4d_backend.synthetic`` in a backend subprocess;
- ``backend_py(code, **args)``: runs ``code`` in the backend's Python (reference values from ``ex4d_backend``).

Outside a bpy venv (e.g. the main .venv's pytest) these tests are not collected.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REPO_MODULE = "ex4d_test"  # the local extension repository the tests install into
ADDON = f"bl_ext.{REPO_MODULE}.ex4d"

try:
    import bpy
except ImportError:  # not a bpy venv: nothing here can run
    bpy = None
    collect_ignore_glob = ["test_*.py"]

# Only inside a bpy venv: the main .venv's pytest also imports this file (to learn that it has nothing to
# collect) and must not leak these variables into the bpy suites it starts (they would share one job store).
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="ex4d_bpy_tests_")) if bpy is not None else Path(tempfile.gettempdir())
if bpy is not None:
    os.environ.setdefault("BLENDER_USER_RESOURCES", str(_SESSION_DIR / "blender_user"))
    os.environ.setdefault("EX4D_BACKEND_PYTHON", str(ROOT / ".venv" / "bin" / "python"))
    os.environ.setdefault("EX4D_STORE", str(_SESSION_DIR / "store"))
BACKEND_PYTHON = os.environ.get("EX4D_BACKEND_PYTHON", str(ROOT / ".venv" / "bin" / "python"))

# The synthetic clip: small, with a wide field of view so the card, the sphere and their occlusion edges show.
CLIP_W, CLIP_H, CLIP_T, CLIP_FOCAL = 64, 48, 6, 60.0


def pytest_sessionfinish(session, exitstatus):  # noqa: ARG001
    if bpy is not None:
        try:
            mod = sys.modules.get(ADDON + ".backend")
            if mod is not None:
                mod.shutdown()
        except Exception:  # noqa: BLE001
            pass
    if bpy is not None:
        shutil.rmtree(_SESSION_DIR, ignore_errors=True)


def backend_py(code: str, timeout: float = 300, **args) -> dict:
    """Run ``code`` in the backend's Python; ``args`` is available as the dict ``ARGS``; the code sets ``OUT``
    (a JSON-serialisable dict) which is returned."""
    if not Path(BACKEND_PYTHON).exists():
        pytest.skip(f"backend Python not found: {BACKEND_PYTHON} (set $EX4D_BACKEND_PYTHON)")
    script = (
        "import json, sys\nARGS = json.loads(sys.argv[1])\nOUT = {}\n"
        + code
        + "\nsys.stdout.write('\\n@@OUT@@' + json.dumps(OUT))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [BACKEND_PYTHON, "-c", script, json.dumps(args)], capture_output=True, text=True, timeout=timeout, env=env
    )
    if proc.returncode != 0 or "@@OUT@@" not in proc.stdout:
        raise RuntimeError(f"backend script failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.rsplit("@@OUT@@", 1)[1])


def _blender_ext_tool() -> Path:
    """Blender's extension tool bundled with bpy (what ``blender --command extension`` runs)."""
    hits = sorted(Path(bpy.utils.resource_path("LOCAL")).glob("scripts/addons_core/bl_pkg/cli/blender_ext.py"))
    assert hits, "Blender's extension tool (bl_pkg/cli/blender_ext.py) is missing from this bpy"
    return hits[-1]


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def build_zip(out_dir: Path) -> Path:
    """The extension zip, built and validated with Blender's own extension tool: through
    scripts/build_extension.py (run with this bpy venv) when it exists, else by staging the manifest and the
    package here and running the tool directly."""
    script = ROOT / "scripts" / "build_extension.py"
    if script.is_file() and not os.environ.get("EX4D_TEST_STAGE_EXTENSION"):
        out = _run([sys.executable, str(script), "--output-dir", str(out_dir), "--bpy-env", sys.prefix])
        zip_path = Path(out.strip().splitlines()[-1])
    else:
        tool = [sys.executable, str(_blender_ext_tool())]
        src = out_dir / "stage" / "ex4d"
        shutil.copytree(
            ROOT / "blender_addon" / "ex4d_addon", src, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
        shutil.copy2(ROOT / "blender_manifest.toml", src / "blender_manifest.toml")
        zip_path = out_dir / "ex4d.zip"
        _run(tool + ["validate", str(src)])
        _run(tool + ["build", "--source-dir", str(src), "--output-filepath", str(zip_path)])
        _run(tool + ["validate", str(zip_path)])
    assert zip_path.suffix == ".zip" and zip_path.is_file(), zip_path
    return zip_path


@pytest.fixture(scope="session")
def addon_zip() -> Path:
    return build_zip(_SESSION_DIR / "dist")


@pytest.fixture(scope="session")
def addon(addon_zip):
    """The installed and enabled extension's package (``bl_ext.ex4d_test.ex4d``)."""
    prefs = bpy.context.preferences
    repo_dir = _SESSION_DIR / "extensions" / REPO_MODULE
    repo_dir.mkdir(parents=True, exist_ok=True)
    repo = prefs.extensions.repos.get(REPO_MODULE) if hasattr(prefs.extensions.repos, "get") else None
    if repo is None:
        repo = prefs.extensions.repos.new(
            name="EX4D Test", module=REPO_MODULE, custom_directory=str(repo_dir), source="USER"
        )
    result = bpy.ops.extensions.package_install_files(
        filepath=str(addon_zip), repo=REPO_MODULE, enable_on_install=True, overwrite=True
    )
    assert result == {"FINISHED"}, result
    assert (repo_dir / "ex4d" / "blender_manifest.toml").is_file()
    assert ADDON in prefs.addons, f"{ADDON} not enabled: {list(prefs.addons.keys())}"
    pkg = importlib.import_module(ADDON)
    yield pkg
    try:
        bpy.ops.preferences.addon_disable(module=ADDON)
    except Exception:  # noqa: BLE001
        pass


def addon_module(name: str):
    """A sub-module of the installed extension (``data``, ``compat``, ``props``, ...)."""
    return importlib.import_module(f"{ADDON}.{name}")


@pytest.fixture
def scene(addon):
    """A fresh, empty scene with the extension enabled; the backend is stopped afterwards only at the end."""
    bpy.ops.wm.read_homefile(use_empty=True)
    assert ADDON in bpy.context.preferences.addons
    sc = bpy.context.scene
    assert hasattr(sc, "ex4d")
    return sc


@pytest.fixture(scope="session")
def clip() -> dict:
    """The synthetic clip on disk: ``frames_dir`` (PNG sequence frame_00000.png...), ``video`` (H.264 mp4),
    ``depth`` (.npy float32 (T, H, W), the exact z depth), ``frames_npy`` (uint8 (T, H, W, 3)), ``K``."""
    out = _SESSION_DIR / "clip"
    code = """
from pathlib import Path
import numpy as np
from ex4d_backend import synthetic
from ex4d_backend.cameras import reference_intrinsics
from ex4d_backend.footage import write_png_sequence, write_video
w, h, t, f = ARGS["w"], ARGS["h"], ARGS["t"], ARGS["f"]
out = Path(ARGS["out"]); out.mkdir(parents=True, exist_ok=True)
k = reference_intrinsics(w, h, f)
frames, depth, k = synthetic.make_scene(w, h, t, k=k)
write_png_sequence(out / "frames", frames)
write_video(out / "clip.mp4", frames, 24.0)
np.save(out / "depth.npy", depth)
np.save(out / "frames.npy", frames)
OUT = {"K": k.tolist()}
"""
    res = backend_py(code, w=CLIP_W, h=CLIP_H, t=CLIP_T, f=CLIP_FOCAL, out=str(out))
    return {
        "dir": out,
        "frames_dir": out / "frames",
        "video": out / "clip.mp4",
        "depth": out / "depth.npy",
        "frames_npy": out / "frames.npy",
        "K": res["K"],
        "width": CLIP_W,
        "height": CLIP_H,
        "n_frames": CLIP_T,
        "focal_px": CLIP_FOCAL,
    }


@pytest.fixture(scope="session")
def job_store() -> Path:
    """The backend's job store for this session (also ``$EX4D_STORE``)."""
    p = Path(os.environ["EX4D_STORE"])
    p.mkdir(parents=True, exist_ok=True)
    return p


@pytest.fixture
def tmp_blend_dir(tmp_path) -> Path:
    """A folder for .blend files and outputs of one test."""
    d = tmp_path / "blend"
    d.mkdir()
    return d
