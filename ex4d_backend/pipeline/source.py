"""The moving source camera (issue 15): the camera that filmed the footage, and the depth's scale to its world.

- ``source_camera``: the camera that filmed frame t, in the novel camera's world; the same forms as the
  novel camera's spec (``{"blender": ...}`` raw Blender data, ``{"opencv": ...}`` matrices, ``{"file": PATH}``,
  or a ``CameraPath``), resolved and checked by the camera stage's code (``pipeline.camera``). Its
  intrinsics (Blender's lens, the OpenCV/file intrinsics when given) replace the shot's K for the DW-mesh
  ((3, 3), or (T, 3, 3) for a zooming camera). None: the reference's static source at the origin.
- ``depth_scale``: depth units -> world units; a number or (T,) per frame (manual), or the camera solve's
  bundles to fit it to (``depth_scale.py``): ``{"bundles": [...], "convention": "blender" | "opencv",
  "per_frame": false}`` or ``{"file": "bundles.json|.npz", "per_frame": false}``.

The novel camera's presets, ``lock_off`` and ``stabilize`` follow the source path (``camera_paths``; the
camera stage), and the guide places frame t's mesh by it (``camera_paths.mesh_to_novel``; the guide).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import camera_paths
from ..cameras import CameraPath
from ..errors import Ex4dError
from .camera import relative_spec, resolve_camera


@dataclass
class SourceSetup:
    path: CameraPath | None  # T frames; None: the static source at the origin
    scales: np.ndarray  # (T,) depth units -> world units
    k: np.ndarray  # the DW-mesh's intrinsics: (3, 3) or (T, 3, 3)
    fit: dict = field(default_factory=dict)  # the depth-scale fit's summary (empty for a manual scale)

    @property
    def k0(self) -> np.ndarray:
        """(3, 3) frame 0's intrinsics (presets, the frame-0 rule)."""
        return self.k if self.k.ndim == 2 else self.k[0]

    def key_parts(self) -> list:
        """What the guide's cache key adds for a moving source: nothing for the reference's static setup,
        so the stored guides of static shots keep their keys."""
        if self.path is None and np.all(self.scales == 1.0):
            return []
        ext = None if self.path is None else np.round(self.path.extrinsics, 12).tolist()
        return ["source", ext, np.round(self.scales, 12).tolist()]


def resolve_source(
    spec: dict | CameraPath | None,
    n_frames: int,
    k: np.ndarray,
    width: int,
    height: int,
    *,
    where: str = "params.source_camera",
    check_input=None,
) -> tuple[CameraPath | None, np.ndarray]:
    """(the source camera path (``n_frames`` frames, checked) or None, the DW-mesh's intrinsics).

    ``spec`` as the novel camera's spec without the source-relative forms; ``check_input(path, what)`` vets
    a camera file path. Needs no depth, so a bad source fails before any depth work."""
    if spec is None:
        return None, np.asarray(k, dtype=np.float64)
    if not isinstance(spec, CameraPath) and relative_spec(spec) is not None:
        raise Ex4dError(
            "the source camera must be camera data (blender, opencv) or a file",
            where=where,
            hint="presets, lock_off and stabilize describe the novel camera",
        )
    path = resolve_camera(spec, n_frames, k, None, width, height, where=where, check_input=check_input)
    path = CameraPath(path.extrinsics, path.intrinsics, width, height, name="source")
    return path, camera_paths.default_intrinsics(path, k, width, height)


def depth_scales(
    spec: float | np.ndarray | dict,
    source: CameraPath | None,
    depth: np.ndarray,
    *,
    where: str = "params.depth_scale",
    check_input=None,
    warn=None,
) -> tuple[np.ndarray, dict]:
    """((T,) depth units -> world units, the fit's summary ({} for a manual scale)) for ``depth`` (T, H, W).

    ``warn(message)`` receives the fit's warnings (a poor fit is reported, not refused)."""
    from ..depth_scale import Bundles, ScaleFit, bundles_from_json, fit_depth_scale, load_bundles

    t = int(np.shape(depth)[0])
    if not isinstance(spec, dict):
        s = np.asarray(spec, dtype=np.float64)
        if s.ndim == 0:
            return ScaleFit.manual(float(s)).scales(t), {}
        if s.shape != (t,) or not (np.isfinite(s).all() and (s > 0).all()):
            raise Ex4dError(f"per-frame depth scales must be {t} positive numbers, got {s.shape}", where=where)
        return s, {}
    if source is None:
        raise Ex4dError(
            "a depth-scale fit to bundles needs the source camera (the solve's camera path)",
            where=where,
            hint="give the source camera too, or a number as the depth scale",
        )
    if "file" in spec:
        f = check_input(spec["file"], "bundle file") if check_input else spec["file"]
        bundles = load_bundles(f, t)
    else:
        bundles = Bundles(*bundles_from_json(spec, t, where))
    fit = fit_depth_scale(bundles, source, np.asarray(depth), per_frame=bool(spec.get("per_frame", False)))
    for w in fit.warnings:
        if warn:
            warn(f"depth scale: {w}")
    return fit.scales(t), fit.summary()


def source_setup(
    spec: dict | CameraPath | None,
    scale: float | np.ndarray | dict,
    depth: np.ndarray,
    k: np.ndarray,
    *,
    where: tuple[str, str] = ("params.source_camera", "params.depth_scale"),
    check_input=None,
    warn=None,
) -> SourceSetup:
    """:func:`resolve_source` and :func:`depth_scales` for one shot (``depth`` (T, H, W) at the processing
    size); ``where``: the two inputs' names in error messages."""
    t, h, w = np.shape(depth)
    path, k_mesh = resolve_source(spec, t, k, w, h, where=where[0], check_input=check_input)
    scales, fit = depth_scales(scale, path, depth, where=where[1], check_input=check_input, warn=warn)
    return SourceSetup(path, scales, k_mesh, fit)
