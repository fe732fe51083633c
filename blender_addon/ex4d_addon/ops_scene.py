"""Scene operators: ``ex4d.import_footage``, ``ex4d.build_dwmesh``, ``ex4d.add_camera_preset``.

Blender reads the footage's size, rate and length itself (the scene is set at once); everything about
cameras comes from the backend (``probe_footage``, ``build_dwmesh`` and ``camera_preset`` results carry
Blender ``matrix_world``, lens, sensor and shift values): the add-on holds no camera convention.
Each runs through the job runner (modal in the UI, blocking in background mode).
"""

from __future__ import annotations

from pathlib import Path

import bpy
import numpy as np
from bpy.app.translations import pgettext_tip as tip_
from bpy.props import EnumProperty, FloatProperty, StringProperty
from mathutils import Matrix

from . import backend, data, depth_tools, mesh_object, props, runner, source_camera
from .backend_client import BackendError
from .outputs import rel

SOURCE_CAMERA_NAME = "EX4D Source"
CLIP_START = 0.01  # m; the DW-mesh starts close to the camera
MOVIE_EXTS = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mxf", ".mpg", ".mpeg", ".ogv"}
IMAGE_GLOB = "*.png;*.jpg;*.jpeg;*.exr;*.tif;*.tiff"
SEQUENCE_FPS = 24.0  # image sequences have no frame rate: the backend's default


# ---- footage ------------------------------------------------------------------------------------------
def footage_source(path: Path) -> tuple[Path, str]:
    """(the footage path to use, its kind "MOVIE" | "SEQUENCE"): one file of an image sequence stands for
    its folder. Checks only that it exists (the backend reads it: size, rate, frame count)."""
    if path.is_file() and path.suffix.lower() not in MOVIE_EXTS:
        path = path.parent
    if path.is_dir():
        if not data.sorted_images(path):
            raise ValueError(f"no images (.png, .jpg, .exr, .tif) in {path}")
        return path, "SEQUENCE"
    if not path.is_file():
        raise FileNotFoundError(f"footage not found: {path}")
    return path, "MOVIE"


def footage_background(path: Path, kind: str) -> dict:
    """The footage as Blender data for the source camera's background (loaded lazily by Blender)."""
    if kind == "SEQUENCE":
        return {"image": data.load_footage_image(str(path)), "clip": None}
    return {"image": None, "clip": bpy.data.movieclips.load(str(path), check_existing=True)}


def _set_fps(scene: bpy.types.Scene, fps: float) -> None:
    """scene fps = fps / fps_base with an integer fps (29.97 -> 30 / 1.001)."""
    whole = max(1, int(round(fps)))
    scene.render.fps = whole
    scene.render.fps_base = whole / fps


def apply_source_camera(scene: bpy.types.Scene, cam_info: dict) -> bpy.types.Object:
    """The "EX4D Source" camera (created if missing, in the EX-4D collection) set to the backend's Blender
    camera data: ``matrix_world`` (4x4), ``lens``, ``sensor_width``/``sensor_height``/``sensor_fit``, shift."""
    s = props.settings(scene)
    obj = s.source_camera or bpy.data.objects.get(SOURCE_CAMERA_NAME)
    if obj is None or obj.type != "CAMERA":
        obj = bpy.data.objects.new(SOURCE_CAMERA_NAME, bpy.data.cameras.new(SOURCE_CAMERA_NAME))
    if not obj.users_collection:
        mesh_object.link(scene, obj)
    if "matrix_world" in cam_info and not source_camera.is_moving(obj):  # a solve or keys place it
        obj.rotation_mode = "XYZ"
        obj.matrix_world = Matrix(cam_info["matrix_world"])
    cam = obj.data
    for key in ("sensor_fit", "sensor_width", "sensor_height", "lens", "shift_x", "shift_y"):
        if key in cam_info:
            setattr(cam, key, cam_info[key])
    cam.clip_start = CLIP_START
    s.source_camera = obj
    return obj


def _show_background(cam_obj: bpy.types.Object, info: dict, frame_start: int) -> None:
    cam = cam_obj.data
    cam.show_background_images = True
    for bg in list(cam.background_images):
        cam.background_images.remove(bg)
    bg = cam.background_images.new()
    if info["clip"] is not None:
        bg.source = "MOVIE_CLIP"
        info["clip"].frame_start = frame_start
        bg.clip = info["clip"]
        bg.clip_user.use_render_undistorted = False
    else:
        bg.source = "IMAGE"
        bg.image = info["image"]
        data.configure_image_user(bg.image_user, info["image"], frame_start, info["frames"])
    bg.alpha = 1.0
    bg.display_depth = "BACK"
    bg.frame_method = "FIT"


def _sensor_params(scene) -> dict:
    """The source camera's sensor as the backend's intrinsics parameters (its own values, if it exists)."""
    cam = scene.ex4d.source_camera
    return {"sensor_width": float(cam.data.sensor_width)} if cam is not None and cam.type == "CAMERA" else {}


