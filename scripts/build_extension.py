#!/usr/bin/env python3
"""Build and validate the EX-4D Blender extension zip with Blender's own extension tool.

The manifest lives at the repository root (``blender_manifest.toml``) and the code in
``blender_addon/ex4d_addon/``; Blender's tool wants both in one folder, so this script stages them in
a temporary folder (without caches) and runs, in order of preference:

1. ``<blender> --command extension validate|build`` when ``--blender PATH`` is given;
2. the same tool from a bpy-from-PyPI environment: ``blender --command extension`` is
   ``bpy/<ver>/scripts/addons_core/bl_pkg/cli/blender_ext.py`` (standard library only) with Blender's
   list of valid tags (``scripts/modules/_bpy_internal/extensions/tags.py``), which this script passes
   as ``--valid-tags`` the way Blender does. Default environments: ``.venv-bpy5.0`` then ``.venv-bpy4.2``
   at the repository root (``scripts/install_deps.py --dev`` creates them);
3. ``blender`` on PATH.

Then it validates the built zip with the same tool and checks that the zip holds the manifest and the
add-on's ``__init__.py`` at its root. Standard library only. Prints the zip path on the last line.
Exit status 0 on success, 1 on failure (the last line says what failed and what to do).

Usage: ``python scripts/build_extension.py [--output-dir dist] [--blender PATH | --bpy-env DIR]``;
from Python: ``build_extension(out_dir) -> Path``.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "blender_manifest.toml"
ADDON_DIR = ROOT / "blender_addon" / "ex4d_addon"
DEFAULT_ENVS = (".venv-bpy5.0", ".venv-bpy4.2")
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".DS_Store")


class BuildError(Exception):
    """A build failure; the message says what failed and what to do."""


def _bpy_scripts(env: Path) -> Path | None:
    """``bpy/<version>/scripts`` inside a virtual environment with bpy from PyPI, or None."""
    patterns = [
        env / "lib" / "python3*" / "site-packages" / "bpy" / "*" / "scripts",
        env / "Lib" / "site-packages" / "bpy" / "*" / "scripts",  # Windows layout
    ]
    for pattern in patterns:
        hits = sorted(glob.glob(str(pattern)))
        hits = [h for h in hits if (Path(h) / "addons_core" / "bl_pkg" / "cli" / "blender_ext.py").is_file()]
        if hits:
            return Path(hits[-1])
    return None


def env_python(env: Path) -> Path:
    """The Python executable of a virtual environment."""
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def tool_command(blender: str | None = None, bpy_env: str | os.PathLike | None = None) -> tuple[list[str], list[str]]:
    """(command prefix running Blender's extension tool, extra options for ``validate``/``build``)."""
    if blender:
        return [blender, "--background", "--factory-startup", "--command", "extension"], []
    envs = [Path(bpy_env)] if bpy_env else [ROOT / name for name in DEFAULT_ENVS]
    for env in envs:
        scripts = _bpy_scripts(env)
        if scripts is not None and env_python(env).exists():
            tags = scripts / "modules" / "_bpy_internal" / "extensions" / "tags.py"
            extra = ["--valid-tags", str(tags)] if tags.is_file() else []
            return [str(env_python(env)), str(scripts / "addons_core" / "bl_pkg" / "cli" / "blender_ext.py")], extra
    if bpy_env:
        raise BuildError(f"no bpy (with its extension tool) in {bpy_env} -- pass a venv with bpy from PyPI")
    exe = shutil.which("blender")
    if exe:
        return [exe, "--background", "--factory-startup", "--command", "extension"], []
    raise BuildError(
        "Blender's extension tool not found -- pass --blender PATH or --bpy-env DIR "
        "(scripts/install_deps.py --dev creates .venv-bpy5.0 with bpy)"
    )


def stage(dest: Path, manifest: Path = MANIFEST, addon_dir: Path = ADDON_DIR) -> None:
    """Copy the manifest and the add-on package (without caches) into ``dest``."""
    if not manifest.is_file():
        raise BuildError(f"{manifest} not found -- the extension needs its blender_manifest.toml")
    if not (addon_dir / "__init__.py").is_file():
        raise BuildError(f"{addon_dir}/__init__.py not found -- the add-on package is incomplete")
    shutil.copytree(addon_dir, dest, ignore=SKIP, dirs_exist_ok=True)
    shutil.copy2(manifest, dest / "blender_manifest.toml")


def _run(cmd: list[str], what: str) -> str:
    """Run one tool command; raise BuildError with the tool's own message on failure."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        detail = " ".join(line.strip() for line in out.splitlines() if line.strip())[-600:]
        raise BuildError(f"{what} failed: {detail or f'exit status {proc.returncode}'} -- fix the manifest or add-on")
    return out


def manifest_fields(manifest: Path) -> dict:
    """The manifest's top-level fields (tomllib; a minimal reader for Python 3.10)."""
    text = manifest.read_text(encoding="utf-8")
    try:
        import tomllib

        return tomllib.loads(text)
    except ModuleNotFoundError:  # Python 3.10: top-level 'key = "value"' lines are all this script needs
        return dict(re.findall(r'^(\w+)\s*=\s*"([^"]*)"', text, flags=re.M))


def build_extension(
    out_dir: str | os.PathLike,
    *,
    blender: str | None = None,
    bpy_env: str | os.PathLike | None = None,
    manifest: str | os.PathLike = MANIFEST,
    addon_dir: str | os.PathLike = ADDON_DIR,
) -> Path:
    """Validate the staged sources, build ``<id>-<version>.zip`` in ``out_dir``, validate the zip; return its path.

    Raises :class:`BuildError` (one line: what failed, what to do)."""
    manifest, addon_dir, out_dir = Path(manifest), Path(addon_dir), Path(out_dir).resolve()
    base, extra = tool_command(blender, bpy_env)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ex4d_ext_") as tmp:
        src = Path(tmp) / "ex4d"
        stage(src, manifest, addon_dir)
        meta = manifest_fields(src / "blender_manifest.toml")
        if not meta.get("id") or not meta.get("version"):
            raise BuildError(f"{manifest} has no id or version -- add both (see Blender's manifest reference)")
        _run(base + ["validate", *extra, str(src)], "validating the extension sources")
        out = out_dir / f"{meta['id']}-{meta['version']}.zip"
        part = out.with_name(out.name + ".part.zip")  # renamed when complete and valid
        part.unlink(missing_ok=True)
        try:
            _run(base + ["build", *extra, "--source-dir", str(src), "--output-filepath", str(part)], "building the zip")
            _run(base + ["validate", *extra, str(part)], "validating the built zip")
            with zipfile.ZipFile(part) as zf:
                names = set(zf.namelist())
            for required in ("blender_manifest.toml", "__init__.py"):
                if required not in names:
                    raise BuildError(f"the built zip has no {required} at its root -- check [build] in the manifest")
            os.replace(part, out)
        finally:
            part.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--output-dir", default=str(ROOT / "dist"), help="where the zip goes (default: dist/)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--blender", help="a Blender executable (4.2+) to run '--command extension'")
    group.add_argument(
        "--bpy-env", help="a virtual environment with bpy from PyPI (default: .venv-bpy5.0, .venv-bpy4.2)"
    )
    args = parser.parse_args(argv)
    try:
        out = build_extension(args.output_dir, blender=args.blender, bpy_env=args.bpy_env)
    except (BuildError, OSError) as exc:
        print(f"build_extension: error: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
