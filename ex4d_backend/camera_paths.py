"""Camera paths relative to a moving source camera (handheld footage, a camera solve).

Conventions as ``cameras.py``: OpenCV world-to-camera 4x4 matrices ``E`` (``x_cam = E @ x_world``), pixel
intrinsics ``K``. The *source* camera path ``E_src[t]`` is the camera that filmed frame t, in some world (a
camera solve's, a layout's). Frame t's DW-mesh is built in source camera t's own frame (as the reference
does), so placing it in the world and seeing it from the novel camera ``E_novel[t]`` is one matrix:

    x_novel = E_novel[t] @ inv(E_src[t]) @ diag(s_t, s_t, s_t, 1) @ x_mesh        (``mesh_to_novel``)

with ``s_t`` the depth scale (depth units -> world units, ``depth_scale.py``). Without a source camera the
source is static at the world origin (``E_src[t] = I``, world = source frame 0, the reference's world).

Novel camera specifications (``--cam`` / the protocol's ``camera``):
- reference presets ("30", "60", "90", "180", any angle, "zoom_in", "zoom_out") are RELATIVE to the source:
  ``E_novel[t] = E_preset[t] @ E_src[t]`` (the novel camera follows the source path, as the reference's do
  with its static source);
- ``lock_off[:F]``: the novel camera holds the source pose (and intrinsics) of frame F (default 0) for the
  whole shot: a handheld shot made locked-off;
- ``stabilize[:S]``: the source path smoothed with a Gaussian of sigma = S seconds (default 0.5) * fps
  frames, camera centres averaged linearly and rotations by weighted quaternion averaging;
- a camera file (.json/.npz): world-space poses, used as they are.

Frame 0 (``starts_at_source``): the guide's frame 0 is replaced by the source frame (full mask, the
reference's rule) only when the novel camera's frame-0 pose (and intrinsics, when given) equals the
source's within a tolerance; otherwise frame 0 is rendered like every other frame.
"""

from __future__ import annotations

import math
import os

import numpy as np

from .cameras import CameraPath, load_camera_file, preset_eyes, preset_path, reference_intrinsics
from .constants import BORDER_DEPTH
from .errors import Ex4dError

LOCK_OFF = "lock_off"
STABILIZE = "stabilize"
SOURCE_RELATIVE = (LOCK_OFF, STABILIZE)  # the specs that need the source path itself
STABILIZE_DEFAULT_S = 0.5  # seconds: the default smoothing strength of ``stabilize``
GAUSS_TRUNCATE = 3.0  # the Gaussian kernel is cut at this many sigmas
START_TOL = 1e-3  # world units: camera centres this close count as equal (frame-0 rule)
START_TOL_DEG = 0.05  # degrees: rotations this close count as equal (about 0.4 px at fx = 500)
START_TOL_K = 1e-3  # relative: focal lengths / principal points this close count as equal


# ----------------------------------------------------------------------------------------------
# Rigid transforms and quaternions (pure numpy; shapes (..., 4, 4), (..., 3, 3), (..., 4) w-first)
# ----------------------------------------------------------------------------------------------
def invert_rigid(e: np.ndarray) -> np.ndarray:
    """Inverse of rigid 4x4 transforms (.., 4, 4): [R^T, -R^T t]."""
    e = np.asarray(e, dtype=np.float64)
    out = np.zeros_like(e)
    rt = np.swapaxes(e[..., :3, :3], -1, -2)
    out[..., :3, :3] = rt
    out[..., :3, 3] = -(rt @ e[..., :3, 3:4])[..., 0]
    out[..., 3, 3] = 1.0
    return out


def relative_extrinsics(e_novel: np.ndarray, e_src: np.ndarray) -> np.ndarray:
    """(T, 4, 4) ``E_novel[t] @ inv(E_src[t])``: source camera t's frame -> novel camera t's frame."""
    return np.asarray(e_novel, dtype=np.float64) @ invert_rigid(e_src)


