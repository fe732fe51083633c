"""Camera sampling: the raw Blender camera of every clip frame, for the backend (which does all camera maths).

``sample_camera`` is a generator: each ``next()`` evaluates frames for at most ``budget`` seconds (at least
one), so the job runner spreads a long shot over timer ticks; it returns the protocol's ``blender`` payload.
"""

from __future__ import annotations

import re
import time
from collections.abc import Generator, Sequence

import bpy

from . import data, mesh_object
from .backend_client import BackendError
from .runner import SLICE_BUDGET


def sample_camera(
    scene: bpy.types.Scene, cam_obj: bpy.types.Object, frames: Sequence[int], budget: float = SLICE_BUDGET
) -> Generator[None, None, dict]:
    """Raw Blender camera data per frame, evaluated with constraints, parents, drivers and animation.

    Returns ``{"matrix_world": N x 4x4, "lens": [N] mm, "shift_x": [N], "shift_y": [N] (fractions of the
    larger side, as Blender), "sensor_width", "sensor_height" (mm), "sensor_fit", "resolution": [W, H]
    (the render size in pixels)}``. The scene's frame is restored afterwards (also when cancelled)."""
    current, sub = scene.frame_current, scene.frame_subframe
    mats: list = []
    lens: list[float] = []
    shift_x: list[float] = []
    shift_y: list[float] = []
    t0 = time.perf_counter()
    try:
        with mesh_object.occlusion_suspended():  # the DW-mesh's per-frame update is not needed here
            for f in frames:
                if time.perf_counter() - t0 >= budget and mats:
                    yield
                    t0 = time.perf_counter()
                scene.frame_set(int(f))
                dg = bpy.context.evaluated_depsgraph_get()
                ob = cam_obj.evaluated_get(dg)
                mw = ob.matrix_world
                mats.append([[float(mw[i][j]) for j in range(4)] for i in range(4)])
                cam = ob.data
                lens.append(float(cam.lens))
                shift_x.append(float(cam.shift_x))
                shift_y.append(float(cam.shift_y))
        yield  # restoring the frame updates the DW-mesh (a frame change): a slice of its own
    finally:
        scene.frame_set(current, subframe=sub)
    cam = cam_obj.data
    r = scene.render
    return {
        "matrix_world": mats,
        "lens": lens,
        "shift_x": shift_x,
        "shift_y": shift_y,
        "sensor_width": float(cam.sensor_width),
        "sensor_height": float(cam.sensor_height),
        "sensor_fit": cam.sensor_fit,
        "resolution": [
            int(r.resolution_x * r.resolution_percentage / 100),
            int(r.resolution_y * r.resolution_percentage / 100),
        ],
    }


def sample_all(scene, cam_obj, frames: Sequence[int]) -> dict:
    """:func:`sample_camera` run to the end at once (scripts, tests)."""
    return data.run_to_end(sample_camera(scene, cam_obj, frames))


def camera_name(cam_obj) -> str:
    """A folder-safe name for output names."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", cam_obj.name)[:64] or "camera"


def novel_camera(context) -> bpy.types.Object:
    """The camera to render from: ``scene.ex4d.novel_camera`` (never a silent fallback to the scene
    camera: an artist's existing scene camera is rarely the intended novel view)."""
    s = context.scene.ex4d
    cam = s.novel_camera
    if cam is None or cam.type != "CAMERA":
        hint = "add one with Add Camera Preset, or pick a camera in EX-4D > Novel Camera"
        if context.scene.camera is not None and context.scene.camera != s.source_camera:
            hint += f" (for example the scene camera '{context.scene.camera.name}')"
        raise BackendError("bad_input", "no novel camera chosen", hint=hint)
    if cam == s.source_camera:
        raise BackendError(
            "bad_input", "the novel camera is the source camera", hint="pick or add another camera as Novel Camera"
        )
    return cam


def camera_job_prepare(context, cam_obj, n_frames: int) -> Generator[None, None, dict]:
    """The runner's ``prepare`` phase of a job with a camera: samples ``cam_obj`` on scene frames
    ``frame_start + i`` (i < n_frames) over timer ticks; returns ``{"camera": {"blender": ..., "name": ...}}``."""
    scene = context.scene
    frames = [scene.frame_start + i for i in range(n_frames)]
    raw = yield from sample_camera(scene, cam_obj, frames)
    from . import source_camera  # a moving source camera: its path and the depth scale (issue 15)

    source = yield from source_camera.source_params(context, n_frames)
    return {"camera": {"blender": raw, "name": camera_name(cam_obj)}, **source}
