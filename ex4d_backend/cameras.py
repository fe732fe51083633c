"""Cameras: the one convention of the backend, the reference presets, camera files and conversions.

Convention (OpenCV): the world frame is the camera frame of source frame 0 (x right, y down,
z forward, units = depth units). A camera is a world-to-camera 4x4 matrix ``E`` (``x_cam = E @ x_world``)
and a 3x3 intrinsic matrix ``K`` in pixels at the processing resolution; pixel (u, v) = (column, row),
origin top-left.

Blender: OpenCV world -> Blender world is ``CV_TO_BLENDER`` (X = x, Y = z, Z = -y), so the source camera
sits at the origin looking along +Y with Z up. A Blender camera looks down its local -Z with +Y up,
so its ``matrix_world = CV_TO_BLENDER @ inv(E) @ diag(1, -1, -1, 1)``.

OpenGL: view matrix = ``diag(1, -1, -1, 1) @ E``; projection from ``K`` (``projection_matrix``).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .constants import BORDER_DEPTH, FAR, FOCAL_PX, NEAR, SENSOR_HEIGHT_MM, SENSOR_WIDTH_MM
from .errors import NOT_FOUND, Ex4dError
from .safe_io import read_bytes

CAMERA_FILE_LIMIT = 64 << 20  # bytes: a camera or bundle file is small; larger ones are refused before reading

CV_TO_BLENDER = np.array(
    [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)  # OpenCV world (x right, y down, z forward) -> Blender world (X right, Y forward, Z up)
FLIP_YZ = np.diag([1.0, -1.0, -1.0, 1.0])  # OpenCV camera axes <-> OpenGL/Blender camera axes

REFERENCE_FOCAL_PX = FOCAL_PX  # the reference's fx = fy (500) at the processing resolution
PRESET_NAMES = ("30", "60", "90", "180", "zoom_in", "zoom_out")
ZOOM_DISTANCE = 0.5  # zoom presets dolly by this fraction of r (the target's distance) along the axis
PRESET_RADIUS_OFFSET = 0.15  # r = min depth of frame 0 (border ring set) + 0.15, as the reference


@dataclass
class CameraPath:
    """A per-frame camera: OpenCV world-to-camera matrices and pixel intrinsics."""

    extrinsics: np.ndarray  # (N, 4, 4) float64, OpenCV world-to-camera
    intrinsics: np.ndarray  # (N, 3, 3) float64, pixels
    width: int
    height: int
    name: str = "custom"

    def __post_init__(self) -> None:
        self.extrinsics = np.asarray(self.extrinsics, dtype=np.float64)
        k = np.asarray(self.intrinsics, dtype=np.float64)
        if k.shape == (3, 3):
            k = np.broadcast_to(k, (len(self.extrinsics), 3, 3)).copy()
        self.intrinsics = k
        check_extrinsics(self.extrinsics, f"camera {self.name}")  # the same checks for the CLI and the service
        check_intrinsics(self.intrinsics, f"camera {self.name}")

    def __len__(self) -> int:
        return len(self.extrinsics)


# ----------------------------------------------------------------------------------------------
# Intrinsics
# ----------------------------------------------------------------------------------------------
def reference_intrinsics(width: int, height: int, focal_px: float = REFERENCE_FOCAL_PX) -> np.ndarray:
    """The reference's K: fx = fy = 500 px, principal point at the image centre (W/2, H/2)."""
    return np.array([[focal_px, 0.0, width / 2.0], [0.0, focal_px, height / 2.0], [0.0, 0.0, 1.0]])


