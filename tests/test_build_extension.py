"""scripts/build_extension.py: the zip built by Blender's own extension tool (bpy from PyPI) holds
exactly the add-on package plus the manifest, validates with Blender 5.0's and 4.2's tools, and a bad
manifest fails with Blender's message and leaves no zip."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("build_extension", ROOT / "scripts" / "build_extension.py")
be = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(be)

ENV50, ENV42 = ROOT / ".venv-bpy5.0", ROOT / ".venv-bpy4.2"
needs50 = pytest.mark.skipif(
    be._bpy_scripts(ENV50) is None, reason="no .venv-bpy5.0 (scripts/install_deps.py --dev creates it)"
)
needs42 = pytest.mark.skipif(
    be._bpy_scripts(ENV42) is None, reason="no .venv-bpy4.2 (scripts/install_deps.py --dev creates it)"
)


def _addon_files(addon_dir: Path) -> set[str]:
    """The add-on package's files as they should appear in the zip (relative, without caches)."""
    out = set()
    for p in addon_dir.rglob("*"):
        rel = p.relative_to(addon_dir)
        if p.is_file() and "__pycache__" not in rel.parts and p.suffix not in (".pyc", ".pyo"):
            out.add(rel.as_posix())
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(zip, the add-on snapshot it was built from): a snapshot, as others may edit the add-on meanwhile."""
    if be._bpy_scripts(ENV50) is None:
        pytest.skip("no .venv-bpy5.0 (scripts/install_deps.py --dev creates it)")
    snap = tmp_path_factory.mktemp("addon") / "ex4d_addon"
    shutil.copytree(be.ADDON_DIR, snap)
    (snap / "__pycache__").mkdir(exist_ok=True)
    (snap / "__pycache__" / "stale.cpython-311.pyc").write_bytes(b"cache")  # must not be packaged
    return be.build_extension(tmp_path_factory.mktemp("dist"), bpy_env=ENV50, addon_dir=snap), snap


def test_zip_contents(built):
    zip_path, snap = built
    meta = tomllib.loads(be.MANIFEST.read_text(encoding="utf-8"))
    assert zip_path.name == f"{meta['id']}-{meta['version']}.zip"
    with zipfile.ZipFile(zip_path) as zf:
        assert zf.testzip() is None
        names = {n for n in zf.namelist() if not n.endswith("/")}
        assert names == _addon_files(snap) | {"blender_manifest.toml"}
        assert "__init__.py" in names
        assert tomllib.loads(zf.read("blender_manifest.toml").decode()) == meta
        for name in _addon_files(snap):
            assert zf.read(name) == (snap / name).read_bytes(), name
    assert not list(zip_path.parent.glob("*.part.zip"))


def test_manifest_fields(built):
    meta = tomllib.loads(be.MANIFEST.read_text(encoding="utf-8"))
    assert meta["schema_version"] == "1.0.0" and meta["type"] == "add-on"
    assert meta["id"].isidentifier()
    assert tuple(int(x) for x in meta["blender_version_min"].split(".")) <= (4, 2, 0)


@needs42
def test_zip_validates_with_blender_42_tool(built):
    base, extra = be.tool_command(bpy_env=ENV42)
    done = subprocess.run(base + ["validate", *extra, str(built[0])], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def _bad_manifest(tmp_path: Path, old: str, new: str) -> Path:
    text = be.MANIFEST.read_text(encoding="utf-8")
    assert old in text
    bad = tmp_path / "blender_manifest.toml"
    bad.write_text(text.replace(old, new, 1), encoding="utf-8")
    return bad


@needs50
def test_unknown_tag_is_rejected(tmp_path):
    """Blender's list of valid tags is applied (as `blender --command extension` does)."""
    text = be.MANIFEST.read_text(encoding="utf-8")
    line = next(ln for ln in text.splitlines() if ln.startswith("tags"))
    bad = _bad_manifest(tmp_path, line, 'tags = ["Animation", "Not A Blender Tag"]')
    out = tmp_path / "dist"
    with pytest.raises(be.BuildError, match="Not A Blender Tag"):
        be.build_extension(out, bpy_env=ENV50, manifest=bad)
    assert not list(out.glob("*.zip"))


@needs50
def test_bad_version_is_rejected(tmp_path):
    text = be.MANIFEST.read_text(encoding="utf-8")
    line = next(ln for ln in text.splitlines() if ln.startswith("version"))
    bad = _bad_manifest(tmp_path, line, 'version = "one point oh"')
    out = tmp_path / "dist"
    with pytest.raises(be.BuildError, match="validating the extension sources failed"):
        be.build_extension(out, bpy_env=ENV50, manifest=bad)
    assert not list(out.glob("*.zip"))


def test_cli_reports_missing_tool(tmp_path, capsys):
    rc = be.main(["--output-dir", str(tmp_path / "dist"), "--bpy-env", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith("build_extension: error: no bpy")
