"""EX-4D for Blender: re-shoot one video from a new camera (a Blender 4.2+ extension, no bl_info).

The artist's path, each step an operator (scripting contract, stable names and arguments):
``ex4d.import_footage(filepath)``, ``ex4d.build_dwmesh(depth_filepath="")``,
``ex4d.add_camera_preset(preset)``, ``ex4d.render_guide()``, ``ex4d.generate(generator=...)``.
The add-on never imports torch nor ``ex4d_backend``: the backend runs as ``ex4d serve`` in its own Python,
and does all camera maths (the add-on sends raw Blender camera values and receives Blender values).

Modules: ``props`` (settings), ``backend`` (the service process), ``runner`` (the one job runner),
``sampling`` (camera samples), ``mesh_object`` (the DW-mesh object), ``outputs`` (result folders),
``strips`` (VSE and camera backgrounds), ``ops_scene`` / ``ops_jobs`` / ``farm`` (operators; ``farm``:
submissions to a render farm), ``panels`` (UI), ``meter_ui`` (the live disocclusion meter: timeline bar and
sub-panel; ``meter_math`` its pure part), ``viewport_aids`` (hide occlusion / border faces, guide overlay, A/B), ``solve_ui`` /
``source_camera`` (a moving source camera),
``data`` / ``compat`` (Blender data helpers, version differences). Registered in that order, unregistered
in reverse.
"""

from __future__ import annotations

import importlib

_MODULE_NAMES = (
    "props",
    "runner",
    "mesh_object",
    "ops_scene",
    "ops_jobs",
    "farm",
    "panels",
    "depth_tools",
    "history_ui",
    "meter_ui",
    "viewport_aids",
    "solve_ui",
)
_registered: list = []


def register() -> None:
    for name in _MODULE_NAMES:
        mod = importlib.import_module(f".{name}", __package__)
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

        backend.shutdown()  # returns at once: the backend exits on its own
    except Exception:  # noqa: BLE001 - the backend module may be missing or already down
        pass
