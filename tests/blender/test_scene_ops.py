"""Scene operators in real headless Blender (bpy 4.2 / 5.0): install, import footage, DW-mesh, presets."""

from __future__ import annotations

import bpy
from conftest import ADDON


def test_extension_installed_and_registered(scene, addon, addon_zip):
    assert addon.__name__ == ADDON
    assert ADDON in bpy.context.preferences.addons
    for op in ("import_footage", "build_dwmesh", "add_camera_preset"):
        assert hasattr(bpy.ops.ex4d, op)