def import_job(context, raw: str, focal_px: float | None = None, use_solve: bool = False) -> runner.Job:
    """The (not yet started) import of footage ``raw`` (a movie, a sequence folder or one of its files).

    The backend's ``probe_footage`` reads its size, rate and frame count (a sequence numbered from 1001
    included) and gives the source camera; the scene is set when it answers. ``focal_px`` None keeps the
    scene's Focal (px). ``use_solve``: the source camera follows the footage's Movie Clip camera solve (also
    when it is solved later; one already solved is followed anyway)."""
    scene = context.scene
    if not raw:
        raise BackendError("bad_input", "no footage given", hint="choose a video file or an image-sequence folder")
    try:
        path, kind = footage_source(Path(bpy.path.abspath(raw)))
    except (OSError, ValueError) as exc:
        raise BackendError("bad_input", f"cannot import the footage: {exc}") from None
    s = scene.ex4d
    if focal_px is not None:
        s.focal_px = focal_px  # else the artist's Focal in the panel stays
    params = {"footage": str(path), "max_side": int(s.max_side), "focal_px": float(s.focal_px)}
    params.update(_sensor_params(scene))

    def finish(job: runner.Job, result: dict) -> str:
        n = int(result["frame_count"]) if not s.max_frames else min(int(result["frame_count"]), s.max_frames)
        fps = float(result.get("fps") or SEQUENCE_FPS)
        r = scene.render
        r.resolution_x, r.resolution_y, r.resolution_percentage = int(result["width"]), int(result["height"]), 100
        r.pixel_aspect_x = r.pixel_aspect_y = 1.0
        _set_fps(scene, fps)
        start = scene.frame_start
        scene.frame_end = start + n - 1
        scene.frame_current = start
        s.footage_path = rel(path)
        s.n_frames = n
        s.processing_width, s.processing_height = int(result["processing_width"]), int(result["processing_height"])
        cam = apply_source_camera(scene, result)
        s.built_focal_px, s.mesh_stale = float(params["focal_px"]), False
        yield
        background = footage_background(path, kind)
        _show_background(cam, {**background, "frames": n}, start)
        if scene.camera is None:
            scene.camera = cam
        moving = source_camera.after_import(scene, cam, background["clip"], use_solve)
        return (
            f"EX-4D: {r.resolution_x}x{r.resolution_y}, {n} frames at {fps:g} fps "
            f"(processing {s.processing_width}x{s.processing_height})" + (f"; {moving}" if moving else "")
        )

    return runner.Job(context, "probe_footage", params, [str(path)], finish, label="Import")


class EX4D_OT_import_footage(runner.JobOperator, bpy.types.Operator):
    """Import a video or an image sequence: scene resolution, fps and frame range, the source camera with
    the footage as its background"""

    bl_idname = "ex4d.import_footage"
    bl_label = "Import Footage"
    bl_options = {"REGISTER", "UNDO"}

    filepath: StringProperty(  # type: ignore[valid-type]
        name="Footage", description="A video file or an image-sequence folder/file", subtype="FILE_PATH"
    )
    directory: StringProperty(subtype="DIR_PATH", options={"HIDDEN", "SKIP_SAVE"})  # type: ignore[valid-type]
    filter_glob: StringProperty(  # type: ignore[valid-type]
        default="*" + ";*".join(sorted(MOVIE_EXTS)) + ";" + IMAGE_GLOB, options={"HIDDEN"}
    )
    focal_px: FloatProperty(  # type: ignore[valid-type]
        name="Focal (px)",
        description="Source focal length in pixels at the processing resolution (not set: the panel's Focal)",
        default=500.0,
        min=1.0,
    )
    use_camera_solve: bpy.props.BoolProperty(  # type: ignore[valid-type]
        name="Use Camera Solve",
        description="The source camera follows the footage's Movie Clip camera solve (now or once solved)",
        default=False,
    )

    def invoke(self, context, event):
        context.window_manager.fileselect_add(self)
        return {"RUNNING_MODAL"}

    def make_job(self, context) -> runner.Job:
        focal = self.focal_px if self.properties.is_property_set("focal_px") else None
        return import_job(context, self.filepath or self.directory, focal, self.use_camera_solve)


class _NeedsFootage(runner.JobOperator):
    @classmethod
    def poll(cls, context):
        if not super().poll(context):
            return False
        if not context.scene.ex4d.footage_path:
            runner.poll_message(cls, "Import footage first")
            return False
        return True