def mesh_to_novel(
    e_novel: np.ndarray, e_src: np.ndarray | None = None, depth_scale: float | np.ndarray = 1.0
) -> np.ndarray:
    """(T, 4, 4) matrices taking frame t's camera-space DW-mesh (depth units) to novel camera t's frame:
    ``E_novel[t] @ inv(E_src[t]) @ diag(s_t, s_t, s_t, 1)``. ``e_src`` None: a static source at the origin.
    ``depth_scale``: a number or (T,) per-frame scales (depth units -> world units)."""
    e_novel = np.asarray(e_novel, dtype=np.float64)
    rel = e_novel.copy() if e_src is None else relative_extrinsics(e_novel, e_src)
    s = np.broadcast_to(np.asarray(depth_scale, dtype=np.float64), (len(rel),))
    if not (np.isfinite(s).all() and (s > 0).all()):
        raise Ex4dError("the depth scale must be a positive finite number", where="depth scale")
    rel[:, :3, :3] *= s[:, None, None]
    return rel


def rotation_to_quaternion(r: np.ndarray) -> np.ndarray:
    """(.., 4) unit quaternions (w, x, y, z), w >= 0, of rotation matrices (.., 3, 3) (Shepperd's method)."""
    r = np.asarray(r, dtype=np.float64)
    flat = r.reshape(-1, 3, 3)
    q = np.empty((len(flat), 4))
    for i, m in enumerate(flat):
        tr = np.trace(m)
        cand = np.array([tr, m[0, 0], m[1, 1], m[2, 2]])
        j = int(np.argmax(cand))
        if j == 0:
            s = 2.0 * math.sqrt(max(1.0 + tr, 1e-300))
            q[i] = (0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s)
        else:
            a, b, c = (j - 1, j % 3, (j + 1) % 3)  # the dominant axis and the two after it
            s = 2.0 * math.sqrt(max(1.0 + m[a, a] - m[b, b] - m[c, c], 1e-300))
            v = np.empty(4)
            v[0] = (m[c, b] - m[b, c]) / s
            v[1 + a] = 0.25 * s
            v[1 + b] = (m[b, a] + m[a, b]) / s
            v[1 + c] = (m[c, a] + m[a, c]) / s
            q[i] = v
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    q *= np.where(q[:, :1] < 0, -1.0, 1.0)
    return q.reshape(r.shape[:-2] + (4,))


def quaternion_to_rotation(q: np.ndarray) -> np.ndarray:
    """(.., 3, 3) rotation matrices of (.., 4) quaternions (w, x, y, z) (normalised first)."""
    q = np.asarray(q, dtype=np.float64)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = np.moveaxis(q, -1, 0)
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )


def rotation_angle_deg(r_a: np.ndarray, r_b: np.ndarray) -> np.ndarray:
    """Angle (degrees) of the rotation between (.., 3, 3) rotations ``r_a`` and ``r_b``."""
    rel = np.asarray(r_a) @ np.swapaxes(np.asarray(r_b), -1, -2)
    cos = np.clip((np.trace(rel, axis1=-2, axis2=-1) - 1.0) / 2.0, -1.0, 1.0)
    return np.degrees(np.arccos(cos))


def gaussian_weights(n: int, sigma: float, truncate: float = GAUSS_TRUNCATE) -> np.ndarray:
    """(n, n) row-normalised Gaussian smoothing weights over frame indices (cut at ``truncate`` sigmas; rows
    near the ends renormalised over the frames that exist). sigma <= 0: the identity."""
    if sigma <= 0:
        return np.eye(n)
    i = np.arange(n)
    d = (i[:, None] - i[None, :]) / sigma
    w = np.exp(-0.5 * d * d) * (np.abs(d) <= truncate)
    return w / w.sum(1, keepdims=True)


def smooth_poses(extrinsics: np.ndarray, sigma_frames: float) -> np.ndarray:
    """(T, 4, 4) world-to-camera poses with their camera centres and orientations Gaussian-smoothed.

    Centres C_t = -R_t^T t_t are averaged linearly; camera orientations by the weighted quaternion average
    (quaternions brought to one hemisphere around frame t's, summed with the weights, normalised: the
    chordal L2 mean, accurate for the small spreads of a shaky path)."""
    e = np.asarray(extrinsics, dtype=np.float64)
    w = gaussian_weights(len(e), sigma_frames)
    c2w = invert_rigid(e)
    centres = w @ c2w[:, :3, 3]
    q = rotation_to_quaternion(c2w[:, :3, :3])  # (T, 4)
    sign = np.sign(q @ q.T)  # align every quaternion with frame t's before averaging
    sign[sign == 0] = 1.0
    q_mean = np.einsum("tj,tj,jk->tk", w, sign, q)
    out = np.zeros_like(e)
    out[:, :3, :3] = quaternion_to_rotation(q_mean)
    out[:, :3, 3] = centres
    out[:, 3, 3] = 1.0
    return invert_rigid(out)


