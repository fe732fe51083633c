"""A moving source camera (issue 15): "EX4D Source" following a camera solve or its own animation, sent per
frame to the backend, the DW-mesh riding on it, the depth scale and the frame-0 check.

1. The source camera follows the Movie Clip's solve through a **Camera Solver constraint** (not baked keys:
   a re-solve, a new scale or origin set in the Clip Editor moves it at once, and nothing is duplicated; the
   sampling evaluates constraints anyway). A camera animated any other way (keys, a parent, imported from a
   layout) is used as it is.
2. Jobs send it as the raw Blender data the novel camera is sent in (``sampling.sample_camera``: evaluated
   ``matrix_world``, lens, sensor, shift, resolution per clip frame) as ``source_camera.blender``; the
   depth scale is manual or ``depth_scale.bundles`` (convention ``blender``): the solve's bundles (tracks with
   ``has_bundle``, on the clip frames where their marker is enabled) or the Empties of a collection (what
   "Setup Tracking Scene" / "Link Empty to Track" or another tracker's import leave). The backend projects
   each bundle through the source camera itself (no marker positions are sent: that would need an image-axis
   convention here).
3. The DW-mesh object is parented to the source camera (``matrix_parent_inverse`` identity); its vertices stay
   in the backend's camera space and its local matrix is the backend's own placement of a mesh relative to its
   source camera, ``inv(source_camera.matrix_world) @ cv_to_blender`` of the static build result (both from the
   backend: the add-on holds no convention), times ``diag(s, s, s, 1)`` with the depth scale (keyed per frame
   for a per-frame fit).
4. Frame 0: the backend says whether the novel camera starts at the source (``render_guide``'s
   ``frame0_is_source``); when not, the panel warns and offers Snap / Blend In (``solve_ui``).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, PointerProperty, StringProperty
from mathutils import Matrix

from . import props

SOLVER_CONSTRAINT = "EX4D Camera Solve"
SCALE_ITEMS = (
    ("MANUAL", "Manual", "A fixed depth scale (depth units -> scene units)"),
    ("BUNDLES", "Fit to Bundles", "Fit the depth's scale to the camera solve's bundles (or to Empties)"),
)


def _stale(self, context) -> None:  # noqa: ARG001
    if context.scene.ex4d.dwmesh is not None:  # a built DW-mesh no longer matches (nothing built: nothing stale)
        context.scene.ex4d.mesh_stale = True


class EX4D_SourceSettings(bpy.types.PropertyGroup):
    """``scene.ex4d_source``: the moving source camera's settings and the last fit / frame-0 check."""

    use_moving_source: BoolProperty(  # type: ignore[valid-type]
        name="Moving Source Camera",
        description="The source camera moves (a camera solve, keys, a parent): send its path per frame, "
        "carry the DW-mesh with it and design the novel camera in world space",
        default=False,
        update=_stale,
    )
    clip: PointerProperty(  # type: ignore[valid-type]
        name="Camera Solve",
        type=bpy.types.MovieClip,
        description="The Movie Clip whose camera solve EX4D Source follows",
    )
    scale_mode: EnumProperty(name="Depth Scale", items=SCALE_ITEMS, default="MANUAL", update=_stale)  # type: ignore[valid-type]
    manual_scale: FloatProperty(  # type: ignore[valid-type]
        name="Scale", description="Depth units -> scene units", default=1.0, min=1e-6, soft_max=100.0, update=_stale
    )
    per_frame_scale: BoolProperty(  # type: ignore[valid-type]
        name="Per Frame", description="Fit a scale per frame (frames with few bundles take the shot's)", update=_stale
    )
    bundle_collection: PointerProperty(  # type: ignore[valid-type]
        name="Bundle Empties",
        type=bpy.types.Collection,
        description="Empties at the solve's 3D points (used when no clip with a solve is set)",
        update=_stale,
    )
    fit_scale: FloatProperty(name="Fitted Scale", default=0.0)  # type: ignore[valid-type]
    fit_residual: FloatProperty(name="Residual", default=0.0)  # type: ignore[valid-type]
    fit_n_obs: IntProperty(name="Observations", default=0)  # type: ignore[valid-type]
    fit_warnings: StringProperty(name="Fit Warnings", default="")  # type: ignore[valid-type]
    frame0_warning: StringProperty(name="Frame 0", default="")  # type: ignore[valid-type]
    blend_frames: IntProperty(  # type: ignore[valid-type]
        name="Blend Frames", description="Frames over which Blend In goes from the source pose to the path",
        default=12, min=1, soft_max=100,
    )  # fmt: skip


