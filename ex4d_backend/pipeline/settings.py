"""One settings dataclass per stage, with the reference's defaults (``constants``).

The CLI builds them from its flags, the service from the protocol's params (``from_params``: the same
field names as the protocol schema, absent fields take the defaults), and ``defaults()`` lists them all
for the add-on (the ``hello`` request's ``defaults`` field). ``key()`` is what a stage's cache key holds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from .. import constants as C


class _FromParams:
    """``from_params(p)``: the fields present (and not None) in a protocol params / job file dict."""

    @classmethod
    def from_params(cls, p: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in p.items() if k in names and v is not None})


@dataclass(frozen=True)
class FrameSettings(_FromParams):
    """footage -> frames: the first ``max_frames`` frames (0 = all), long side capped at ``max_side``."""

    max_frames: int = 0
    max_side: int = C.MAX_SIDE
    fps: float | None = None  # frame rate for image sequences / override

    def key(self) -> dict:
        return {"max_frames": self.max_frames, "max_side": self.max_side, "fps": self.fps}


@dataclass(frozen=True)
class DepthSettings(_FromParams):
    """frames -> depth: ``model`` "file" (``path``, ``kind``, ``repair``, ``scale``) or a depth model
    (``options``), run on ``device``; then ``adjust`` (``depth_adjust``: ``clip(scale * d + offset, near, far)``)."""

    model: str = "file"
    path: str | None = None
    kind: str = "depth"
    repair: bool = False
    scale: float = 1.0
    device: str = C.DEVICE
    options: dict = field(default_factory=dict)
    adjust: dict = field(default_factory=dict)  # scale, offset, near, far (``depth_adjust``), any model


@dataclass(frozen=True)
class IntrinsicsSettings(_FromParams):
    """The source camera's K at the processing resolution: ``focal_px``, or ``lens`` mm on a sensor of
    ``sensor_width`` x ``sensor_height`` mm spanning the side ``sensor_fit`` names; else fx = fy = 500.
    ``fy``, ``cx``, ``cy`` override single entries (CLI)."""

    focal_px: float | None = None
    lens: float | None = None
    sensor_width: float = C.SENSOR_WIDTH_MM
    sensor_height: float = C.SENSOR_HEIGHT_MM
    sensor_fit: str = "HORIZONTAL"
    fy: float | None = None
    cx: float | None = None
    cy: float | None = None

    def matrix(self, width: int, height: int) -> np.ndarray:
        """(3, 3) float64 K in pixels for a ``width`` x ``height`` processing size."""
        from ..cameras import blender_to_intrinsics, intrinsics_from_focal
        from ..errors import Ex4dError

        if self.lens is not None and not (self.lens > 0 and self.sensor_width > 0 and self.sensor_height > 0):
            raise Ex4dError(
                "focal length and sensor width must be positive", where=f"{self.lens} mm / {self.sensor_width} mm"
            )
        if self.focal_px is not None:
            k = intrinsics_from_focal(width, height, focal_px=float(self.focal_px))
        elif self.lens is not None:  # Blender's rule: the sensor size spans the side that sensor_fit names
            k = blender_to_intrinsics(
                float(self.lens),
                width,
                height,
                sensor_width=float(self.sensor_width),
                sensor_height=float(self.sensor_height),
                sensor_fit=self.sensor_fit,
            )
        else:
            k = intrinsics_from_focal(width, height)
        if self.fy is not None:
            k[1, 1] = self.fy
        if self.cx is not None:
            k[0, 2] = self.cx
        if self.cy is not None:
            k[1, 2] = self.cy
        return k


@dataclass(frozen=True)
class MeshSettings(_FromParams):
    """depth -> DW-mesh: occlusion-face filter and the depth of the border ring."""

    mesh_filter: str = C.MESH_FILTER
    border_depth: float = C.BORDER_DEPTH

    def key(self) -> list:
        return [self.mesh_filter, float(self.border_depth)]


@dataclass(frozen=True)
class SourceSettings(_FromParams):
    """The moving source camera (``pipeline.source``): ``source_camera`` a camera spec (blender, opencv, file
    or a CameraPath; None: the reference's static source at the origin) and ``depth_scale`` depth units ->
    world units (a number, (T,) per frame, or the solve's bundles to fit it to)."""

    source_camera: object = None
    depth_scale: object = 1.0


@dataclass(frozen=True)
class RenderSettings(_FromParams):
    """DW-mesh + camera -> guide: renderer ("auto", "cuda", "cpu") and whether occlusion faces stay."""

    renderer: str = C.RENDERER
    use_dwmesh: bool = C.USE_DWMESH


@dataclass(frozen=True)
class GenerateSettings(_FromParams):
    """guide -> result: the generator and its sampling settings (the reference's generate.py defaults).
    ``prompt``/``negative_prompt`` None = the reference's."""

    generator: str = C.GENERATOR
    steps: int = C.STEPS
    cfg: float = C.CFG
    shift: float = C.SHIFT
    seed: int = C.SEED
    prompt: str | None = None
    negative_prompt: str | None = None
    size: str = C.GEN_SIZE  # "auto" (the guide's aspect, generation/sizing.py) or "WxH"
    height: int | None = None  # explicit width / height override ``size``
    width: int | None = None
    num_frames: int = C.NUM_FRAMES  # the window length (4k + 1)
    chain_variant: str = C.CHAIN_VARIANT
    overlap: int | None = None  # None: the variant's default
    frame_sampling: str = C.FRAME_SAMPLING  # "windows": every frame; "reference": one linspace window
    resize: str = C.RESIZE
    vram_profile: str = C.VRAM_PROFILE
    device: str = C.DEVICE

    def resolved(self) -> dict:
        """All fields as a dict, the prompts filled in with the reference's when None."""
        prompt, negative = C.reference_prompts()
        s = dataclasses.asdict(self)
        s["prompt"] = prompt if self.prompt is None else self.prompt
        s["negative_prompt"] = negative if self.negative_prompt is None else self.negative_prompt
        return s

    def shot_settings(self):
        """The :class:`~ex4d_backend.generation.windows.ShotSettings` of these settings."""
        from ..generation.windows import ShotSettings

        s = self.resolved()
        return ShotSettings(
            window=s["num_frames"],
            overlap=s["overlap"],
            variant=s["chain_variant"],
            sampling=s["frame_sampling"],
            size=s["size"],
            width=s["width"],
            height=s["height"],
            resize=s["resize"],
            steps=s["steps"],
            cfg=s["cfg"],
            shift=s["shift"],
            seed=s["seed"],
            prompt=s["prompt"],
            negative_prompt=s["negative_prompt"],
        )


STAGE_SETTINGS = {
    "frames": FrameSettings,
    "depth": DepthSettings,
    "intrinsics": IntrinsicsSettings,
    "mesh": MeshSettings,
    "render": RenderSettings,
    "generate": GenerateSettings,
}


def defaults() -> dict:
    """{stage: {field: default}} of every settings dataclass (prompts resolved); JSON-able."""
    out = {}
    for name, cls in STAGE_SETTINGS.items():
        out[name] = cls().resolved() if cls is GenerateSettings else dataclasses.asdict(cls())
    return out
