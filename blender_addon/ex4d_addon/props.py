"""Add-on preferences and per-scene settings (no operators, no backend calls)."""

import os
from pathlib import Path

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, PointerProperty, StringProperty

ADDON_ID = __package__  # "bl_ext.<repository>.ex4d" when installed as an extension
PATH_FILE_NAME = "backend_python"
ENV_VAR = "EX4D_BACKEND_PYTHON"


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
    when none is found."""
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


def prefs(context: bpy.types.Context | None = None) -> "EX4D_AddonPreferences | None":
    """The add-on preferences, or None when the add-on is not registered as an add-on (tests)."""
    context = context or bpy.context
    addon = context.preferences.addons.get(ADDON_ID)
    return addon.preferences if addon else None


class EX4D_AddonPreferences(bpy.types.AddonPreferences):
    bl_idname = ADDON_ID

    backend_python: StringProperty(
        name="Backend Python",
        description="Python of the backend environment (empty: found automatically, see the docs)",
        subtype="FILE_PATH",
        default="",
    )
    models_dir: StringProperty(
        name="Models Folder", description="Model weights (empty: the backend's default)", subtype="DIR_PATH", default=""
    )
    store_dir: StringProperty(
        name="Job Store", description="Backend job store (empty: the backend's default)", subtype="DIR_PATH", default=""
    )
    device: EnumProperty(
        name="Device",
        items=[("auto", "Auto", "GPU when present"), ("cuda", "CUDA", "NVIDIA GPU"), ("cpu", "CPU", "CPU (slow)")],
        default="auto",
    )
    vram_profile: EnumProperty(
        name="VRAM Profile",
        items=[
            ("full", "Full", "Everything on the GPU (80 GB class)"),
            ("24gb", "24 GB", "Offload part of the model (24 GB class)"),
            ("12gb", "12 GB", "Sequential offload (slow, 12 GB class)"),
        ],
        default="full",
    )
    depth_model: EnumProperty(
        name="Depth Model",
        items=[
            ("depthcrafter", "DepthCrafter", "The reference's depth model"),
            ("depth-anything-v2", "Depth Anything V2", "Faster"),
        ],
        default="depthcrafter",
    )
    keep_model_loaded: IntProperty(
        name="Keep Model Loaded (s)",
        description="Seconds the backend keeps the generator in memory after a generation, so the next one "
        "starts at once (0: load it for each generation and free the memory right after)",
        default=600,
        min=0,
        soft_max=3600,
    )
    backend_info: StringProperty(name="Backend", default="")

    def draw(self, context):
        layout = self.layout
        layout.prop(self, "backend_python")
        path, where = find_backend_python(self.backend_python)
        layout.label(text=f"Using: {path or '-'} ({where})")
        layout.prop(self, "models_dir")
        layout.prop(self, "store_dir")
        row = layout.row()
        row.prop(self, "device")
        row.prop(self, "vram_profile")
        layout.prop(self, "depth_model")
        layout.prop(self, "keep_model_loaded")
        layout.operator("ex4d.check_backend", icon="CHECKMARK")
        for line in self.backend_info.split("\n"):
            if line:
                layout.label(text=line)


def _focal_changed(settings, context) -> None:
    """Keep the source camera's lens in step with the focal length in pixels."""
    from . import ops_scene

    ops_scene.update_source_lens(settings.id_data)


class EX4D_SceneSettings(bpy.types.PropertyGroup):
    """Per-scene EX-4D state. Paths are absolute or Blender-relative (``//``)."""

    footage_path: StringProperty(name="Footage", subtype="FILE_PATH", default="")
    depth_filepath: StringProperty(
        name="Depth File", description="Depth .npy/.npz/EXR (empty: estimate with the depth model)", subtype="FILE_PATH"
    )
    depth_kind: EnumProperty(
        name="Depth Kind",
        items=[("depth", "Depth", "Distance along z"), ("disparity", "Disparity", "Inverse depth")],
        default="depth",
    )
    focal_px: FloatProperty(
        name="Focal (px)",
        description="Source focal length in pixels at the processing resolution (reference: 500)",
        default=500.0,
        min=1.0,
        update=_focal_changed,
    )
    max_frames: IntProperty(name="Max Frames", description="Use the first N frames (0: all)", default=0, min=0)
    max_side: IntProperty(
        name="Max Side", description="Long side of the processing resolution (px)", default=1024, min=16
    )
    processing_width: IntProperty(name="Processing Width", default=0)
    processing_height: IntProperty(name="Processing Height", default=0)
    n_frames: IntProperty(name="Frames", default=0)
    source_camera: PointerProperty(name="Source Camera", type=bpy.types.Object)
    novel_camera: PointerProperty(name="Novel Camera", type=bpy.types.Object, poll=lambda self, ob: ob.type == "CAMERA")
    dwmesh: PointerProperty(name="DW-Mesh", type=bpy.types.Object)
    guide_color_dir: StringProperty(name="Guide Colour", subtype="DIR_PATH", default="")
    guide_mask_dir: StringProperty(name="Guide Mask", subtype="DIR_PATH", default="")
    camera_hash: StringProperty(name="Camera Hash", default="")
    preset: EnumProperty(
        name="Preset",
        items=[
            ("30", "Orbit 30°", ""),
            ("60", "Orbit 60°", ""),
            ("90", "Orbit 90°", ""),
            ("180", "Sweep (180)", ""),
            ("ZOOM_IN", "Zoom In", ""),
            ("ZOOM_OUT", "Zoom Out", ""),
        ],
        default="30",
    )
    generator: EnumProperty(
        name="Generator",
        items=[
            ("EX4D", "EX-4D", "Wan2.1 + EX-4D (GPU)"),
            ("PREVIEW", "Preview", "Fast preview without diffusion (CPU)"),
        ],
        default="EX4D",
    )
    seed: IntProperty(name="Seed", default=0, min=0)
    steps: IntProperty(name="Steps", default=25, min=1, max=200)
    prompt: StringProperty(
        name="Prompt",
        default="4K ultra HD, surround motion, realistic tone, panoramic shot, wide-angle view, cinematic quality",
    )
    # status of the running job (shown in the panel)
    job_running: BoolProperty(default=False)
    job_stage: StringProperty(default="")
    job_progress: FloatProperty(default=0.0, min=0.0, max=1.0, subtype="FACTOR")
    job_message: StringProperty(default="")
    last_error: StringProperty(default="")


CLASSES = (EX4D_AddonPreferences, EX4D_SceneSettings)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.ex4d = PointerProperty(type=EX4D_SceneSettings)


def unregister() -> None:
    del bpy.types.Scene.ex4d
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