def settings(scene) -> EX4D_SourceSettings:
    return scene.ex4d_source


# ---- 1. the source camera follows a solve or its own animation ----------------------------------------
def has_solve(clip) -> bool:
    return clip is not None and bool(clip.tracking.reconstruction.is_valid)


def is_moving(cam_obj) -> bool:
    """True when ``cam_obj`` is moved by something other than its own static transform."""
    if cam_obj is None:
        return False
    ad = cam_obj.animation_data
    return bool(cam_obj.constraints) or cam_obj.parent is not None or (ad is not None and ad.action is not None)


def follow_solve(scene, cam_obj, clip) -> None:
    """``cam_obj`` follows ``clip``'s camera solve (a Camera Solver constraint; its own transform reset to identity)
    with the solve's lens and sensor (as Blender's own "Setup Tracking Scene" sets them); the clip becomes the
    scene's active clip."""
    con = cam_obj.constraints.get(SOLVER_CONSTRAINT)
    if con is None:
        con = cam_obj.constraints.new("CAMERA_SOLVER")
        con.name = SOLVER_CONSTRAINT
    con.use_active_clip = False
    con.clip = clip
    # the constraint composes the solve with the camera's own transform; identity puts the camera exactly where
    # the solve has it, in the world its bundles are in
    cam_obj.matrix_basis = Matrix.Identity(4)
    tc = clip.tracking.camera
    cam_obj.data.sensor_width = tc.sensor_width
    cam_obj.data.lens = tc.focal_length
    scene.active_clip = clip
    src = settings(scene)
    src.clip = clip
    src.use_moving_source = True
    if src.scale_mode == "MANUAL" and src.manual_scale == 1.0:
        src.scale_mode = "BUNDLES"


def after_import(scene, cam_obj, clip, use_solve: bool) -> str:
    """Set up a moving source after ``ex4d.import_footage``: follow ``clip``'s solve when ``use_solve`` (or it
    has one), or take an already animated source camera as moving. Returns a note for the report."""
    src = settings(scene)
    clip = clip or src.clip
    if clip is not None and (use_solve or has_solve(clip)):
        follow_solve(scene, cam_obj, clip)
        if has_solve(clip):
            return f"follows the camera solve of '{clip.name}'"
        return f"follows the camera solve of '{clip.name}' once it is solved (Movie Clip Editor > Solve)"
    if is_moving(cam_obj):
        src.use_moving_source = True
        return "the source camera is animated: used as a moving source"
    return ""


# ---- 2. what the jobs send ------------------------------------------------------------------------------
def _clip_index(clip, marker_frame: int, scene) -> int:
    """Clip frame index (0 = the scene's ``frame_start``) of a marker's movie-clip frame, with Blender's own
    mapping (``MovieClip.frame_start`` / ``frame_offset``)."""
    scene_frame = marker_frame + clip.frame_start - 1 - clip.frame_offset
    return int(scene_frame - scene.frame_start)


def bundles_from_clip(scene, clip, n_frames: int) -> list[dict]:
    """The solve's bundles: ``{"co": Blender world [x, y, z], "frames": [clip frame indices]}`` of every track
    of the camera's tracking object with a bundle, on the frames where its marker is enabled (not muted)."""
    out = []
    obj = next((o for o in clip.tracking.objects if o.is_camera), None)
    tracks = obj.tracks if obj is not None else clip.tracking.tracks
    for tr in tracks:
        if not tr.has_bundle:
            continue
        frames = sorted(
            {t for m in tr.markers if not m.mute for t in [_clip_index(clip, m.frame, scene)] if 0 <= t < n_frames}
        )
        if frames:
            out.append({"co": [float(v) for v in tr.bundle], "frames": frames})
    return out


def bundles_from_empties(coll, n_frames: int) -> list[dict]:
    """Empties of ``coll`` (and its children) as bundles seen on every frame (the backend skips the frames
    where one is behind the camera or outside the image)."""
    obs = [ob for ob in coll.all_objects if ob.type == "EMPTY"]
    return [{"co": [float(v) for v in ob.matrix_world.translation], "frames": list(range(n_frames))} for ob in obs]


