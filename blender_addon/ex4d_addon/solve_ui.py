"""The moving source camera's panel and operators (issue 15): ``ex4d.follow_camera_solve``,
``ex4d.snap_to_source`` (the novel camera's first key := the source camera's pose), ``ex4d.blend_from_source``
(keys over the first N frames from the source pose into the designed path) and ``ex4d.add_locked_off_camera``
(a novel camera holding the source's pose of one frame).

Poses are Blender ``matrix_world`` values of two Blender cameras: no camera convention is involved.
"""

from __future__ import annotations

import bpy
from bpy.app.translations import pgettext_iface as iface_
from mathutils import Matrix

from . import mesh_object, panel_base, props, runner, source_camera

LENS_FIELDS = ("sensor_fit", "sensor_width", "sensor_height", "shift_x", "shift_y")
LOCKED_OFF_NAME = "EX4D Locked-off"


def _cameras(context):
    s = context.scene.ex4d
    src, novel = s.source_camera, s.novel_camera
    if src is None or novel is None or src.type != "CAMERA" or novel.type != "CAMERA" or src == novel:
        return None, None
    return src, novel


def _evaluated(scene, obj, frame: int) -> tuple[Matrix, float]:
    scene.frame_set(frame)
    ev = obj.evaluated_get(bpy.context.evaluated_depsgraph_get())
    return ev.matrix_world.copy(), float(ev.data.lens)


def _rotation_path(obj) -> str:
    return {"QUATERNION": "rotation_quaternion", "AXIS_ANGLE": "rotation_axis_angle"}.get(
        obj.rotation_mode, "rotation_euler"
    )


def key_pose(scene, obj, frame: int, mw: Matrix, lens: float) -> None:
    """Key ``obj`` (location, rotation, lens) at ``frame`` so that its ``matrix_world`` there is ``mw``
    (through its parent as evaluated on that frame; the Euler angles kept continuous with the curve)."""
    scene.frame_set(frame)
    prev = obj.rotation_euler.copy()
    obj.matrix_world = mw
    if obj.rotation_mode not in ("QUATERNION", "AXIS_ANGLE"):
        eul = obj.rotation_euler.copy()
        eul.make_compatible(prev)
        obj.rotation_euler = eul
    obj.keyframe_insert("location", frame=frame)
    obj.keyframe_insert(_rotation_path(obj), frame=frame)
    obj.data.lens = lens
    obj.data.keyframe_insert("lens", frame=frame)


def _match_sensor(src, novel) -> None:
    for key in LENS_FIELDS:
        setattr(novel.data, key, getattr(src.data, key))


def snap_first_key(scene, src, novel) -> None:
    """The novel camera's pose and lens at ``frame_start`` := the source camera's there (its sensor too)."""
    current = scene.frame_current
    with mesh_object.occlusion_suspended():
        mw, lens = _evaluated(scene, src, scene.frame_start)
        _match_sensor(src, novel)
        key_pose(scene, novel, scene.frame_start, mw, lens)
    scene.frame_set(current)


def blend_from_source(scene, src, novel, n: int) -> None:
    """Keys on frames ``frame_start + i`` (i = 0..n) going from the source pose (i = 0) to the designed path
    (i = n) with the weight smoothstep(i / n): centres and lens linearly, orientations by slerp."""
    current = scene.frame_current
    f0 = scene.frame_start
    with mesh_object.occlusion_suspended():
        designed = [_evaluated(scene, novel, f0 + i) for i in range(n + 1)]
        source = [_evaluated(scene, src, f0 + i) for i in range(n + 1)]
        _match_sensor(src, novel)
        for i, ((md, ld), (ms, ls)) in enumerate(zip(designed, source, strict=True)):
            w = i / n
            w = w * w * (3.0 - 2.0 * w)
            loc_s, rot_s, _ = ms.decompose()
            loc_d, rot_d, _ = md.decompose()
            mw = Matrix.LocRotScale(loc_s.lerp(loc_d, w), rot_s.slerp(rot_d, w), None)
            key_pose(scene, novel, f0 + i, mw, ls + (ld - ls) * w)
    scene.frame_set(current)


class _NeedsCameras:
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        src, novel = _cameras(context)
        if src is None:
            runner.poll_message(cls, "Needs a source camera and another novel camera")
            return False
        return True


class _NeedsSource:
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        src = context.scene.ex4d.source_camera
        if src is None or src.type != "CAMERA":
            runner.poll_message(cls, "Import footage first (it makes the source camera)")
            return False
        return True


class EX4D_OT_snap_to_source(_NeedsCameras, bpy.types.Operator):
    """Key the novel camera's first frame at the source camera's pose and lens (the guide's frame 0 is then
    the footage's)"""

    bl_idname = "ex4d.snap_to_source"
    bl_label = "Snap First Key to Source"

    def execute(self, context):
        src, novel = _cameras(context)
        snap_first_key(context.scene, src, novel)
        source_camera.settings(context.scene).frame0_warning = ""
        self.report({"INFO"}, f"EX-4D: '{novel.name}' starts at the source camera (render the guide again)")
        return {"FINISHED"}


