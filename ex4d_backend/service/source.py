"""The service's moving-source parameters (issue 15): ``source_camera`` and ``depth_scale``.

- ``source_camera``: the camera that filmed the footage, per frame, in the novel camera's world; the same
  forms as ``camera`` (``blender`` raw data, ``opencv`` matrices, ``file``), parsed by the same code. Its
  intrinsics (Blender's lens, or the OpenCV/file intrinsics when given) replace the job's ``focal_px``/``lens``
  for the DW-mesh. Absent: the reference's static source at the origin.
- ``depth_scale``: depth units -> world units; a number (manual), or the camera solve's bundles to fit it to:
  ``{"bundles": [{"co": [x, y, z], "frames": [...], "uv": [[u, v], ...]?}, ...], "convention": "blender" |
  "opencv", "per_frame": false}`` or ``{"file": "bundles.json|.npz", "per_frame": false}``.
- ``camera`` gains ``{"lock_off": FRAME}`` and ``{"stabilize": SECONDS}`` (relative to the source path), and
  presets follow the source path (``camera_paths``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import camera_paths
from ..cameras import CameraPath
from ..errors import Ex4dError


@dataclass
class SourceSetup:
    path: CameraPath | None  # None: the static source at the origin
    scales: np.ndarray  # (T,) depth units -> world units
    k: np.ndarray  # the DW-mesh's intrinsics: (3, 3) or (T, 3, 3)
    fit: dict = field(default_factory=dict)  # the depth-scale fit's summary (empty for a manual scale)

    def key_parts(self) -> list:
        """What the guide's cache key must add for a moving source (nothing for the reference's setup)."""
        if self.path is None and np.all(self.scales == 1.0):
            return []
        ext = None if self.path is None else np.round(self.path.extrinsics, 12).tolist()
        return ["source", ext, np.round(self.scales, 12).tolist()]


def camera_spec(cam: dict) -> str | None:
    """The ``camera_paths`` spec of a ``camera`` param that is relative to the source, else None."""
    if "preset" in cam:
        return str(cam["preset"])
    if "lock_off" in cam:
        return f"lock_off:{int(cam['lock_off'])}"
    if "stabilize" in cam:
        return f"stabilize:{float(cam['stabilize'])}"
    return None


def source_setup(ctx, p: dict, clip, depth, k: np.ndarray) -> SourceSetup:
    """The source path, the depth scales and the mesh intrinsics of a job's params."""
    from ..depth_scale import Bundles, ScaleFit, bundles_from_json, fit_depth_scale, load_bundles
    from .jobs import camera_path

    t = clip.frames.shape[0]
    path = None
    if p.get("source_camera"):
        path = camera_path(ctx, {**p, "camera": {**p["source_camera"], "name": "source"}}, clip, depth, k)
        k = camera_paths.default_intrinsics(path, k, *clip.size)
    spec = p.get("depth_scale", 1.0)
    if isinstance(spec, (int, float)):
        return SourceSetup(path, ScaleFit.manual(float(spec)).scales(t), k)
    if path is None:
        raise Ex4dError(
            "a depth-scale fit to bundles needs the source camera (the solve's camera path)",
            where="params.depth_scale",
            hint="send source_camera too, or a number as depth_scale",
        )
    if "file" in spec:
        bundles = load_bundles(ctx.store.check_input(spec["file"], "bundle file"), t)
    else:
        bundles = Bundles(*bundles_from_json(spec, t, "params.depth_scale"))
    fit = fit_depth_scale(bundles, path, np.asarray(depth.depth), per_frame=bool(spec.get("per_frame", False)))
    for w in fit.warnings:
        ctx.progress("camera", 0, 1, f"depth scale: {w}")
    return SourceSetup(path, fit.scales(t), k, fit.summary())


def canonical(store, params: dict) -> dict:
    """``params`` with the source camera's and the bundles' file paths replaced by content hashes (job keys)."""
    out = dict(params)
    src = params.get("source_camera")
    if isinstance(src, dict) and "file" in src:
        out["source_camera"] = {**src, "file": store.input_hash(store.check_input(src["file"], "camera file"))}
    ds = params.get("depth_scale")
    if isinstance(ds, dict) and "file" in ds:
        out["depth_scale"] = {**ds, "file": store.input_hash(store.check_input(ds["file"], "bundle file"))}
    return out