def depth_scale_param(scene, n_frames: int) -> float | dict:
    """The ``depth_scale`` param: the manual scale, or the bundles (Blender world) to fit it to."""
    src = settings(scene)
    if src.scale_mode == "MANUAL":
        return float(src.manual_scale)
    if has_solve(src.clip):
        bundles = bundles_from_clip(scene, src.clip, n_frames)
    elif src.bundle_collection is not None:
        bundles = bundles_from_empties(src.bundle_collection, n_frames)
    else:
        bundles = []
    if not bundles:
        from .backend_client import BackendError

        raise BackendError(
            "bad_input", "Fit to Bundles has no bundles",
            hint="solve the camera in the Movie Clip Editor, pick a Bundle Empties collection, or use a manual scale",
        )  # fmt: skip
    return {"bundles": bundles, "convention": "blender", "per_frame": bool(src.per_frame_scale)}


def source_params(context, n_frames: int) -> Generator[None, None, dict]:
    """Params of a moving source (empty for a static one): ``source_camera`` (the raw per-frame Blender
    camera, sampled over timer ticks) and ``depth_scale``."""
    scene = context.scene
    src_obj = scene.ex4d.source_camera
    if not settings(scene).use_moving_source or src_obj is None or src_obj.type != "CAMERA":
        return {}
    from . import sampling

    scale = depth_scale_param(scene, n_frames)
    frames = [scene.frame_start + i for i in range(n_frames)]
    raw = yield from sampling.sample_camera(scene, src_obj, frames)
    return {"source_camera": {"blender": raw}, "depth_scale": scale}


# ---- 3. the DW-mesh rides on the source camera ------------------------------------------------------------
def note_fit(scene, fit: dict, scales: list) -> None:
    src = settings(scene)
    src.fit_scale = float(fit.get("scale", scales[0] if scales else 1.0))
    src.fit_residual = float(fit.get("residual", 0.0))
    src.fit_n_obs = int(fit.get("n_obs", 0))
    src.fit_warnings = "; ".join(fit.get("warnings", []))


def mesh_local_matrix(result: dict, scale: float) -> Matrix:
    """The DW-mesh's local matrix under its source camera: the backend's static placement relative to the
    static source camera, ``inv(source_camera.matrix_world) @ cv_to_blender``, times ``diag(s, s, s, 1)``."""
    rel = Matrix(result["source_camera"]["matrix_world"]).inverted() @ Matrix(result["cv_to_blender"])
    return rel @ Matrix.Diagonal((scale, scale, scale, 1.0))


def attach_mesh(scene, obj, result: dict) -> None:
    """Parent the DW-mesh ``obj`` to the moving source camera (no-op for a static source) with the depth scale
    of the ``build_dwmesh`` result (per frame: scale keys, constant between frames)."""
    cam = scene.ex4d.source_camera
    if not settings(scene).use_moving_source or cam is None:
        return
    scales = [float(v) for v in result.get("depth_scales") or [1.0]]
    note_fit(scene, result.get("depth_scale_fit") or {}, scales)
    obj.parent = cam
    obj.matrix_parent_inverse = Matrix.Identity(4)
    obj.matrix_basis = mesh_local_matrix(result, scales[0])
    if obj.animation_data is not None and obj.animation_data.action is not None:
        obj.animation_data.action = None
    if max(scales) - min(scales) > 1e-9 * max(scales):
        for i, s in enumerate(scales):
            obj.scale = (s, s, s)
            obj.keyframe_insert("scale", frame=scene.frame_start + i)
        for fc in _fcurves(obj):
            for kp in fc.keyframe_points:
                kp.interpolation = "CONSTANT"
    cam.data.clip_end = max(cam.data.clip_end, 2.0 * max(scales) * float(obj.get("ex4d_extent", 0.0)))


def _fcurves(obj) -> list:
    from . import compat

    return list(compat.action_fcurves(obj))


# ---- 4. frame 0 ------------------------------------------------------------------------------------------
def note_guide(scene, result: dict, camera_name: str) -> str:
    """Keep the guide's depth-scale fit and frame-0 check; returns the frame-0 warning ("" when fine)."""
    src = settings(scene)
    fit = result.get("depth_scale_fit") or {}
    if fit:
        note_fit(scene, fit, [])
    if result.get("frame0_is_source", True):
        src.frame0_warning = ""
    else:
        src.frame0_warning = (
            f"'{camera_name}' does not start at the source camera: guide frame 0 is rendered with holes "
            "(the generator's first image): Snap or Blend In from the source"
        )
    return src.frame0_warning


CLASSES = (EX4D_SourceSettings,)


def register() -> None:  # from solve_ui.register
    props.register_classes(CLASSES)
    scene_type: Any = bpy.types.Scene
    scene_type.ex4d_source = PointerProperty(type=EX4D_SourceSettings)


def unregister() -> None:
    scene_type: Any = bpy.types.Scene
    del scene_type.ex4d_source
    props.unregister_classes(CLASSES)