class EX4D_OT_blend_from_source(_NeedsCameras, bpy.types.Operator):
    """Key the novel camera over the first frames from the source camera's pose into its designed path"""

    bl_idname = "ex4d.blend_from_source"
    bl_label = "Blend In from Source"

    frames: bpy.props.IntProperty(name="Frames", default=0, min=0, description="0: the panel's Blend Frames")  # type: ignore[valid-type]

    def execute(self, context):
        src, novel = _cameras(context)
        settings = source_camera.settings(context.scene)
        n = self.frames or settings.blend_frames
        blend_from_source(context.scene, src, novel, n)
        settings.frame0_warning = ""
        self.report({"INFO"}, f"EX-4D: '{novel.name}' blends in from the source over {n} frames")
        return {"FINISHED"}


def add_locked_off(scene, src, frame: int) -> bpy.types.Object:
    """A new, unanimated novel camera "EX4D Locked-off" at the source camera's evaluated pose and lens on
    ``frame`` (its sensor, shift and clip range too): the backend's ``lock_off`` made in Blender, editable."""
    current = scene.frame_current
    with mesh_object.occlusion_suspended():
        mw, lens = _evaluated(scene, src, frame)
    scene.frame_set(current)
    cam = bpy.data.objects.new(LOCKED_OFF_NAME, bpy.data.cameras.new(LOCKED_OFF_NAME))
    mesh_object.link(scene, cam)
    _match_sensor(src, cam)
    cam.data.lens = lens
    cam.data.clip_start, cam.data.clip_end = src.data.clip_start, src.data.clip_end
    cam.matrix_world = mw
    scene.ex4d.novel_camera = cam
    return cam


class EX4D_OT_add_locked_off(_NeedsSource, bpy.types.Operator):
    """Add a novel camera holding the source camera's pose of one frame for the whole shot (a handheld shot made
    locked-off)"""

    bl_idname = "ex4d.add_locked_off_camera"
    bl_label = "Add Locked-off Camera"

    frame: bpy.props.IntProperty(name="Frame", default=-1, description="Scene frame to hold (-1: the current frame)")  # type: ignore[valid-type]

    def execute(self, context):
        scene = context.scene
        frame = scene.frame_current if self.frame < 0 else self.frame
        cam = add_locked_off(scene, scene.ex4d.source_camera, frame)
        self.report({"INFO"}, f"EX-4D: '{cam.name}' holds the source camera's pose of frame {frame}")
        return {"FINISHED"}


class EX4D_OT_follow_camera_solve(bpy.types.Operator):
    """Make the source camera follow the chosen Movie Clip's camera solve (a Camera Solver constraint)"""

    bl_idname = "ex4d.follow_camera_solve"
    bl_label = "Follow Camera Solve"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        return context.scene.ex4d.source_camera is not None and source_camera.settings(context.scene).clip is not None

    def execute(self, context):
        scene = context.scene
        clip = source_camera.settings(scene).clip
        source_camera.follow_solve(scene, scene.ex4d.source_camera, clip)
        scene.ex4d.mesh_stale = True
        self.report({"INFO"}, f"EX-4D: the source camera follows the camera solve of '{clip.name}'")
        return {"FINISHED"}


class EX4D_PT_source(panel_base.SubPanel, bpy.types.Panel):
    """Moving source camera: the solve, the depth scale and its fit, the frame-0 check."""

    bl_label = "Moving Source Camera"
    bl_idname = "EX4D_PT_source"

    def draw_header(self, context):
        self.layout.prop(source_camera.settings(context.scene), "use_moving_source", text="")

    def draw(self, context):
        src = source_camera.settings(context.scene)
        layout = self.layout
        layout.active = src.use_moving_source
        row = layout.row(align=True)
        row.prop(src, "clip")
        row.operator("ex4d.follow_camera_solve", text="", icon="CON_CAMERASOLVER")
        if src.clip is not None and not source_camera.has_solve(src.clip):
            layout.label(text="Not solved yet (Movie Clip Editor > Solve Camera Motion)", icon="INFO")
        layout.operator("ex4d.add_locked_off_camera", icon="LOCKED")
        layout.prop(src, "scale_mode")
        if src.scale_mode == "MANUAL":
            layout.prop(src, "manual_scale")
        else:
            layout.prop(src, "per_frame_scale")
            if not source_camera.has_solve(src.clip):
                layout.prop(src, "bundle_collection")
            if src.fit_scale:
                text = str(iface_("Scale {:.4g}, residual {:.1%}, {} observations")).format(
                    src.fit_scale, src.fit_residual, src.fit_n_obs
                )
                layout.label(text=text, translate=False)
            if src.fit_warnings:
                col = layout.column()
                col.alert = True
                col.label(text=src.fit_warnings[:120], icon="ERROR", translate=False)
        if src.frame0_warning:
            col = layout.column()
            col.alert = True
            for i in range(0, len(src.frame0_warning), 60):
                col.label(text=src.frame0_warning[i : i + 60], icon="ERROR" if i == 0 else "BLANK1", translate=False)
            row = layout.row(align=True)
            row.operator("ex4d.snap_to_source", icon="SNAP_ON")
            row.operator("ex4d.blend_from_source", icon="IPO_EASE_IN_OUT")
            layout.prop(src, "blend_frames")


CLASSES = (
    EX4D_OT_snap_to_source,
    EX4D_OT_blend_from_source,
    EX4D_OT_add_locked_off,
    EX4D_OT_follow_camera_solve,
    EX4D_PT_source,
)


def register() -> None:
    source_camera.register()  # scene.ex4d_source first: the panel draws it
    props.register_classes(CLASSES)


def unregister() -> None:
    props.unregister_classes(CLASSES)
    source_camera.unregister()