# ----------------------------------------------------------------------------------------------
# Source paths and novel paths relative to them
# ----------------------------------------------------------------------------------------------
def static_source(n_frames: int, k: np.ndarray, width: int, height: int) -> CameraPath:
    """The reference's source: static, at the world origin (world = source frame 0)."""
    return CameraPath(np.broadcast_to(np.eye(4), (n_frames, 4, 4)).copy(), np.asarray(k), width, height, "source")


def load_source_camera(
    path: str | os.PathLike, n_frames: int, width: int, height: int, default_k: np.ndarray | None = None
) -> CameraPath:
    """A source camera file (same format as ``--cam`` files: ``extrinsics`` (N,4,4) OpenCV world-to-camera,
    ``intrinsics`` (3,3) or (N,3,3), default ``default_k``), first ``n_frames`` frames."""
    cam = load_camera_file(path, n_frames, width, height, default_k=default_k)
    cam.name = "source"
    return cam


def parse_camera_spec(spec: str) -> tuple[str, str | float | None]:
    """("preset", name) | ("file", path) | ("lock_off", frame or None) | ("stabilize", seconds or None).

    Accepted: "lock_off", "lock_off:12", "stabilize", "stabilize:0.8", a preset name, a .json/.npz path."""
    text = str(spec).strip()
    if text.lower().endswith((".json", ".npz")):
        return "file", text
    name, _, arg = text.lower().partition(":")
    if name in SOURCE_RELATIVE:
        if not arg:
            return name, None
        try:
            value = int(arg) if name == LOCK_OFF else float(arg)
        except ValueError:
            raise Ex4dError(
                f"bad camera '{spec}'",
                where="--cam",
                hint="write lock_off:<frame index> or stabilize:<strength in seconds>",
            ) from None
        if not math.isfinite(value) or value < 0:
            raise Ex4dError(f"bad camera '{spec}': the value must be >= 0", where="--cam")
        return name, value
    preset_eyes(text, 2, 1.0)  # raises the clear error for an unknown preset
    return "preset", text.lower()


def lock_off_path(source: CameraPath, frame: int = 0) -> CameraPath:
    """The novel camera holding the source's pose and intrinsics of ``frame`` for the whole shot."""
    if not 0 <= frame < len(source):
        raise Ex4dError(
            f"lock_off frame {frame} is outside the shot (0..{len(source) - 1})",
            where="--cam lock_off",
            hint="give a frame index of the processed frames",
        )
    n = len(source)
    ext = np.broadcast_to(source.extrinsics[frame], (n, 4, 4)).copy()
    ks = np.broadcast_to(source.intrinsics[frame], (n, 3, 3)).copy()
    return CameraPath(ext, ks, source.width, source.height, name=f"lock_off_{frame}")


def stabilize_path(source: CameraPath, strength_s: float, fps: float) -> CameraPath:
    """The source path smoothed: Gaussian sigma = ``strength_s`` seconds * ``fps`` frames (0: unchanged)."""
    if not (math.isfinite(strength_s) and strength_s >= 0 and math.isfinite(fps) and fps > 0):
        raise Ex4dError(f"stabilize needs a strength >= 0 s and fps > 0, got {strength_s} s at {fps} fps")
    ext = smooth_poses(source.extrinsics, strength_s * fps)
    return CameraPath(ext, source.intrinsics.copy(), source.width, source.height, name="stabilize")


def follow_source(relative: CameraPath, source: CameraPath) -> CameraPath:
    """A path given relative to the source camera (a preset) made world-space: E[t] = E_rel[t] @ E_src[t]."""
    n = min(len(relative), len(source))
    ext = relative.extrinsics[:n] @ source.extrinsics[:n]
    return CameraPath(ext, relative.intrinsics[:n], relative.width, relative.height, name=relative.name)