def intrinsics_from_focal(
    width: int,
    height: int,
    focal_mm: float | None = None,
    sensor_width_mm: float = SENSOR_WIDTH_MM,
    focal_px: float | None = None,
) -> np.ndarray:
    """K from a focal length in pixels, or in mm with the sensor width in mm (the sensor width spans
    the image width). Neither given: the reference's 500 px."""
    if focal_px is None and focal_mm is not None:
        if sensor_width_mm <= 0 or focal_mm <= 0:
            raise Ex4dError(
                "focal length and sensor width must be positive", where=f"{focal_mm} mm / {sensor_width_mm} mm"
            )
        focal_px = focal_mm / sensor_width_mm * width
    if focal_px is not None and not (math.isfinite(focal_px) and focal_px > 0):
        raise Ex4dError(f"focal length must be a positive number of pixels, got {focal_px}", where="--fx/--fy")
    return reference_intrinsics(width, height, focal_px or REFERENCE_FOCAL_PX)


def projection_matrix(k: np.ndarray, width: int, height: int, near: float = NEAR, far: float = FAR) -> np.ndarray:
    """Clip-space projection of OpenCV camera coordinates, as the reference renders.

    ``clip = P @ [x, y, z, 1]`` with ``w = z``; ndc_x = 2 u / W - 1 and ndc_y = 2 v / H - 1 where
    (u, v) = (fx x / z + cx, fy y / z + cy): image row 0 comes out at ndc_y = -1, i.e. as the first row
    of nvdiffrast's output (the reference's "y flipped so rows come out top-down"). ndc_z in [-1, 1]
    between ``near`` and ``far`` (OpenGL depth).
    """
    fx, fy, cx, cy = k[..., 0, 0], k[..., 1, 1], k[..., 0, 2], k[..., 1, 2]
    p = np.zeros(np.shape(k)[:-2] + (4, 4))
    p[..., 0, 0] = 2.0 * fx / width
    p[..., 0, 2] = 2.0 * cx / width - 1.0
    p[..., 1, 1] = 2.0 * fy / height
    p[..., 1, 2] = 2.0 * cy / height - 1.0
    p[..., 2, 2] = (far + near) / (far - near)
    p[..., 2, 3] = -2.0 * far * near / (far - near)
    p[..., 3, 2] = 1.0
    return p


# ----------------------------------------------------------------------------------------------
# Presets (reference formulas; see EX4D_REFERENCE.md "Camera presets")
# ----------------------------------------------------------------------------------------------
def look_at(eye: np.ndarray, target: np.ndarray, up: np.ndarray = np.array([0.0, 1.0, 0.0])) -> np.ndarray:
    """OpenCV world-to-camera matrix of a camera at ``eye`` looking at ``target``.

    Reference basis: f = normalise(target - eye), right' = normalise(f x up), up' = normalise(right' x f);
    the reference's rows (right', up', f) have x pointing left, so the OpenCV rotation is (-right', up', f).
    """
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


def preset_radius(depth0: np.ndarray, border_depth: float = BORDER_DEPTH) -> float:
    """r = minimum depth of frame 0 after the border ring is set to ``border_depth``, + 0.15."""
    d = np.array(depth0, dtype=np.float64, copy=True)
    d[0, :] = d[-1, :] = d[:, 0] = d[:, -1] = border_depth
    return float(d.min()) + PRESET_RADIUS_OFFSET


def preset_eyes(preset: str, n_frames: int, r: float) -> np.ndarray:
    """(N, 3) camera centres of a preset, OpenCV world (reference formulas)."""
    name = str(preset).strip().lower()
    if name == "180":
        a = np.linspace(0.0, 2.0 * np.pi, n_frames)
        return np.stack([r * np.sin(a), 0.2 * r * (np.cos(a) - 1.0), np.zeros_like(a)], axis=1)
    if name in ("zoom_in", "zoom_out"):
        sign = 1.0 if name == "zoom_in" else -1.0
        s = np.linspace(0.0, 1.0, n_frames)
        return np.stack([np.zeros_like(s), np.zeros_like(s), sign * ZOOM_DISTANCE * r * s], axis=1)
    try:
        deg = int(name)
    except ValueError:
        raise Ex4dError(
            f"unknown camera preset '{preset}'",
            where="--cam",
            hint="use an angle in degrees (30, 60, 90, 180, any integer), zoom_in, zoom_out, or a .json/.npz camera file",
        ) from None
    if abs(deg) > 3600:
        raise Ex4dError(
            f"the preset angle {name[:20]}... degrees is out of range", where="--cam", hint="use -3600..3600"
        )
    a = np.linspace(0.0, np.deg2rad(deg), n_frames)
    c = np.abs(np.cos(a))
    return np.stack([r * np.sin(a), 0.2 * r * (c - 1.0), r - r * c], axis=1)


