"""Scene operators: ``ex4d.import_footage``, ``ex4d.build_dwmesh``, ``ex4d.add_camera_preset``.

World convention (the backend's, ``docs/ARCHITECTURE.md``): the backend's OpenCV world (x right, y down,
z forward; the camera of source frame 0) maps to Blender by ``CV_TO_BLENDER`` (X = x, Y = z, Z = -y): the
source camera "EX4D Source" sits at the origin looking along +Y with Z up. The DW-mesh object keeps OpenCV
vertex positions and has ``matrix_world = CV_TO_BLENDER``. Scene frame ``frame_start + i`` = clip frame i.

The add-on must not import ``ex4d_backend``; the little camera math it needs is replicated here (each
function names its original in ``ex4d_backend/cameras.py``; the tests compare them with the originals).
"""

from __future__ import annotations

import math
from pathlib import Path

import bpy
import numpy as np
from bpy.app.handlers import persistent
from bpy.props import EnumProperty, FloatProperty, StringProperty

from . import data

SOURCE_CAMERA_NAME = "EX4D Source"
DWMESH_NAME = "EX4D DW-Mesh"
SENSOR_WIDTH = 36.0  # mm; the sensor width spans the image width (sensor_fit HORIZONTAL)
CLIP_START, CLIP_END = 0.01, 1000.0  # the border ring sits at depth 100: keep it inside the far plane
MOVIE_EXTS = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mxf", ".mpg", ".mpeg", ".ogv"}
SEQUENCE_FPS = 24.0  # image sequences have no frame rate: the backend's default
DEFAULT_MAX_SIDE = 1024
BLOCKING_TIMEOUT = 6 * 3600.0  # s; background mode waits for the backend at most this long

# ---- replicated from ex4d_backend.cameras (tested against it) --------------------------------------
CV_TO_BLENDER = data.CV_TO_BLENDER  # cameras.CV_TO_BLENDER
FLIP_YZ = np.diag([1.0, -1.0, -1.0, 1.0])  # cameras.FLIP_YZ
PRESET_RADIUS_OFFSET = 0.15  # cameras.PRESET_RADIUS_OFFSET
ZOOM_DISTANCE = 0.5  # cameras.ZOOM_DISTANCE
PRESETS = ("30", "60", "90", "180", "ZOOM_IN", "ZOOM_OUT")


def processing_size(width: int, height: int, max_side: int | None = DEFAULT_MAX_SIDE) -> tuple[int, int]:
    """footage.processing_size: cap the long side at ``max_side``, round both sides to even numbers."""
    scale = 1.0
    if max_side and max(width, height) > max_side:
        scale = max_side / max(width, height)
    return max(2, int(round(width * scale / 2)) * 2), max(2, int(round(height * scale / 2)) * 2)


def focal_px_to_lens(focal_px: float, width: int, sensor_width: float = SENSOR_WIDTH) -> float:
    """cameras.intrinsics_to_blender (HORIZONTAL fit, square pixels): lens (mm) = fx * sensor_width / W."""
    return float(focal_px) * sensor_width / float(width)


def look_at(eye: np.ndarray, target: np.ndarray, up=(0.0, 1.0, 0.0)) -> np.ndarray:
    """cameras.look_at: OpenCV world-to-camera of a camera at ``eye`` looking at ``target`` (rows -right', up', f)."""
    eye, target, up = (np.asarray(a, dtype=np.float64) for a in (eye, target, up))
    f = target - eye
    f = f / np.linalg.norm(f)
    right = np.cross(f, up)
    right = right / np.linalg.norm(right)
    up2 = np.cross(right, f)
    up2 = up2 / np.linalg.norm(up2)
    rot = np.stack([-right, up2, f])
    e = np.eye(4)
    e[:3, :3] = rot
    e[:3, 3] = -rot @ eye
    return e


def preset_eyes(preset: str, n_frames: int, r: float) -> np.ndarray:
    """cameras.preset_eyes: (N, 3) camera centres of a preset in the OpenCV world (the reference's formulas)."""
    name = str(preset).strip().lower()
    if name == "180":
        a = np.linspace(0.0, 2.0 * np.pi, n_frames)
        return np.stack([r * np.sin(a), 0.2 * r * (np.cos(a) - 1.0), np.zeros_like(a)], axis=1)
    if name in ("zoom_in", "zoom_out"):
        sign = 1.0 if name == "zoom_in" else -1.0
        s = np.linspace(0.0, 1.0, n_frames)
        return np.stack([np.zeros_like(s), np.zeros_like(s), sign * ZOOM_DISTANCE * r * s], axis=1)
    a = np.linspace(0.0, np.deg2rad(int(name)), n_frames)
    c = np.abs(np.cos(a))
    return np.stack([r * np.sin(a), 0.2 * r * (c - 1.0), r - r * c], axis=1)


