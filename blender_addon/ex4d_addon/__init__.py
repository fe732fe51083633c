"""EX-4D for Blender: re-shoot one video from a new camera (a Blender 4.2+ extension, no bl_info).

The artist's path, each step an operator (scripting contract, stable names and arguments):
``ex4d.import_footage(filepath)``, ``ex4d.build_dwmesh(depth_filepath="")``,
``ex4d.add_camera_preset(preset)``, ``ex4d.render_guide()``, ``ex4d.generate(generator=...)``.
The add-on never imports torch nor ``ex4d_backend``: the backend runs as ``ex4d serve`` in its own Python.

Registration order (the add-on contract): props, ops_scene, ops_jobs (skipped while it does not exist),
panels; the reverse on unregister.
"""

from __future__ import annotations

import importlib

_MODULE_NAMES = ("props", "ops_scene", "ops_jobs", "panels")
_registered: list = []


def _modules() -> list:
    mods = []
    for name in _MODULE_NAMES:
        try:
            mod = importlib.import_module(f".{name}", __package__)
        except ModuleNotFoundError as exc:
            if name == "ops_jobs" and exc.name and exc.name.endswith(".ops_jobs"):
                continue  # the jobs module is optional while it is being written
            raise
        mods.append(mod)
    return mods


def register() -> None:
    for mod in _modules():
        mod.register()
        _registered.append(mod)


def unregister() -> None:
    while _registered:
        mod = _registered.pop()
        try:
            mod.unregister()
        except Exception as exc:  # noqa: BLE001 - unregister the rest even if one module fails
            print(f"EX-4D: unregister of {mod.__name__} failed: {exc}")
    try:
        from . import backend

        backend.shutdown()
    except Exception:  # noqa: BLE001 - the backend module may be missing or already down
        pass