def preset_path(
    preset: str,
    n_frames: int,
    k: np.ndarray,
    depth0: np.ndarray,
    width: int,
    height: int,
    border_depth: float = BORDER_DEPTH,
) -> CameraPath:
    """The reference camera path for ``preset`` ("30", "60", "90", "180", any integer angle, "zoom_in",
    "zoom_out"), looking at target (0, 0, r) with world up (0, 1, 0)."""
    if n_frames < 1:
        raise Ex4dError("a camera path needs at least one frame", where="--frames")
    r = preset_radius(depth0, border_depth)
    eyes = preset_eyes(preset, n_frames, r)
    target = np.array([0.0, 0.0, r])
    ext = np.stack([look_at(e, target) for e in eyes])
    return CameraPath(ext, np.asarray(k, dtype=np.float64), width, height, name=str(preset).strip().lower())


# ----------------------------------------------------------------------------------------------
# Camera files
# ----------------------------------------------------------------------------------------------
def _check_path_arrays(ext: np.ndarray, ks: np.ndarray, n_frames: int | None, where: str) -> None:
    if ext.ndim != 3 or ext.shape[1:] != (4, 4):
        raise Ex4dError(
            f"extrinsics must have shape (N, 4, 4), got {ext.shape}",
            where=where,
            hint="store OpenCV world-to-camera matrices, one 4x4 per frame",
        )
    if ks.shape != (3, 3) and (ks.ndim != 3 or ks.shape[1:] != (3, 3) or len(ks) != len(ext)):
        raise Ex4dError(
            f"intrinsics must have shape (3, 3) or (N, 3, 3) with N = {len(ext)}, got {ks.shape}",
            where=where,
        )
    if not (np.isfinite(ext).all() and np.isfinite(ks).all()):
        raise Ex4dError("the camera file contains NaN or infinite values", where=where)
    if not np.allclose(ext[:, 3], [0, 0, 0, 1], atol=1e-6):
        raise Ex4dError("extrinsics' last row must be (0, 0, 0, 1)", where=where)
    rot = ext[:, :3, :3]
    if not np.allclose(rot @ np.swapaxes(rot, 1, 2), np.eye(3), atol=1e-4):
        raise Ex4dError("extrinsics' rotation parts are not orthonormal", where=where, hint="store rigid transforms")
    if n_frames is not None and len(ext) < n_frames:
        raise Ex4dError(
            f"the camera file has {len(ext)} frames but {n_frames} are needed",
            where=where,
            hint="give one matrix per output frame, or lower --frames",
        )