def preset_matrices(preset: str, n_frames: int, r: float) -> np.ndarray:
    """(N, 4, 4) Blender camera ``matrix_world`` of a preset: cameras.preset_path (target (0, 0, r), up (0, 1, 0))
    then cameras.opencv_to_blender_matrix_world = CV_TO_BLENDER @ inv(E) @ FLIP_YZ."""
    target = np.array([0.0, 0.0, r])
    ext = np.stack([look_at(e, target) for e in preset_eyes(preset, n_frames, r)])
    return CV_TO_BLENDER @ np.linalg.inv(ext) @ FLIP_YZ


def preset_radius_from_z(z0: np.ndarray) -> float:
    """cameras.preset_radius from the DW-mesh's frame-0 vertex z (= depth, the border ring already at its
    border depth): r = min + 0.15."""
    return float(np.min(np.asarray(z0, dtype=np.float64))) + PRESET_RADIUS_OFFSET


# ---- footage ------------------------------------------------------------------------------------------
def _footage_info(path: Path) -> dict:
    """Size, fps and frame count of a movie or image sequence, read by Blender itself (no torch)."""
    if path.is_file() and path.suffix.lower() not in MOVIE_EXTS:
        path = path.parent  # one file of an image sequence: the sequence is its folder
    if path.is_dir():
        files = data.sorted_images(path)
        if not files:
            raise ValueError(f"no images (.png, .jpg, .exr, .tif) in {path}")
        image = bpy.data.images.load(str(files[0]), check_existing=True)
        image.source = "SEQUENCE"
        w, h = int(image.size[0]), int(image.size[1])
        return {
            "kind": "SEQUENCE",
            "path": path,
            "width": w,
            "height": h,
            "fps": SEQUENCE_FPS,
            "frames": len(files),
            "image": image,
            "clip": None,
        }
    if not path.is_file():
        raise FileNotFoundError(f"footage not found: {path}")
    clip = bpy.data.movieclips.load(str(path), check_existing=True)
    w, h = int(clip.size[0]), int(clip.size[1])
    if w <= 0 or h <= 0 or clip.frame_duration <= 0:
        raise ValueError(f"Blender cannot read this movie: {path}")
    fps = float(clip.fps) if clip.fps > 0 else 24.0
    image = data.load_footage_image(str(path))
    return {
        "kind": "MOVIE",
        "path": path,
        "width": w,
        "height": h,
        "fps": fps,
        "frames": int(clip.frame_duration),
        "image": image,
        "clip": clip,
    }


def _set_fps(scene: bpy.types.Scene, fps: float) -> None:
    """scene fps = fps / fps_base with an integer fps (29.97 -> 30 / 1.001)."""
    whole = max(1, int(round(fps)))
    scene.render.fps = whole
    scene.render.fps_base = whole / fps


def source_camera(scene: bpy.types.Scene) -> bpy.types.Object:
    """The "EX4D Source" camera (created if missing): at the origin looking along +Y, Z up."""
    obj = scene.ex4d.source_camera or bpy.data.objects.get(SOURCE_CAMERA_NAME)
    if obj is None or obj.type != "CAMERA":
        obj = bpy.data.objects.new(SOURCE_CAMERA_NAME, bpy.data.cameras.new(SOURCE_CAMERA_NAME))
    if obj.name not in scene.collection.objects and not obj.users_collection:
        scene.collection.objects.link(obj)
    obj.location = (0.0, 0.0, 0.0)
    obj.rotation_mode = "XYZ"
    obj.rotation_euler = (math.pi / 2.0, 0.0, 0.0)  # = CV_TO_BLENDER @ FLIP_YZ: looks along +Y, Z up
    obj.scale = (1.0, 1.0, 1.0)
    cam = obj.data
    cam.sensor_fit = "HORIZONTAL"
    cam.sensor_width = SENSOR_WIDTH
    cam.shift_x = cam.shift_y = 0.0  # the reference's principal point is the image centre
    cam.clip_start, cam.clip_end = CLIP_START, CLIP_END
    scene.ex4d.source_camera = obj
    return obj


