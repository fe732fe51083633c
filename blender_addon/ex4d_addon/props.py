"""Add-on preferences and per-scene settings (no operators, no backend calls, no file I/O in ``draw``).

Module graph (no cycles): ``compat``, ``data`` (leaves) <- ``props`` <- ``backend`` <- ``runner`` <-
``sampling``, ``outputs``, ``strips``, ``mesh_object`` <- ``ops_scene``, ``ops_jobs`` <- ``panels``.

The generation defaults below (steps, CFG, shift, size, frames, prompt) are copies of the backend's; the
Blender test ``test_defaults_equal_the_backends`` proves they are equal to ``ex4d_backend``'s constants.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import bpy
from bpy.props import (
    BoolProperty,
    CollectionProperty,
    EnumProperty,
    FloatProperty,
    IntProperty,
    PointerProperty,
    StringProperty,
)

from . import compat

ADDON_ID = __package__  # "bl_ext.<repository>.ex4d" when installed as an extension
PATH_FILE_NAME = "backend_python"
ENV_VAR = "EX4D_BACKEND_PYTHON"

# Copies of the backend's defaults (tested equal to ex4d_backend's, see the module docstring).
DEFAULT_STEPS = 25
DEFAULT_CFG = 5.0
DEFAULT_SHIFT = 5.0
DEFAULT_NUM_FRAMES = 49
# -- long and wide shots (issue 14): the backend's GEN_DEFAULTS size / chain_variant / frame_sampling
DEFAULT_SIZE_MODE = "auto"  # width = height = 0 in the generation settings
DEFAULT_CHAIN_VARIANT = "given"
DEFAULT_FRAME_SAMPLING = "windows"
DEFAULT_FOCAL_PX = 500.0
DEFAULT_MAX_SIDE = 1024
REL = compat.blend_relative_path_options()  # path properties that keep a "//" (relative to the .blend) path
DEFAULT_PROMPT = "4K ultra HD, surround motion, realistic tone, panoramic shot, wide-angle view, cinematic quality"


PRESET_ITEMS = [  # the backend's preset names (camera_preset), upper case for Blender's enum
    ("30", "Orbit 30°", "Orbit 30 degrees around the nearest point"),
    ("60", "Orbit 60°", "Orbit 60 degrees"),
    ("90", "Orbit 90°", "Orbit 90 degrees"),
    ("180", "Sweep 180", "Swing left and back (the reference's 180 path)"),
    ("ZOOM_IN", "Zoom In", "Dolly in"),
    ("ZOOM_OUT", "Zoom Out", "Dolly out"),
]


def register_classes(classes) -> None:
    for cls in classes:
        bpy.utils.register_class(cls)


def unregister_classes(classes) -> None:
    for cls in reversed(classes):
        bpy.utils.unregister_class(cls)


def path_file() -> Path:
    """Where scripts/install_deps.py records the backend Python: ``~/.config/ex4d/backend_python``
    (``$XDG_CONFIG_HOME/ex4d/...`` when set; Windows: ``%APPDATA%/ex4d/backend_python``)."""
    if os.name == "nt":
        base = Path(os.environ.get("APPDATA") or Path.home() / "AppData" / "Roaming")
    else:
        base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "ex4d" / PATH_FILE_NAME


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def find_backend_python(preference: str = "") -> tuple[str, str]:
    """(python path, where it came from). Order: the preference, ``$EX4D_BACKEND_PYTHON``, the path file
    written by the installer, a ``.venv`` next to a development checkout of the add-on. ("", reason)
    when none is found. Reads a file: never call it from ``draw``."""
    if preference.strip():
        return bpy.path.abspath(preference.strip()), "preferences"
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return env, f"${ENV_VAR}"
    pf = path_file()
    try:
        text = pf.read_text(encoding="utf-8").strip()
    except OSError:
        text = ""
    if text and Path(text).exists():
        return text, str(pf)
    here = Path(__file__).resolve()
    for parent in list(here.parents)[:4]:  # a symlinked development checkout: <repo>/blender_addon/ex4d_addon
        cand = _venv_python(parent / ".venv")
        if cand.exists():
            return str(cand), "development checkout"
    return "", f"not found: set it in the preferences, or ${ENV_VAR}, or run scripts/install_deps.py (writes {pf})"


def data_dir(*parts: str, create: bool = True) -> Path:
    """The add-on's own data folder: Blender's extension user folder (``bpy.utils.extension_path_user``),
    or the temp folder when the add-on is not installed as an extension (tests of a bare module)."""
    try:
        base = Path(bpy.utils.extension_path_user(ADDON_ID, path="/".join(parts), create=create))
    except (ValueError, AttributeError, TypeError):
        import tempfile

        base = Path(tempfile.gettempdir()) / "ex4d_addon" / Path(*parts) if parts else Path(tempfile.gettempdir())
        if create:
            base.mkdir(parents=True, exist_ok=True)
    return base


def settings(scene) -> Any:
    """``scene.ex4d`` (registered at run time, so the type stubs do not know it)."""
    return scene.ex4d


def prefs(context: bpy.types.Context | None = None) -> EX4D_AddonPreferences | None:
    """The add-on preferences, or None when the add-on is not registered as an add-on (tests)."""
    context = context or bpy.context
    addon = context.preferences.addons.get(ADDON_ID)
    return addon.preferences if addon else None  # type: ignore[return-value]


def _backend_python_changed(self, _context) -> None:
    path, where = find_backend_python(self.backend_python)
    self.backend_found = f"{path or '-'} ({where})"


class EX4D_AddonPreferences(bpy.types.AddonPreferences):
    bl_idname = ADDON_ID

    backend_python: StringProperty(  # type: ignore[valid-type]
        name="Backend Python",
        description="Python of the backend environment (empty: found automatically, see the docs)",
        subtype="FILE_PATH",
        default="",
        update=_backend_python_changed,
    )
    backend_found: StringProperty(name="Using", default="")  # type: ignore[valid-type]
    models_dir: StringProperty(  # type: ignore[valid-type]
        name="Models Folder", description="Model weights (empty: the backend's default)", subtype="DIR_PATH", default=""
    )
    store_dir: StringProperty(  # type: ignore[valid-type]
        name="Job Store", description="Backend job store (empty: the backend's default)", subtype="DIR_PATH", default=""
    )
    device: EnumProperty(  # type: ignore[valid-type]
        name="Device",
        items=[("auto", "Auto", "GPU when present"), ("cuda", "CUDA", "NVIDIA GPU"), ("cpu", "CPU", "CPU (slow)")],
        default="auto",
    )
    vram_profile: EnumProperty(  # type: ignore[valid-type]
        name="VRAM Profile",
        items=[
            ("full", "Full", "Everything on the GPU (80 GB class)"),
            ("24gb", "24 GB", "Offload part of the model (24 GB class)"),
            ("12gb", "12 GB", "Sequential offload (slow, 12 GB class)"),
        ],
        default="full",
    )
    depth_model: EnumProperty(  # type: ignore[valid-type]
        name="Depth Model",
        items=[
            ("depthcrafter", "DepthCrafter", "The reference's depth model"),
            ("depth-anything-v2", "Depth Anything V2", "Faster"),
        ],
        default="depthcrafter",
    )
    keep_model_loaded: IntProperty(  # type: ignore[valid-type]
        name="Keep Model Loaded (s)",
        description="Seconds the backend keeps the generator in memory after a generation, so the next one "
        "starts at once (0: load it for each generation and free the memory right after)",
        default=600,
        min=0,
        soft_max=3600,
    )
    viewport_mesh_detail: EnumProperty(  # type: ignore[valid-type]
        name="Viewport Mesh Detail",
        description="The DW-mesh object Blender shows (the backend's guides always use the full mesh)",
        items=[
            ("proxy", "Proxy", "Every few pixels (at most about 65,000 vertices per frame): quick to build, small"),
            ("full", "Full", "One vertex per pixel: slow to build (seconds at 1080p) and large (154 MB at 49 x 512²)"),
        ],
        default="proxy",
    )
    backend_info: StringProperty(name="Backend", default="")  # type: ignore[valid-type]
    # farm submission (ex4d.submit_farm; docs/farm.md)
    farm_project_dir: StringProperty(  # type: ignore[valid-type]
        name="Farm Project Folder",
        description="Where a submission collects the shot (footage, depth, job file) for the farm to read "
        "(empty: the .blend's folder)",
        subtype="DIR_PATH",
        default="",
    )
    farm_store: StringProperty(  # type: ignore[valid-type]
        name="Shared Store",
        description="The job store every farm worker shares (empty: the Job Store above, else the backend's default)",
        subtype="DIR_PATH",
        default="",
    )
    farm_engine: EnumProperty(  # type: ignore[valid-type]
        name="Farm Engine",
        items=[
            ("ray", "Ray", "Submit to a Ray cluster (a local one without an address)"),
            (
                "openjd",
                "OpenJD (export)",
                "Write an Open Job Description template (Deadline Cloud, openjd run); no submission",
            ),
        ],  # fmt: skip
        default="ray",
    )
    farm_ray_address: StringProperty(  # type: ignore[valid-type]
        name="Ray Address", description="e.g. ray://head:10001 (empty: start a local Ray cluster)", default=""
    )
    farm_max_retries: IntProperty(  # type: ignore[valid-type]
        name="Max Retries", description="Retries of a farm step whose worker died", default=3, min=0, max=20
    )

    def draw(self, context):
        layout = self.layout
        layout.prop(self, "backend_python")
        if self.backend_found:
            layout.label(text=self.backend_found, translate=False)
        layout.prop(self, "models_dir")
        layout.prop(self, "store_dir")
        row = layout.row()
        row.prop(self, "device")
        row.prop(self, "vram_profile")
        layout.prop(self, "depth_model")
        layout.prop(self, "keep_model_loaded")
        layout.prop(self, "viewport_mesh_detail")
        if self.viewport_mesh_detail == "full":
            layout.label(text="Full detail: slow to build and large in the job store", icon="INFO")
        layout.operator("ex4d.check_backend", icon="CHECKMARK")
        box = layout.box()
        box.label(text="Farm", icon="NETWORK_DRIVE")
        box.prop(self, "farm_engine")
        box.prop(self, "farm_project_dir")
        box.prop(self, "farm_store")
        if self.farm_engine == "ray":
            row = box.row()
            row.prop(self, "farm_ray_address")
            row.prop(self, "farm_max_retries")
        for line in self.backend_info.split("\n"):
            if line:
                layout.label(text=line, translate=False)


def _focal_changed(settings, _context) -> None:
    """The Focal (px) no longer matches what the source camera and the DW-mesh were made with: flag it
    (the panel warns; Build DW-Mesh applies it to both). Nothing is recomputed here."""
    settings.mesh_stale = settings.built_focal_px > 0 and abs(settings.focal_px - settings.built_focal_px) > 1e-6


class EX4D_SceneSettings(bpy.types.PropertyGroup):
    """Per-scene EX-4D state (``scene.ex4d``). Paths are stored relative to the .blend (``//``) when saved."""

    footage_path: StringProperty(name="Footage", subtype="FILE_PATH", default="", options=REL)  # type: ignore[valid-type]
    depth_filepath: StringProperty(  # type: ignore[valid-type]
        name="Depth File",
        description="Depth .npy/.npz/EXR (empty: estimate with the depth model)",
        subtype="FILE_PATH",
        options=REL,
    )
    depth_kind: EnumProperty(  # type: ignore[valid-type]
        name="Depth Kind",
        items=[("depth", "Depth", "Distance along z"), ("disparity", "Disparity", "Inverse depth")],
        default="depth",
    )
    focal_px: FloatProperty(  # type: ignore[valid-type]
        name="Focal (px)",
        description="Source focal length in pixels at the processing resolution (reference: 500); "
        "applied to the DW-mesh and the source camera by Build DW-Mesh",
        default=DEFAULT_FOCAL_PX,
        min=1.0,
        update=_focal_changed,
    )
    built_focal_px: FloatProperty(name="Focal of the Build", default=0.0)  # type: ignore[valid-type]
    mesh_stale: BoolProperty(name="DW-Mesh Out of Date", default=False)  # type: ignore[valid-type]
    max_frames: IntProperty(name="Max Frames", description="Use the first N frames (0: all)", default=0, min=0)  # type: ignore[valid-type]
    max_side: IntProperty(  # type: ignore[valid-type]
        name="Max Side", description="Long side of the processing resolution (px)", default=DEFAULT_MAX_SIDE, min=16
    )
    processing_width: IntProperty(name="Processing Width", default=0)  # type: ignore[valid-type]
    processing_height: IntProperty(name="Processing Height", default=0)  # type: ignore[valid-type]
    n_frames: IntProperty(name="Frames", default=0)  # type: ignore[valid-type]
    source_camera: PointerProperty(name="Source Camera", type=bpy.types.Object)  # type: ignore[valid-type]
    novel_camera: PointerProperty(  # type: ignore[valid-type]
        name="Novel Camera", type=bpy.types.Object, poll=lambda self, ob: ob.type == "CAMERA"
    )
    dwmesh: PointerProperty(name="DW-Mesh", type=bpy.types.Object)  # type: ignore[valid-type]
    guide_color_dir: StringProperty(name="Guide Colour", subtype="DIR_PATH", default="", options=REL)  # type: ignore[valid-type]
    guide_mask_dir: StringProperty(name="Guide Mask", subtype="DIR_PATH", default="", options=REL)  # type: ignore[valid-type]
    camera_hash: StringProperty(name="Camera Hash", default="")  # type: ignore[valid-type]
    preset: EnumProperty(name="Preset", items=PRESET_ITEMS, default="30")  # type: ignore[valid-type]
    generator: EnumProperty(  # type: ignore[valid-type]
        name="Generator",
        items=[
            ("EX4D", "EX-4D", "Wan2.1 + EX-4D (needs a CUDA GPU and the weights)"),
            ("PREVIEW", "Preview", "Fast preview without diffusion (CPU)"),
        ],
        default="EX4D",
    )
    seed: IntProperty(name="Seed", default=0, min=0)  # type: ignore[valid-type]
    steps: IntProperty(name="Steps", default=DEFAULT_STEPS, min=1, max=200)  # type: ignore[valid-type]
    prompt: StringProperty(name="Prompt", default=DEFAULT_PROMPT)  # type: ignore[valid-type]
    # status of the running job (shown in the panel)
    job_running: BoolProperty(default=False)  # type: ignore[valid-type]
    job_stage: StringProperty(default="")  # type: ignore[valid-type]
    job_progress: FloatProperty(default=0.0, min=0.0, max=1.0, subtype="FACTOR")  # type: ignore[valid-type]
    job_message: StringProperty(default="")  # type: ignore[valid-type]
    last_error: StringProperty(default="")  # type: ignore[valid-type]
    last_warning: StringProperty(default="")  # type: ignore[valid-type]


class EX4D_FarmSubmission(bpy.types.PropertyGroup):
    """One farm submission of this scene (``scene.ex4d_farm.submissions``), saved in the .blend."""

    sub_id: StringProperty(name="Submission")  # type: ignore[valid-type]
    engine: StringProperty(name="Engine")  # type: ignore[valid-type]
    store: StringProperty(name="Store", subtype="DIR_PATH")  # type: ignore[valid-type]
    job_file: StringProperty(name="Job File", subtype="FILE_PATH")  # type: ignore[valid-type]
    result_dir: StringProperty(name="Result Folder", subtype="DIR_PATH")  # type: ignore[valid-type]
    out_dir: StringProperty(name="Output Folder", subtype="DIR_PATH", options=REL)  # type: ignore[valid-type]
    camera_name: StringProperty(name="Camera")  # type: ignore[valid-type]
    generator: StringProperty(name="Generator")  # type: ignore[valid-type]
    n_frames: IntProperty(name="Frames")  # type: ignore[valid-type]
    state: StringProperty(name="State", default="submitted")  # type: ignore[valid-type]
    progress: FloatProperty(name="Progress", default=0.0, min=0.0, max=1.0, subtype="FACTOR")  # type: ignore[valid-type]
    message: StringProperty(name="Message")  # type: ignore[valid-type]
    loaded: BoolProperty(name="Loaded", default=False)  # type: ignore[valid-type]
    strip_name: StringProperty(name="Strip")  # type: ignore[valid-type]


class EX4D_FarmSettings(bpy.types.PropertyGroup):
    """``scene.ex4d_farm``: this scene's farm submissions, newest last."""

    submissions: CollectionProperty(type=EX4D_FarmSubmission)  # type: ignore[valid-type]
    auto_load: BoolProperty(  # type: ignore[valid-type]
        name="Load When Done", description="Load a finished submission into the sequencer on refresh", default=True
    )


class EX4D_JobSettings(bpy.types.PropertyGroup):
    """Job settings beyond ``scene.ex4d`` (``scene.ex4d_job``)."""

    width: IntProperty(  # type: ignore[valid-type]
        name="Width",
        description="Generated width (px, multiple of 16). 0: auto, the footage's aspect at the model's 480P "
        "area (832 x 480 for 16:9, 480 x 832 for 9:16, 512 x 512 square; one side given: the other from it)",
        default=0,
        min=0,
        max=4096,
        step=16,
    )
    height: IntProperty(  # type: ignore[valid-type]
        name="Height", description="Generated height (px, multiple of 16). 0: auto (see Width)", default=0, min=0,
        max=4096,
    )  # fmt: skip
    num_frames: IntProperty(  # type: ignore[valid-type]
        name="Window",
        description="Frames per generator call (4k + 1: 49, or 81). Every clip frame is generated, as "
        "chained windows of this length (with Frame Sampling 'Reference': this many frames over the clip)",
        default=DEFAULT_NUM_FRAMES,
        min=5,
        max=1001,
    )
    # -- long and wide shots (issue 14) ----------------------------------------------------------------
    chain_variant: EnumProperty(  # type: ignore[valid-type]
        name="Chaining",
        description="How each window continues the one before (docs/long_shots.md)",
        items=[
            ("given", "Given Overlap", "The overlap frames are the previous window's output (default)"),
            ("i2v", "First Frame", "Only the shared first frame comes from the previous window"),
            ("guide", "Guide", "Frame 0 from the previous window, the rest of the overlap from the guide"),
        ],
        default=DEFAULT_CHAIN_VARIANT,
    )
    overlap: IntProperty(  # type: ignore[valid-type]
        name="Overlap", description="Frames shared by consecutive windows (0: the chaining's default)", default=0,
        min=0, max=500,
    )  # fmt: skip
    frame_sampling: EnumProperty(  # type: ignore[valid-type]
        name="Frame Sampling",
        items=[
            ("windows", "Every Frame", "Every clip frame at the clip's rate, as chained windows"),
            ("reference", "Reference", "One window sampled over the whole clip (the reference: a time-lapse)"),
        ],
        default=DEFAULT_FRAME_SAMPLING,
    )
    use_preview_range: BoolProperty(  # type: ignore[valid-type]
        name="Preview Range",
        description="Generate the clip up to the end of the scene's preview range only (from the clip's start)",
        default=False,
    )
    cfg: FloatProperty(name="CFG", default=DEFAULT_CFG, min=0.0, max=100.0)  # type: ignore[valid-type]
    shift: FloatProperty(name="Shift", default=DEFAULT_SHIFT, min=0.0, max=100.0)  # type: ignore[valid-type]
    negative_prompt: StringProperty(name="Negative Prompt", description="Empty: the reference's", default="")  # type: ignore[valid-type]
    renderer: EnumProperty(  # type: ignore[valid-type]
        name="Guide Renderer",
        items=[("auto", "Auto", "CUDA when available"), ("cpu", "CPU", ""), ("cuda", "CUDA", "")],
        default="auto",
    )
    output_dir: StringProperty(  # type: ignore[valid-type]
        name="Output Folder",
        description="Where guides and results are written (// = next to the .blend; an unsaved file: the "
        "add-on's user folder, with a warning)",
        default="//ex4d",
        subtype="DIR_PATH",
        options=REL,
    )
    timeout: FloatProperty(  # type: ignore[valid-type]
        name="Time Limit",
        description="Background mode: cancel a job after this many seconds (0: none)",
        default=0.0,
        min=0.0,
    )
    # -- compositing results (issue 18: results_scene.py, stereo_ui.py) --
    results_in: EnumProperty(  # type: ignore[valid-type]
        name="Result Strips",
        description="Where guide and result strips go",
        items=[
            (
                "SCENE",
                "Results Scene",
                "Their own sequencer scene ('EX4D Results'): this scene's F12 render stays the 3D scene",
            ),
            (
                "CHANNEL",
                "This Scene",
                "This scene's sequencer, from the chosen channel up (F12 then renders the sequencer)",
            ),
        ],
        default="SCENE",
    )
    results_channel: IntProperty(  # type: ignore[valid-type]
        name="Channel", description="First channel for result strips in this scene (0: the first free one)",
        default=0, min=0, max=128,
    )  # fmt: skip
    results_scene: PointerProperty(name="Results Scene", type=bpy.types.Scene)  # type: ignore[valid-type]
    stereo_second_eye: EnumProperty(  # type: ignore[valid-type]
        name="Second Eye",
        description="Stereo 3D generation: how the right eye is generated",
        items=[
            ("independent", "Independent", "Each eye from its own guide"),
            ("reuse_first", "Reuse Left Eye", "The right eye's guide takes the left eye's result (warped by its "
             "depth) where only the left eye's generation filled it: both eyes invent the same content"),
        ],
        default="independent",
    )  # fmt: skip
    export_exr: BoolProperty(  # type: ignore[valid-type]
        name="EXR Passes",
        description="Also write an EXR sequence per guide and result: RGB, the guide mask as alpha, the novel "
        "view's depth (from the DW-mesh) as Z",
        default=False,
    )


CLASSES = (EX4D_AddonPreferences, EX4D_SceneSettings, EX4D_FarmSubmission, EX4D_FarmSettings, EX4D_JobSettings)


def register() -> None:
    register_classes(CLASSES)
    scene_type: Any = bpy.types.Scene
    scene_type.ex4d = PointerProperty(type=EX4D_SceneSettings)
    scene_type.ex4d_job = PointerProperty(type=EX4D_JobSettings)
    scene_type.ex4d_farm = PointerProperty(type=EX4D_FarmSettings)
    pref = prefs()
    if pref is not None:  # what the preferences show (found once here, not in draw)
        _backend_python_changed(pref, None)


def unregister() -> None:
    scene_type: Any = bpy.types.Scene
    del scene_type.ex4d_farm
    del scene_type.ex4d_job
    del scene_type.ex4d
    unregister_classes(CLASSES)