@contextlib.contextmanager
def small_file(path: Path, what: str) -> Iterator[Callable[[], bytes]]:
    """Reading a camera or bundle file (``what``: "camera file", "bundle file"): yields ``read()``, its
    bytes (at most ``CAMERA_FILE_LIMIT``); a missing file, a missing entry (``KeyError`` in the block) and
    an unreadable or malformed file (``ValueError``, ``TypeError``, ``OSError``, ...) each give one clear error."""
    where = str(path)
    if not path.is_file():
        raise Ex4dError(f"{what} not found", where=where, code=NOT_FOUND)
    try:
        yield lambda: read_bytes(path, what, limit=CAMERA_FILE_LIMIT)
    except KeyError as exc:
        raise Ex4dError(f"the {what} has no {exc.args[0]!r} entry", where=where) from None
    except (ValueError, TypeError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise Ex4dError(f"cannot read the {what}: {exc}", where=where) from None


def load_camera_file(
    path: str | os.PathLike,
    n_frames: int | None,
    width: int,
    height: int,
    default_k: np.ndarray | None = None,
) -> CameraPath:
    """A custom camera path from .npz (keys ``extrinsics`` (N,4,4), optional ``intrinsics`` (3,3) or
    (N,3,3)) or .json (``{"extrinsics": [...], "intrinsics": [...]}``), OpenCV world-to-camera.
    The first ``n_frames`` frames are used. Missing intrinsics: ``default_k``."""
    p = Path(path)
    where = str(p)
    with small_file(p, "camera file") as read:
        if p.suffix.lower() == ".npz":
            with np.load(io.BytesIO(read())) as data:
                ext = np.asarray(data["extrinsics"], dtype=np.float64)
                ks = np.asarray(data["intrinsics"], dtype=np.float64) if "intrinsics" in data else None
        elif p.suffix.lower() == ".json":
            data = json.loads(read().decode("utf-8"))
            if not isinstance(data, dict):
                raise Ex4dError(
                    "a JSON camera file must hold an object with 'extrinsics' (and optional 'intrinsics')",
                    where=where,
                    hint='write {"extrinsics": [[4x4], ...], "intrinsics": [3x3]}',
                )
            ext = np.asarray(data["extrinsics"], dtype=np.float64)
            ks = np.asarray(data["intrinsics"], dtype=np.float64) if data.get("intrinsics") is not None else None
        else:
            raise Ex4dError("camera files must be .npz or .json", where=where)
    if ks is None:
        ks = default_k if default_k is not None else reference_intrinsics(width, height)
    _check_path_arrays(ext, ks, n_frames, where)
    if n_frames is not None:
        ext = ext[:n_frames]
        if ks.ndim == 3:
            ks = ks[:n_frames]
    return CameraPath(ext, ks, width, height, name=p.stem)


def save_camera_npz(path: str | os.PathLike, cam: CameraPath) -> Path:
    """``camera_<cam>.npz``: ``extrinsics`` (N,4,4) OpenCV world-to-camera (NOT the reference's
    OpenGL-flipped poses), ``intrinsics`` (3,3) when constant else (N,3,3), plus ``width``, ``height``
    and a ``convention`` note."""
    ks = cam.intrinsics
    k_out = ks[0] if np.allclose(ks, ks[:1]) else ks
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                extrinsics=cam.extrinsics,
                intrinsics=k_out,
                width=cam.width,
                height=cam.height,
                convention=np.array(
                    "OpenCV world-to-camera (x right, y down, z forward); world = source frame 0 camera; "
                    "intrinsics in pixels"
                ),
            )
    return Path(path)


# ----------------------------------------------------------------------------------------------
# Blender and OpenGL conversions
# ----------------------------------------------------------------------------------------------
def opencv_to_blender_matrix_world(extrinsics: np.ndarray) -> np.ndarray:
    """Blender camera ``matrix_world`` (.., 4, 4) from OpenCV world-to-camera matrices (.., 4, 4)."""
    return CV_TO_BLENDER @ np.linalg.inv(np.asarray(extrinsics, dtype=np.float64)) @ FLIP_YZ


def blender_matrix_world_to_opencv(matrix_world: np.ndarray) -> np.ndarray:
    """OpenCV world-to-camera (.., 4, 4) from Blender camera ``matrix_world`` (.., 4, 4).

    Scale in ``matrix_world`` (a scaled camera or parent) is removed: cameras are rigid."""
    m = np.array(matrix_world, dtype=np.float64, copy=True)
    rot = m[..., :3, :3]
    m[..., :3, :3] = rot / np.linalg.norm(rot, axis=-2, keepdims=True)
    return np.linalg.inv(np.linalg.inv(CV_TO_BLENDER) @ m @ FLIP_YZ)


def opencv_to_opengl_view(extrinsics: np.ndarray) -> np.ndarray:
    """OpenGL view matrix (camera looks down -z, y up) from OpenCV world-to-camera."""
    return FLIP_YZ @ np.asarray(extrinsics, dtype=np.float64)