def update_source_lens(scene: bpy.types.Scene) -> None:
    """Source lens (mm) from ``scene.ex4d.focal_px`` at the processing resolution."""
    s = scene.ex4d
    cam = s.source_camera
    if cam is not None and cam.type == "CAMERA" and s.processing_width > 0:
        cam.data.lens = focal_px_to_lens(s.focal_px, s.processing_width, cam.data.sensor_width)


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


class EX4D_OT_import_footage(bpy.types.Operator):
    """Import a video or an image sequence: scene resolution, fps and frame range, the source camera with
    the footage as its background"""

    bl_idname = "ex4d.import_footage"
    bl_label = "Import Footage"
    bl_options = {"REGISTER", "UNDO"}

    filepath: StringProperty(
        name="Footage", description="A video file or an image-sequence folder/file", subtype="FILE_PATH"
    )
    directory: StringProperty(subtype="DIR_PATH", options={"HIDDEN", "SKIP_SAVE"})
    focal_px: FloatProperty(
        name="Focal (px)",
        description="Source focal length in pixels at the processing resolution (the reference: 500)",
        default=500.0,
        min=1.0,
    )

    def invoke(self, context, event):
        context.window_manager.fileselect_add(self)
        return {"RUNNING_MODAL"}

    def execute(self, context):
        scene = context.scene
        raw = self.filepath or self.directory
        if not raw:
            self.report({"ERROR"}, "EX-4D: no footage given -- choose a video file or an image-sequence folder")
            return {"CANCELLED"}
        path = Path(bpy.path.abspath(raw))
        try:
            info = _footage_info(path)
        except (OSError, ValueError, RuntimeError) as exc:
            self.report({"ERROR"}, f"EX-4D: cannot import the footage: {exc}")
            return {"CANCELLED"}
        s = scene.ex4d
        n = info["frames"] if not s.max_frames else min(info["frames"], s.max_frames)
        pw, ph = processing_size(info["width"], info["height"], s.max_side or DEFAULT_MAX_SIDE)
        r = scene.render
        r.resolution_x, r.resolution_y, r.resolution_percentage = info["width"], info["height"], 100
        r.pixel_aspect_x = r.pixel_aspect_y = 1.0
        _set_fps(scene, info["fps"])
        start = scene.frame_start
        scene.frame_end = start + n - 1
        scene.frame_current = start
        s.footage_path = str(info["path"])
        s.processing_width, s.processing_height, s.n_frames = pw, ph, n
        s.focal_px = self.focal_px
        cam = source_camera(scene)
        update_source_lens(scene)
        _show_background(cam, info, start)
        if scene.camera is None:
            scene.camera = cam
        self.report(
            {"INFO"},
            f"EX-4D: {info['width']}x{info['height']}, {n} frames at {info['fps']:g} fps (processing {pw}x{ph})",
        )
        return {"FINISHED"}


# ---- DW-mesh ------------------------------------------------------------------------------------------
_OCCLUSION_CACHE: dict[str, np.ndarray] = {}


def _occlusion(path: str) -> np.ndarray | None:
    arr = _OCCLUSION_CACHE.get(path)
    if arr is None:
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError):
            return None
        _OCCLUSION_CACHE[path] = arr
    return arr


def _faces(obj: bpy.types.Object) -> np.ndarray | None:
    """(F, 3) vertex indices of the DW-mesh (cached; the topology never changes)."""
    key = f"faces:{obj.name_full}:{len(obj.data.polygons)}"
    arr = _OCCLUSION_CACHE.get(key)
    if arr is None:
        mesh = obj.data
        if len(mesh.polygons) == 0 or mesh.polygons[0].loop_total != 3:
            return None
        arr = np.empty(len(mesh.loops), dtype=np.int32)
        mesh.loops.foreach_get("vertex_index", arr)
        arr = arr.reshape(-1, 3)
        if len(arr) != len(mesh.polygons):
            return None
        _OCCLUSION_CACHE[key] = arr
    return arr


