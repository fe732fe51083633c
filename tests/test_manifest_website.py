"""The extension manifest's ``website`` points at this project (issue 16's conventions): the URL the project
declares in pyproject.toml ``[project.urls]`` (Homepage, else Repository), or no ``website`` at all while the
project declares none. Catches a manifest pointing at another project (it pointed at the EX-4D research
repository, which is the model's code, not this add-on) or one that drifts from pyproject.toml."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_manifest_website_is_this_projects_url():
    manifest = tomllib.loads((ROOT / "blender_manifest.toml").read_text(encoding="utf-8"))
    urls = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"].get("urls", {})
    declared = urls.get("Homepage") or urls.get("Repository")
    assert manifest.get("website") == declared, (manifest.get("website"), declared)
    assert "tau-yihouxiang/EX-4D" not in manifest.get("website", "")
