"""A stereo pair (left and right eye) from a centre camera path, with Blender's stereoscopy conventions.

Blender (``BKE_camera_multiview_model_matrix`` / ``camera_stereo3d_shift_x``, camera data ``stereo``):
``interocular_distance`` b, ``convergence_distance`` C, ``convergence_mode`` OFFAXIS | PARALLEL | TOE,
``pivot`` CENTER | LEFT | RIGHT. In the camera's own axes (Blender: x right, y up, looking down -z):
- CENTER pivot: the eyes sit at x = -b/2 (left) and +b/2 (right); LEFT pivot: the left eye is the camera
  and the right one sits at +b; RIGHT pivot: the right eye is the camera, the left one at -b.
- PARALLEL: the eyes are parallel, nothing else: disparity of a point at depth Z is fx b / Z (pixels,
  u_left - u_right), never zero.
- OFFAXIS: parallel eyes whose lens shift moves each principal point so that the plane z = C has zero
  disparity: shift_x += (b / sensor_width) (lens / C) fac (fac = +1/2 left, -1/2 right for CENTER; the
  moving eye gets +-1 for LEFT/RIGHT pivots), i.e. cx -= fac b fx / C in pixels (equal to Blender's for its
  AUTO and HORIZONTAL sensor fits). Disparity fx b (1 / Z - 1 / C).
- TOE: the eyes turn inward: CENTER: each by atan(b / (2 C)) about its y axis (optical axes cross at
  distance C on the centre line); LEFT/RIGHT pivots: Blender's rotate-translate-rotate (the moving eye
  rotated by atan(b / (2 C)), moved by b along the rotated x axis, rotated again).
Matrices are composed literally as Blender does, in its camera axes, then converted to OpenCV
world-to-camera matrices (``E' = inv(F L F) @ E``, F = diag(1, -1, -1, 1)).
"""

from __future__ import annotations

import math

import numpy as np

from .cameras import FLIP_YZ, CameraPath
from .errors import Ex4dError

MODES = ("OFFAXIS", "PARALLEL", "TOE")
PIVOTS = ("CENTER", "LEFT", "RIGHT")
DEFAULT_INTEROCULAR = 0.065  # Blender's defaults (scene units)
DEFAULT_CONVERGENCE = 1.95


def _translate_x(x: float) -> np.ndarray:
    m = np.eye(4)
    m[0, 3] = x
    return m


def _toe_rotation(angle: float) -> np.ndarray:
    """Blender's ``rotmat``: m[0][0] = cos, m[2][0] = -sin, m[0][2] = sin, m[2][2] = cos (column-major)."""
    c, s = math.cos(angle), math.sin(angle)
    m = np.eye(4)
    m[0, 0], m[0, 2], m[2, 0], m[2, 2] = c, -s, s, c
    return m


def eye_local_matrix(is_left: bool, interocular: float, convergence: float, mode: str, pivot: str) -> np.ndarray:
    """The eye's 4x4 transform in Blender camera axes, right-multiplied onto the camera's (normalised)
    matrix_world, exactly as ``camera_stereo3d_model_matrix`` composes it."""
    mode, pivot = mode.upper(), pivot.upper()
    if mode not in MODES or pivot not in PIVOTS:
        raise Ex4dError(f"unknown stereo mode/pivot {mode}/{pivot}", hint=f"modes {MODES}, pivots {PIVOTS}")
    if (pivot == "LEFT" and is_left) or (pivot == "RIGHT" and not is_left):
        return np.eye(4)
    fac = 0.5 if pivot == "CENTER" else 1.0
    fac_signed = fac if is_left else -fac
    if mode != "TOE":
        return _translate_x(-interocular * fac_signed)
    if pivot == "CENTER":
        fac, fac_signed = -fac, -fac_signed
    angle = math.atan((interocular * 0.5) / convergence) / fac
    rot = _toe_rotation(angle * fac_signed)
    if pivot == "CENTER":
        toe = rot.copy()
        toe[0, 3] = interocular * fac_signed
        return toe
    return rot @ _translate_x(-interocular * fac_signed) @ rot


def shift_fraction(is_left: bool, interocular: float, convergence: float, mode: str, pivot: str) -> float:
    """Blender's off-axis ``shift_x`` increment divided by (lens / sensor_width): b / C * fac_signed."""
    mode, pivot = mode.upper(), pivot.upper()
    if mode != "OFFAXIS" or (pivot == "LEFT" and is_left) or (pivot == "RIGHT" and not is_left):
        return 0.0
    fac = 0.5 if pivot == "CENTER" else 1.0
    return interocular / convergence * (fac if is_left else -fac)


def eye_cameras(
    center: CameraPath,
    interocular: float = DEFAULT_INTEROCULAR,
    convergence: float = DEFAULT_CONVERGENCE,
    mode: str = "OFFAXIS",
    pivot: str = "CENTER",
) -> tuple[CameraPath, CameraPath]:
    """(left, right) camera paths of a centre camera (OpenCV world-to-camera, pixel intrinsics)."""
    if not (math.isfinite(interocular) and interocular >= 0 and math.isfinite(convergence) and convergence > 0):
        raise Ex4dError(
            f"stereo needs an interocular distance >= 0 and a convergence distance > 0, got {interocular}, "
            f"{convergence}",
            where="stereo",
        )
    out = []
    for is_left in (True, False):
        local = eye_local_matrix(is_left, interocular, convergence, mode, pivot)
        local_cv = FLIP_YZ @ local @ FLIP_YZ  # the same transform in OpenCV camera axes
        ext = np.linalg.inv(local_cv) @ center.extrinsics
        ks = center.intrinsics.copy()
        ks[:, 0, 2] -= shift_fraction(is_left, interocular, convergence, mode, pivot) * ks[:, 0, 0]
        name = f"{center.name}_{'left' if is_left else 'right'}"
        out.append(CameraPath(ext, ks, center.width, center.height, name=name))
    return out[0], out[1]


def expected_disparity(fx: float, interocular: float, convergence: float, depth: float, mode: str) -> float:
    """u_left - u_right (pixels) of a point straight ahead at ``depth`` for PARALLEL and OFFAXIS pairs."""
    if mode.upper() == "PARALLEL":
        return fx * interocular / depth
    if mode.upper() == "OFFAXIS":
        return fx * interocular * (1.0 / depth - 1.0 / convergence)
    raise Ex4dError("the disparity of a toe-in pair depends on the position in the image", where="stereo")


def side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Left | right frames: (T, H, W, C) twice -> (T, H, 2 W, C), the left eye in the left half (the
    "side-by-side" layout of Blender's stereo 3D, not cross-eyed)."""
    left, right = np.asarray(left), np.asarray(right)
    if left.shape != right.shape or left.ndim != 4:
        raise Ex4dError(f"the eyes' frames disagree: left {left.shape}, right {right.shape}", where="stereo")
    return np.concatenate([left, right], axis=2)