def opengl_view_to_opencv(view: np.ndarray) -> np.ndarray:
    return FLIP_YZ @ np.asarray(view, dtype=np.float64)


def _sensor_span(width: int, height: int, sensor_fit: str) -> tuple[str, float]:
    """Which image side the sensor size spans in Blender ("H"orizontal or "V"ertical), and its pixels."""
    fit = sensor_fit.upper()
    if fit == "AUTO":
        fit = "HORIZONTAL" if width >= height else "VERTICAL"
    if fit == "HORIZONTAL":
        return "H", float(width)
    if fit == "VERTICAL":
        return "V", float(height)
    raise Ex4dError(f"unknown sensor fit '{sensor_fit}'", hint="use AUTO, HORIZONTAL or VERTICAL")


def intrinsics_to_blender(
    k: np.ndarray, width: int, height: int, sensor_width: float = SENSOR_WIDTH_MM, sensor_fit: str = "AUTO"
) -> dict:
    """Blender camera data (lens in mm, sensor in mm, shift in Blender's units) for pixel intrinsics.

    Blender assumes square pixels: fx must equal fy (within 0.1 %). With AUTO fit the sensor size spans
    the longer image side; Blender uses ``sensor_width`` for AUTO and HORIZONTAL and ``sensor_height``
    for VERTICAL, so the same value is returned as ``sensor_height`` too. Shift is in units of the
    spanned side: positive shift_x moves the view right (principal point left of centre)."""
    k = np.asarray(k, dtype=np.float64)
    fx, fy, cx, cy = k[0, 0], k[1, 1], k[0, 2], k[1, 2]
    if abs(fx - fy) > 1e-3 * max(fx, fy):
        raise Ex4dError(f"Blender cameras need square pixels (fx = fy), got fx={fx}, fy={fy}")
    _, span = _sensor_span(width, height, sensor_fit)
    lens = fx * sensor_width / span
    return {
        "lens": float(lens),
        "sensor_width": float(sensor_width),
        "sensor_height": float(sensor_width),
        "sensor_fit": sensor_fit.upper(),
        "shift_x": float((width / 2.0 - cx) / span),
        "shift_y": float((cy - height / 2.0) / span),
    }


def blender_to_intrinsics(
    lens: float,
    width: int,
    height: int,
    sensor_width: float = SENSOR_WIDTH_MM,
    sensor_height: float = SENSOR_HEIGHT_MM,
    sensor_fit: str = "AUTO",
    shift_x: float = 0.0,
    shift_y: float = 0.0,
) -> np.ndarray:
    """Pixel intrinsics of a Blender camera (square pixels, render resolution ``width`` x ``height``)."""
    side, span = _sensor_span(width, height, sensor_fit)
    sensor = sensor_height if sensor_fit.upper() == "VERTICAL" else sensor_width
    f = lens / sensor * span
    cx = width / 2.0 - shift_x * span
    cy = height / 2.0 + shift_y * span
    return np.array([[f, 0.0, cx], [0.0, f, cy], [0.0, 0.0, 1.0]])


def camera_path_from_blender(
    matrices_world: np.ndarray,
    lenses: np.ndarray | float,
    width: int,
    height: int,
    sensor_width: float = SENSOR_WIDTH_MM,
    sensor_height: float = SENSOR_HEIGHT_MM,
    sensor_fit: str = "AUTO",
    shift_x: float | np.ndarray = 0.0,
    shift_y: float | np.ndarray = 0.0,
    name: str = "blender",
) -> CameraPath:
    """A :class:`CameraPath` from a Blender camera's per-frame evaluated ``matrix_world``, lens (mm) and
    shift (one value or one per matrix, like the lens)."""
    mw = np.asarray(matrices_world, dtype=np.float64)
    if mw.ndim != 3 or mw.shape[1:] != (4, 4):
        raise Ex4dError(f"matrix_world must have shape (N, 4, 4), got {mw.shape}", where="camera")
    if not np.isfinite(mw).all():
        raise Ex4dError("the camera matrices contain NaN or infinite values", where="camera")
    lenses = np.broadcast_to(np.asarray(lenses, dtype=np.float64), (len(mw),))
    if not (np.isfinite(lenses).all() and (lenses > 0).all()):
        raise Ex4dError("the camera's lens must be a positive number of mm on every frame", where="camera")
    shifts = [np.broadcast_to(np.asarray(v, dtype=np.float64), (len(mw),)) for v in (shift_x, shift_y)]
    ks = np.stack(
        [
            blender_to_intrinsics(lens, width, height, sensor_width, sensor_height, sensor_fit, sx, sy)
            for lens, sx, sy in zip(lenses, *shifts, strict=True)
        ]
    )
    return CameraPath(blender_matrix_world_to_opencv(mw), ks, width, height, name=name)