def apply_occlusion(obj: bpy.types.Object, frame: int) -> bool:
    """Write clip frame (``frame`` - start)'s occlusion flags into the DW-mesh's face attribute and material
    indices (slot 1 = the occlusion colour). True when something was written."""
    path = obj.get("ex4d_occlusion_npy")
    mesh = obj.data
    if not path or mesh is None:
        return False
    occ = _occlusion(bpy.path.abspath(path))
    if occ is None or occ.shape[1] != len(mesh.polygons):
        return False
    t = int(min(max(frame - int(obj.get("ex4d_frame_start", 1)), 0), occ.shape[0] - 1))
    if obj.get("ex4d_occlusion_frame") == t and data.OCCLUSION_ATTRIBUTE in mesh.attributes:
        return False
    flags = np.asarray(occ[t], dtype=bool)
    data.set_face_bool(mesh, data.OCCLUSION_ATTRIBUTE, flags)
    mat_index = mesh.attributes.get("material_index")  # the attribute API is ~1000x faster than polygons
    if mat_index is None:
        mat_index = mesh.attributes.new("material_index", "INT", "FACE")
    mat_index.data.foreach_set("value", flags.astype(np.int32))
    faces = _faces(obj)
    if faces is not None:  # the guide's vertex alpha: 0 on every vertex of an occlusion face
        seen = np.ones(len(mesh.vertices), dtype=np.float32)
        seen[faces[flags].ravel()] = 0.0
        data.set_point_gray(mesh, data.MASK_ATTRIBUTE, seen)
    mesh.update_tag()
    obj["ex4d_occlusion_frame"] = t
    return True


def dwmesh_objects() -> list:
    return [ob for ob in bpy.data.objects if ob.type == "MESH" and ob.get("ex4d_occlusion_npy")]


@persistent
def _on_frame_change(scene, depsgraph=None):  # noqa: ARG001
    for ob in dwmesh_objects():
        apply_occlusion(ob, scene.frame_current)


@persistent
def _on_load_post(*_args):
    _OCCLUSION_CACHE.clear()
    for ob in dwmesh_objects():
        ob["ex4d_occlusion_frame"] = -1
        apply_occlusion(ob, bpy.context.scene.frame_current if bpy.context.scene else 1)


def occlusion_material() -> bpy.types.Material:
    mat = bpy.data.materials.get("EX4D Occlusion") or bpy.data.materials.new("EX4D Occlusion")
    mat.diffuse_color = data.OCCLUDED_COLOR  # Workbench (material colour) and the viewport
    if bpy.app.version < (5, 0, 0):  # always node-based (and deprecated) in 5.0
        mat.use_nodes = True
    nodes = mat.node_tree.nodes
    nodes.clear()
    emit = nodes.new("ShaderNodeEmission")
    emit.inputs["Color"].default_value = data.OCCLUDED_COLOR
    out = nodes.new("ShaderNodeOutputMaterial")
    mat.node_tree.links.new(emit.outputs["Emission"], out.inputs["Surface"])
    return mat


def build_dwmesh_object(scene: bpy.types.Scene, result: dict, name: str = DWMESH_NAME) -> bpy.types.Object:
    """The DW-mesh object from a ``build_dwmesh`` result (paths of the backend's files, see PROTOCOL.md).

    One mesh with the pixel-grid topology, its base positions = clip frame 0; a Mesh Cache modifier plays
    the backend's PC2 (OpenCV coordinates: the object's ``matrix_world`` is CV_TO_BLENDER); UVs at pixel
    centres; the ``ex4d_occluded`` face attribute (and material slot 1, magenta) follows the frame."""
    w, h = int(result["width"]), int(result["height"])
    faces = np.load(result["faces_npy"])
    pos0 = np.asarray(data.read_pc2(result["positions_pc2"])[0])
    old = bpy.data.objects.get(name)
    if old is not None:
        old_mesh = old.data
        bpy.data.objects.remove(old)
        if old_mesh is not None and old_mesh.users == 0:
            bpy.data.meshes.remove(old_mesh)
    mesh = data.mesh_from_arrays(name, pos0, faces, data.grid_uvs(w, h))
    obj = bpy.data.objects.new(name, mesh)
    scene.collection.objects.link(obj)
    from mathutils import Matrix

    obj.matrix_world = Matrix(CV_TO_BLENDER.tolist())
    start = scene.frame_start
    data.add_mesh_cache(obj, result["positions_pc2"], start)
    s = scene.ex4d
    image = None
    if s.footage_path:
        try:
            image = data.load_footage_image(bpy.path.abspath(s.footage_path))
        except (OSError, RuntimeError, ValueError):
            image = None
    mat = data.footage_material("EX4D Footage", image, start, int(result["n_frames"]))
    mesh.materials.append(mat)
    mesh.materials.append(occlusion_material())
    obj["ex4d_occlusion_npy"] = result["occlusion_npy"]
    obj["ex4d_positions_npy"] = result.get("positions_npy", "")
    obj["ex4d_frame_start"] = start
    obj["ex4d_n_frames"] = int(result["n_frames"])
    obj["ex4d_size"] = [w, h]
    obj["ex4d_K"] = [float(v) for row in result["K"] for v in row]
    obj["ex4d_job"] = result.get("job", "")
    obj["ex4d_occlusion_frame"] = -1
    apply_occlusion(obj, scene.frame_current)
    s.dwmesh = obj
    return obj


