"""The camera stage: a novel-camera spec -> a checked ``cameras.CameraPath`` at the processing resolution.

A spec is the protocol's ``camera`` object: ``{"preset": "90"}`` (any preset name ``cameras.preset_path``
knows), ``{"lock_off": FRAME}``, ``{"stabilize": SECONDS}`` (these three relative to the source camera
path: ``camera_paths.novel_camera_path``), ``{"blender": {...}}`` (raw Blender values), ``{"opencv": {...}}``
(matrices), ``{"file": PATH}`` (.json/.npz), each with an optional ``"name"``, or a ``CameraPath``.
``ex4d recon --cam`` turns its argument into the same spec, so the CLI and the service share every check below.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from .. import constants as C
from ..cameras import CameraPath, check_extrinsics, check_intrinsics
from ..errors import Ex4dError
from .settings import MeshSettings


def spec_from_arg(cam: str | os.PathLike | CameraPath | dict) -> dict | CameraPath:
    """``--cam`` (a preset name, lock_off[:F], stabilize[:S] or a .json/.npz path) as a camera spec."""
    from .. import camera_paths

    if isinstance(cam, (dict, CameraPath)):
        return cam
    kind, arg = camera_paths.parse_camera_spec(str(cam))  # raises the clear error for an unknown preset
    if kind == "file":
        return {"file": str(arg)}
    if kind == camera_paths.LOCK_OFF:
        return {"lock_off": int(arg or 0)}
    if kind == camera_paths.STABILIZE:
        return {"stabilize": camera_paths.STABILIZE_DEFAULT_S if arg is None else float(arg)}
    return {"preset": str(arg)}


def relative_spec(spec: dict | CameraPath) -> str | None:
    """The ``camera_paths`` spec string of a camera spec relative to the source path (preset, lock_off,
    stabilize), else None (world-space cameras: blender, opencv, file, a CameraPath)."""
    if isinstance(spec, CameraPath):
        return None
    if "preset" in spec:
        return str(spec["preset"]).strip().lower()
    if "lock_off" in spec:
        return f"lock_off:{int(spec['lock_off'])}"
    if "stabilize" in spec:
        return f"stabilize:{float(spec['stabilize'])}"
    return None


def camera_hash(cam: CameraPath) -> str:
    """Content hash (20 hex) of a path's matrices and intrinsics (the camera stage's key)."""
    h = hashlib.sha256()
    for a in (cam.extrinsics, cam.intrinsics):
        a = np.ascontiguousarray(a, dtype=np.float64)
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:20]


def check_path(path: CameraPath, n_frames: int, width: int, height: int, where: str) -> CameraPath:
    """The first ``n_frames`` frames of ``path``, checked: enough frames, the processing size, finite rigid
    extrinsics, positive focal lengths."""
    if len(path) < n_frames:
        raise Ex4dError(
            f"the camera path has {len(path)} frames but {n_frames} are needed",
            where=where,
            hint="send one camera per footage frame, or use fewer frames",
        )
    if (path.width, path.height) != (width, height):
        raise Ex4dError(
            f"the camera is for {path.width}x{path.height} but the footage is processed at {width}x{height}",
            where=where,
        )
    ext, ks = path.extrinsics[:n_frames], path.intrinsics[:n_frames]
    check_extrinsics(ext, where)  # the checks the CLI, camera files and the service share (cameras.py)
    check_intrinsics(ks, where)
    return CameraPath(ext, ks, width, height, name=path.name or "custom")


def resolve_camera(
    spec: dict | CameraPath,
    n_frames: int,
    k: np.ndarray,
    depth0: np.ndarray,
    width: int,
    height: int,
    mesh: MeshSettings = MeshSettings(),
    *,
    where: str = "params.camera",
    check_input=None,
    source: CameraPath | None = None,
    fps: float = 30.0,
    depth_scale: float = 1.0,
) -> CameraPath:
    """The novel camera for ``n_frames`` frames of a ``width`` x ``height`` shot with source intrinsics ``k``
    ((3, 3) or (T, 3, 3)) and frame-0 depth ``depth0`` in depth units (presets' radius, times
    ``depth_scale``; border ring at ``mesh.border_depth``). Presets, lock_off and stabilize follow ``source``
    (the source camera path; None: static at the origin; ``fps`` for stabilize's strength in seconds).
    ``check_input(path, what)`` vets a camera file path (the service's sandbox) and returns it."""
    try:
        path = _resolve(spec, n_frames, k, depth0, width, height, mesh, where, check_input, source, fps, depth_scale)
        return check_path(path, n_frames, width, height, where)
    except (ValueError, TypeError, ArithmeticError, np.linalg.LinAlgError) as exc:
        raise Ex4dError(
            f"unusable camera: {str(exc)[:300]}",
            where=where,
            hint="send finite, rigid camera matrices with positive focal lengths",
        ) from None


def _resolve(
    spec, n_frames, k, depth0, width, height, mesh, where, check_input, source, fps, depth_scale
) -> CameraPath:
    from .. import camera_paths, cameras

    if isinstance(spec, CameraPath):
        return spec
    name = spec.get("name")
    rel = relative_spec(spec)
    if rel is not None:  # presets follow the source path; lock_off / stabilize hold / smooth it
        k0 = k if np.ndim(k) == 2 else k[0]
        path = camera_paths.novel_camera_path(
            rel, n_frames, k0, np.asarray(depth0), width, height, source=source, fps=fps,
            depth_scale=depth_scale, border_depth=mesh.border_depth,
        )  # fmt: skip
        return CameraPath(path.extrinsics, path.intrinsics, width, height, name=name or path.name)
    if "blender" in spec:
        b = spec["blender"]
        if "resolution" in b:
            rw, rh = b["resolution"]
            if abs(rw / rh - width / height) > 0.01 * (width / height):
                raise Ex4dError(
                    f"the camera's resolution {rw}x{rh} has another aspect ratio than the footage ({width}x{height})",
                    where=f"{where}.blender.resolution",
                    hint="set the scene resolution to the footage's aspect ratio",
                )
        mw = np.asarray(b["matrix_world"], dtype=np.float64)
        lens = np.asarray(b["lens"], dtype=np.float64)
        for field in ("lens", "shift_x", "shift_y"):  # one value, or one per matrix (animated)
            v = np.asarray(b.get(field, 0.0), dtype=np.float64)
            if v.ndim == 1 and len(v) not in (1, len(mw)):
                raise Ex4dError(
                    f"{len(v)} {field} values for {len(mw)} camera matrices",
                    where=f"{where}.blender.{field}",
                    hint="send one value, or one per matrix",
                )
        check_extrinsics(mw, f"{where}.blender.matrix_world", scale_ok=True)
        return cameras.camera_path_from_blender(
            mw,
            lens,
            width,
            height,
            sensor_width=b.get("sensor_width", C.SENSOR_WIDTH_MM),
            sensor_height=b.get("sensor_height", C.SENSOR_HEIGHT_MM),
            sensor_fit=b.get("sensor_fit", "AUTO"),
            shift_x=b.get("shift_x", 0.0),
            shift_y=b.get("shift_y", 0.0),
            name=name or "blender",
        )
    if "opencv" in spec:
        o = spec["opencv"]
        ext = np.asarray(o["extrinsics"], dtype=np.float64)
        ks = np.asarray(o["intrinsics"], dtype=np.float64) if "intrinsics" in o else k
        if ks.ndim == 3 and len(ks) != len(ext):
            raise Ex4dError(f"{len(ks)} intrinsics for {len(ext)} extrinsics", where=f"{where}.opencv")
        check_extrinsics(ext, f"{where}.opencv.extrinsics")
        return CameraPath(ext, ks, width, height, name=name or "opencv")
    f = check_input(spec["file"], "camera file") if check_input else Path(spec["file"])
    path = cameras.load_camera_file(f, n_frames, width, height, default_k=k)
    return CameraPath(path.extrinsics, path.intrinsics, width, height, name=name or path.name)