# ----------------------------------------------------------------------------------------------
# Validation (shared by the CLI, camera files and the service)
# ----------------------------------------------------------------------------------------------
MAX_INTRINSIC_PX = 1e7  # a focal length or principal point beyond this many pixels is an error


def check_intrinsics(ks: np.ndarray, where: str) -> None:
    """K (3, 3) or (N, 3, 3) in pixels: finite, fx > 0, fy > 0, last row (0, 0, 1), not absurdly large.
    Raises ``Ex4dError`` (bad_input) naming ``where``."""
    ks = np.asarray(ks, dtype=np.float64)
    ks = ks[None] if ks.ndim == 2 else ks
    if ks.ndim != 3 or ks.shape[1:] != (3, 3):
        raise Ex4dError(f"intrinsics must be 3x3 matrices, got shape {ks.shape}", where=where)
    if not np.isfinite(ks).all():
        raise Ex4dError("the intrinsics contain NaN or infinite values", where=where, hint="check --fx/--fy/--cx/--cy")
    if np.any(ks[:, 0, 0] <= 0) or np.any(ks[:, 1, 1] <= 0):
        raise Ex4dError(
            "the focal lengths (fx, fy) must be positive", where=where, hint="give positive --fx/--fy (pixels)"
        )
    if not np.allclose(ks[:, 2], [0, 0, 1]) or np.any(ks[:, 1, 0] != 0):
        raise Ex4dError("intrinsics must have the form [[fx, s, cx], [0, fy, cy], [0, 0, 1]]", where=where)
    if np.any(np.abs(ks[:, :2, :]) > MAX_INTRINSIC_PX):
        raise Ex4dError("the focal length or principal point is absurdly large", where=where)


def check_extrinsics(ext: np.ndarray, where: str, *, scale_ok: bool = False) -> None:
    """World-to-camera (N, 4, 4): finite, last row (0, 0, 0, 1), a rotation part (``scale_ok``: up to a
    per-axis scale) that is orthonormal with determinant +1 (no mirror). Raises ``Ex4dError``."""
    ext = np.asarray(ext, dtype=np.float64)
    if ext.ndim != 3 or ext.shape[1:] != (4, 4) or len(ext) == 0:
        raise Ex4dError(f"camera matrices must have shape (N, 4, 4), got {ext.shape}", where=where)
    if not np.isfinite(ext).all():
        raise Ex4dError("the camera contains NaN or infinite values", where=where)
    if not np.allclose(ext[:, 3], [0, 0, 0, 1], atol=1e-6):
        raise Ex4dError("a camera matrix's last row is not (0, 0, 0, 1)", where=where, hint="send affine matrices")
    rot = ext[:, :3, :3]
    if scale_ok:
        rot = rot / np.maximum(np.linalg.norm(rot, axis=-2, keepdims=True), 1e-300)
    if not np.allclose(rot @ np.swapaxes(rot, 1, 2), np.eye(3), atol=1e-3) or np.any(np.linalg.det(rot) < 0):
        raise Ex4dError(
            "a camera matrix is not a rotation (shear, zero scale or a mirror?)",
            where=where,
            hint="remove shear and negative scale from the camera (and its parents)",
        )