class _BackendJobMixin:
    """Runs one backend request: blocking in background mode, modal with a timer in the UI."""

    _client = None
    _req = None
    _timer = None

    def _start(self, context, type_: str, params: dict, paths: list) -> set:
        from . import backend

        s = context.scene.ex4d
        s.last_error = ""
        if bpy.app.background or not context.window_manager.windows:
            try:
                result = backend.run_blocking(context, type_, params, paths, timeout=BLOCKING_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - BackendError and anything the client raises
                return self._fail(context, exc)
            return self._finish(context, result)
        try:
            self._client, self._req = backend.submit(context, type_, params, paths)
        except Exception as exc:  # noqa: BLE001
            return self._fail(context, exc)
        s.job_running, s.job_stage, s.job_progress, s.job_message = True, type_, 0.0, "starting the backend"
        self._timer = context.window_manager.event_timer_add(0.1, window=context.window)
        context.window_manager.modal_handler_add(self)
        return {"RUNNING_MODAL"}

    def _fail(self, context, exc) -> set:
        from . import backend

        text = backend.error_text(exc) if hasattr(exc, "code") else f"EX-4D: {exc}"
        context.scene.ex4d.last_error = text
        self.report({"ERROR"}, text)
        return {"CANCELLED"}

    def _stop(self, context) -> None:
        if self._timer is not None:
            context.window_manager.event_timer_remove(self._timer)
            self._timer = None
        context.scene.ex4d.job_running = False

    def modal(self, context, event):
        s = context.scene.ex4d
        if event.type == "ESC" and self._client is not None:
            self._client.cancel(self._req.id)
            s.job_message = "cancelling"
            return {"RUNNING_MODAL"}
        if event.type != "TIMER":
            return {"PASS_THROUGH"}
        self._client.poll()
        req = self._req
        if req.progress:
            stage, step, total, message = req.progress
            s.job_stage, s.job_progress, s.job_message = stage, req.fraction, f"{message} ({step}/{total})"
        for area in context.screen.areas if context.screen else []:
            area.tag_redraw()
        if not req.done:
            return {"RUNNING_MODAL"}
        self._stop(context)
        if req.error is not None:
            from .backend_client import BackendError

            return self._fail(context, BackendError.from_event(req.error))
        return self._finish(context, req.result)

    def cancel(self, context):
        if self._client is not None and self._req is not None and not self._req.done:
            self._client.cancel(self._req.id)
        self._stop(context)


class EX4D_OT_build_dwmesh(_BackendJobMixin, bpy.types.Operator):
    """Build the DW-mesh (depth-watertight mesh) of the footage as an animated Blender object"""

    bl_idname = "ex4d.build_dwmesh"
    bl_label = "Build DW-Mesh"
    bl_options = {"REGISTER", "UNDO"}

    depth_filepath: StringProperty(
        name="Depth File",
        description="Depth .npy/.npz/EXR sequence (empty: the scene's depth file, else the configured depth model)",
        subtype="FILE_PATH",
        default="",
    )

    def execute(self, context):
        from . import backend

        s = context.scene.ex4d
        if self.depth_filepath:
            s.depth_filepath = self.depth_filepath
        try:
            params, paths = backend.clip_params(context)
        except Exception as exc:  # noqa: BLE001
            return self._fail(context, exc)
        return self._start(context, "build_dwmesh", params, paths)

    def _finish(self, context, result: dict) -> set:
        s = context.scene.ex4d
        obj = build_dwmesh_object(context.scene, result)
        context.scene.render.use_lock_interface = True  # the occlusion handler edits the mesh during renders
        s.processing_width, s.processing_height = int(result["width"]), int(result["height"])
        s.n_frames = int(result["n_frames"])
        update_source_lens(context.scene)
        s.job_stage, s.job_progress, s.job_message = "mesh", 1.0, "DW-mesh ready"
        self.report(
            {"INFO"}, f"EX-4D: DW-mesh {obj.name}: {result['n_vertices']} vertices, {result['n_frames']} frames"
        )
        return {"FINISHED"}


def keyframe_preset_camera(scene: bpy.types.Scene, preset: str, matrices: np.ndarray, lens) -> bpy.types.Object:
    """A new camera "EX4D <preset>" keyed on every frame from ``scene.frame_start``; becomes the novel camera."""
    name = f"EX4D {preset}"
    obj = bpy.data.objects.new(name, bpy.data.cameras.new(name))
    scene.collection.objects.link(obj)
    cam = obj.data
    cam.sensor_fit, cam.sensor_width = "HORIZONTAL", SENSOR_WIDTH
    cam.clip_start, cam.clip_end = CLIP_START, CLIP_END
    data.keyframe_camera(obj, matrices, lens, scene.frame_start)
    obj["ex4d_preset"] = preset
    scene.ex4d.novel_camera = obj
    return obj


class EX4D_OT_add_camera_preset(_BackendJobMixin, bpy.types.Operator):
    """Add a novel camera keyed on every frame to one of the reference's paths (a starting point to edit)"""

    bl_idname = "ex4d.add_camera_preset"
    bl_label = "Add Camera Preset"
    bl_options = {"REGISTER", "UNDO"}

    preset: EnumProperty(
        name="Preset",
        items=[
            ("30", "Orbit 30°", "Orbit 30 degrees around the nearest point"),
            ("60", "Orbit 60°", "Orbit 60 degrees"),
            ("90", "Orbit 90°", "Orbit 90 degrees"),
            ("180", "Sweep 180", "Swing left and back (the reference's 180 path)"),
            ("ZOOM_IN", "Zoom In", "Dolly in"),
            ("ZOOM_OUT", "Zoom Out", "Dolly out"),
        ],
        default="30",
    )

    def execute(self, context):
        scene = context.scene
        s = scene.ex4d
        obj = s.dwmesh
        if obj is not None and obj.get("ex4d_occlusion_npy"):
            # Local: r from the DW-mesh's frame-0 vertex z (= the depth, border ring included).
            mod = next((m for m in obj.modifiers if m.type == "MESH_CACHE"), None)
            try:
                pos0 = data.read_pc2(bpy.path.abspath(mod.filepath))[0] if mod else None
            except (OSError, ValueError):
                pos0 = None
            if pos0 is None:
                z0 = np.empty(len(obj.data.vertices) * 3, dtype=np.float32)
                obj.data.vertices.foreach_get("co", z0)
                pos0 = z0.reshape(-1, 3)
            n = int(obj.get("ex4d_n_frames", s.n_frames))
            w = int(obj["ex4d_size"][0])
            fx = float(obj["ex4d_K"][0])
            mats = preset_matrices(self.preset, n, preset_radius_from_z(np.asarray(pos0)[:, 2]))
            lens = focal_px_to_lens(fx, w)
            keyframe_preset_camera(scene, self.preset, mats, [lens])
            self.report({"INFO"}, f"EX-4D: camera preset {self.preset}, {n} frames")
            return {"FINISHED"}
        from . import backend

        try:
            params, paths = backend.clip_params(context)
        except Exception as exc:  # noqa: BLE001
            return self._fail(context, exc)
        params["preset"] = self.preset.lower()
        params["sensor_width"] = SENSOR_WIDTH
        return self._start(context, "camera_preset", params, paths)

    def _finish(self, context, result: dict) -> set:
        keyframe_preset_camera(context.scene, self.preset, np.asarray(result["matrix_world"]), result["lens"])
        self.report({"INFO"}, f"EX-4D: camera preset {self.preset}, {result['n_frames']} frames")
        return {"FINISHED"}


CLASSES = (EX4D_OT_import_footage, EX4D_OT_build_dwmesh, EX4D_OT_add_camera_preset)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    if _on_frame_change not in bpy.app.handlers.frame_change_pre:
        bpy.app.handlers.frame_change_pre.append(_on_frame_change)
    if _on_load_post not in bpy.app.handlers.load_post:
        bpy.app.handlers.load_post.append(_on_load_post)


def unregister() -> None:
    for lst, fn in ((bpy.app.handlers.frame_change_pre, _on_frame_change), (bpy.app.handlers.load_post, _on_load_post)):
        while fn in lst:
            lst.remove(fn)
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
    _OCCLUSION_CACHE.clear()
