"""The reference's defaults, defined once (EX4D_REFERENCE.md); every CLI flag, protocol default, settings
dataclass and job file takes its default from here.

Units: pixels at the processing resolution unless said; depth in scene units (the reference's).
"""

from __future__ import annotations

# -- footage -> frames ---------------------------------------------------------------------------
MAX_SIDE = 1024  # the reference caps the long side at 1024 px (area resampling)
NUM_FRAMES = 49  # frames the reference processes and generates (4k + 1)
SEQUENCE_FPS = 24.0  # frame rate reported for image sequences without one

# -- source camera ---------------------------------------------------------------------------------
FOCAL_PX = 500.0  # the reference's fx = fy at the processing resolution, principal point (W/2, H/2)
SENSOR_WIDTH_MM = 36.0  # Blender's default sensor (used to express fx as a lens in mm)
SENSOR_HEIGHT_MM = 24.0

# -- DW-mesh ---------------------------------------------------------------------------------------
BORDER_DEPTH = 100.0  # depth given to the outer one-pixel ring of every depth map
MESH_FILTER = "angle"  # occlusion-face test: smallest interior angle below 2.5 degrees
USE_DWMESH = True  # keep occlusion faces (watertight)

# -- guide rendering -------------------------------------------------------------------------------
NEAR, FAR = 1e-3, 1e3  # OpenGL clip planes of the reference's projection
RENDERER = "auto"  # cuda when an NVIDIA GPU with nvdiffrast is there, else the CPU rasteriser

# -- generation ------------------------------------------------------------------------------------
GENERATOR = "ex4d"
STEPS = 25  # denoising steps
CFG = 5.0  # classifier-free guidance scale
SHIFT = 5.0  # flow-matching sigma shift
SEED = 0
GEN_HEIGHT = 512  # the reference's size (a square guide's "auto" size, generation/sizing.py)
GEN_WIDTH = 512
GEN_SIZE = "auto"  # the generation size follows the guide's aspect (generation/sizing.py); or "WxH"
CHAIN_VARIANT = "given"  # how windows of a long shot are chained (generation/windows.py)
FRAME_SAMPLING = "windows"  # every source frame once; "reference": one linspace window
RESIZE = "crop"  # guide -> generation size: centre crop to the aspect, or "stretch" (the reference)
VRAM_PROFILE = "full"
DEVICE = "auto"
GEN_DEFAULTS = {  # the generation settings above by their protocol names (the add-on's copies are tested against it)
    "generator": GENERATOR,
    "steps": STEPS,
    "cfg": CFG,
    "shift": SHIFT,
    "seed": SEED,
    "size": GEN_SIZE,  # width / height given explicitly override it
    "num_frames": NUM_FRAMES,  # the window length (4k + 1)
    "chain_variant": CHAIN_VARIANT,
    "overlap": None,  # None: the chain variant's default (generation/windows.py DEFAULT_OVERLAP)
    "frame_sampling": FRAME_SAMPLING,
    "resize": RESIZE,
    "vram_profile": VRAM_PROFILE,
    "device": DEVICE,
}


def reference_prompts() -> tuple[str, str]:
    """(prompt, negative prompt) of the reference's generate.py (defined in generation.conditioning)."""
    from .generation.conditioning import REFERENCE_NEGATIVE, REFERENCE_PROMPT

    return REFERENCE_PROMPT, REFERENCE_NEGATIVE