def build_job(context, depth_filepath: str = "") -> runner.Job:
    """The (not yet started) build of the DW-mesh object (``depth_filepath``: else the scene's)."""
    s = context.scene.ex4d
    if depth_filepath:
        s.depth_filepath = rel(bpy.path.abspath(depth_filepath))
    params, paths = backend.clip_params(context)
    params.update(_sensor_params(context.scene))
    params["viewport_detail"] = mesh_object.viewport_detail(context)  # the viewport proxy (issue 16)
    focal = float(s.focal_px)
    scene = context.scene
    built = depth_tools.settings_hash(context)  # the mesh-relevant settings at submission

    def finish(job: runner.Job, result: dict):
        python = job.client.python if job.client is not None else None
        obj = yield from mesh_object.build_dwmesh_object(scene, result, backend_python=python)
        s.processing_width, s.processing_height = int(result["width"]), int(result["height"])
        s.n_frames = int(result["n_frames"])
        if "source_camera" in result:
            src = apply_source_camera(scene, result["source_camera"])
            src.data.clip_end = max(src.data.clip_end, 2.0 * float(obj.get("ex4d_extent", 0.0)))
        source_camera.attach_mesh(scene, obj, result)  # a moving source camera carries the DW-mesh
        s.built_focal_px, s.mesh_stale = focal, False
        scene.ex4d_depth.built_hash = built  # the stale flag compares the scene's settings with these
        notes = ""
        if not scene.render.use_lock_interface:  # the occlusion handler edits the mesh during renders
            scene.render.use_lock_interface = True
            notes = " (turned on Render > Lock Interface: the DW-mesh changes per frame while rendering)"
        s.last_warning = notes.strip(" ()")
        return f"EX-4D: DW-mesh {obj.name}: {result['n_vertices']} vertices, {result['n_frames']} frames{notes}"

    n = min(s.n_frames, s.max_frames) if s.max_frames else s.n_frames
    prepare = source_camera.source_params(context, n) if source_camera.settings(scene).use_moving_source else None
    return runner.Job(context, "build_dwmesh", params, paths, finish, label="DW-mesh", prepare=prepare)


class EX4D_OT_build_dwmesh(_NeedsFootage, bpy.types.Operator):
    """Build the DW-mesh (depth-watertight mesh) of the footage as an animated Blender object"""

    bl_idname = "ex4d.build_dwmesh"
    bl_label = "Build DW-Mesh"
    bl_options = {"REGISTER", "UNDO"}

    depth_filepath: StringProperty(  # type: ignore[valid-type]
        name="Depth File",
        description="Depth .npy/.npz/EXR sequence (empty: the scene's depth file, else the configured depth model)",
        subtype="FILE_PATH",
        default="",
    )

    def make_job(self, context) -> runner.Job:
        return build_job(context, self.depth_filepath)


def keyframe_preset_camera(scene: bpy.types.Scene, preset: str, result: dict) -> bpy.types.Object:
    """A new camera "EX4D <preset>" keyed on every frame from ``scene.frame_start`` with the backend's
    ``matrix_world``/``lens``/sensor values; it becomes the novel camera."""
    name = f"EX4D {preset}"
    obj = bpy.data.objects.new(name, bpy.data.cameras.new(name))
    mesh_object.link(scene, obj)
    cam = obj.data
    for key in ("sensor_fit", "sensor_width", "sensor_height", "shift_x", "shift_y"):
        if key in result:
            setattr(cam, key, result[key])
    s = props.settings(scene)
    src = s.source_camera
    cam.clip_start = CLIP_START
    if src is not None and src.type == "CAMERA":
        cam.clip_end = src.data.clip_end
    data.keyframe_camera(obj, np.asarray(result["matrix_world"]), result["lens"], scene.frame_start)
    obj["ex4d_preset"] = preset
    s.novel_camera = obj
    return obj


def preset_job(context, preset: str) -> runner.Job:
    """The (not yet started) request of a preset path from the backend, keyed on a new novel camera."""
    params, paths = backend.clip_params(context)
    params.update(_sensor_params(context.scene))
    params["preset"] = preset.lower()
    scene = context.scene

    def finish(job: runner.Job, result: dict) -> str:
        keyframe_preset_camera(scene, preset, result)
        return str(tip_("EX-4D: camera preset {}, {} frames")).format(preset, result["n_frames"])

    s = scene.ex4d
    n = min(s.n_frames, s.max_frames) if s.max_frames else s.n_frames
    moving = source_camera.settings(scene).use_moving_source  # the preset follows the moving source (issue 15)
    prepare = source_camera.source_params(context, n) if moving else None
    return runner.Job(context, "camera_preset", params, paths, finish, label="Camera preset", prepare=prepare)


class EX4D_OT_add_camera_preset(_NeedsFootage, bpy.types.Operator):
    """Add a novel camera keyed on every frame to one of the reference's paths (a starting point to edit)"""

    bl_idname = "ex4d.add_camera_preset"
    bl_label = "Add Camera Preset"
    bl_options = {"REGISTER", "UNDO"}

    preset: EnumProperty(name="Preset", items=props.PRESET_ITEMS, default="30")  # type: ignore[valid-type]

    def make_job(self, context) -> runner.Job:
        return preset_job(context, self.preset)


CLASSES = (EX4D_OT_import_footage, EX4D_OT_build_dwmesh, EX4D_OT_add_camera_preset)


def register() -> None:
    props.register_classes(CLASSES)


def unregister() -> None:
    props.unregister_classes(CLASSES)