def novel_camera_path(
    spec: str | os.PathLike,
    n_frames: int,
    k: np.ndarray,
    depth0: np.ndarray,
    width: int,
    height: int,
    *,
    source: CameraPath | None = None,
    fps: float = 30.0,
    depth_scale: float = 1.0,
    border_depth: float = BORDER_DEPTH,
) -> CameraPath:
    """The novel camera (world space, >= ``n_frames`` frames) for a ``--cam`` spec and a source path.

    ``source`` None: the static source at the origin. Presets are computed from frame 0's depth in world
    units (``depth0 * depth_scale``) and follow the source path; files are world-space as they are."""
    kind, arg = parse_camera_spec(str(spec))
    src = source if source is not None else static_source(n_frames, k, width, height)
    if kind == "file":
        return load_camera_file(str(arg), n_frames, width, height, default_k=k)
    if kind == LOCK_OFF:
        return lock_off_path(src, int(arg or 0))
    if kind == STABILIZE:
        return stabilize_path(src, STABILIZE_DEFAULT_S if arg is None else float(arg), fps)
    d0 = np.asarray(depth0, dtype=np.float64) * float(depth_scale)
    rel = preset_path(str(arg), n_frames, k, d0, width, height, border_depth=border_depth)
    return rel if source is None else follow_source(rel, src)


def camera_spec_name(spec: str) -> str:
    """The output name (<cam> in color_<cam>.mp4) of a ``--cam`` spec."""
    from pathlib import Path

    kind, arg = parse_camera_spec(spec)
    if kind == "file":
        return Path(str(arg)).stem
    if kind == "preset":
        return str(arg)
    return kind if arg is None else f"{kind}_{arg:g}" if isinstance(arg, float) else f"{kind}_{arg}"


# ----------------------------------------------------------------------------------------------
# Frame 0
# ----------------------------------------------------------------------------------------------
def starts_at_source(
    e_novel0: np.ndarray,
    e_src0: np.ndarray | None = None,
    tol: float = START_TOL,
    tol_deg: float = START_TOL_DEG,
    *,
    k_novel0: np.ndarray | None = None,
    k_src0: np.ndarray | None = None,
    tol_k: float = START_TOL_K,
) -> bool:
    """True when the novel camera's frame-0 pose equals the source's (centres within ``tol`` world units,
    orientations within ``tol_deg`` degrees) and, when both are given, its intrinsics (relative ``tol_k``).
    ``e_src0`` None: the static source at the origin. Decides whether guide frame 0 is the source frame."""
    e_n = np.asarray(e_novel0, dtype=np.float64)
    e_s = np.eye(4) if e_src0 is None else np.asarray(e_src0, dtype=np.float64)
    c_n, c_s = invert_rigid(e_n)[:3, 3], invert_rigid(e_s)[:3, 3]
    if np.linalg.norm(c_n - c_s) > tol or rotation_angle_deg(e_n[:3, :3], e_s[:3, :3]) > tol_deg:
        return False
    if k_novel0 is not None and k_src0 is not None:
        k_n, k_s = np.asarray(k_novel0, dtype=np.float64), np.asarray(k_src0, dtype=np.float64)
        scale = max(abs(k_s[0, 0]), abs(k_s[1, 1]), 1e-12)
        if np.abs(k_n - k_s).max() > tol_k * scale:
            return False
    return True


def guide_starts_at_source(camera: CameraPath, source: CameraPath | None, k_src: np.ndarray | None = None) -> bool:
    """:func:`starts_at_source` for frame 0 of two paths (``source`` None: static at the origin with ``k_src``)."""
    e_src0 = None if source is None else source.extrinsics[0]
    k0 = source.intrinsics[0] if source is not None else k_src
    return starts_at_source(camera.extrinsics[0], e_src0, k_novel0=camera.intrinsics[0], k_src0=k0)


def default_intrinsics(source: CameraPath | None, k: np.ndarray | None, width: int, height: int) -> np.ndarray:
    """The DW-mesh's intrinsics: the source file's (3,3) or (T,3,3), else ``k``, else the reference's."""
    if source is not None:
        ks = source.intrinsics
        return ks[0] if np.allclose(ks, ks[:1]) else ks
    return reference_intrinsics(width, height) if k is None else np.asarray(k, dtype=np.float64)
