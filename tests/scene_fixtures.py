"""An analytic scene of planes, ray-cast exactly from any camera: ground truth for moving-camera, meter,
pass and stereo tests.

World = OpenCV (x right, y down, z forward). Surfaces: an unbounded back wall z = 6; a fronto-parallel card
at z = 3.5; a card tilted 35 degrees about y at z = 4.5. Each has a smooth colour field (low-frequency
sines of its own plane coordinates), so a linear interpolation between pixel samples is accurate and a
PSNR against the ray-cast colour measures geometry, not texture aliasing.
Source frames are sampled at integer pixel coordinates (where the DW-mesh puts its vertices); the
rasteriser samples pixel (i, j) at image coordinates (i + 0.5, j + 0.5), so novel-view ground truth is
ray-cast there (``offset=0.5``).
"""

from __future__ import annotations

import numpy as np

W, H = 160, 120
FX = 140.0
K = np.array([[FX, 0.0, W / 2], [0.0, FX, H / 2], [0.0, 0.0, 1.0]])


def rot(yaw_deg: float = 0.0, pitch_deg: float = 0.0, roll_deg: float = 0.0) -> np.ndarray:
    """Camera-to-world rotation: yaw about y, pitch about x, roll about z (degrees)."""
    y, p, r = np.radians([yaw_deg, pitch_deg, roll_deg])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return ry @ rx @ rz


def pose(centre, c2w_rot: np.ndarray) -> np.ndarray:
    """World-to-camera 4x4 of a camera at ``centre`` with camera-to-world rotation ``c2w_rot``."""
    e = np.eye(4)
    e[:3, :3] = c2w_rot.T
    e[:3, 3] = -c2w_rot.T @ np.asarray(centre, float)
    return e


def _plane(origin, yaw_deg, half=None, freq=(1.3, 1.7), phase=(0.0, 1.0, 2.0)):
    r = rot(yaw_deg)
    return {
        "origin": np.asarray(origin, float),
        "u": r[:, 0],
        "v": r[:, 1],
        "n": r[:, 2],
        "half": half,
        "freq": freq,
        "phase": phase,
    }


PLANES = [
    _plane((0.0, 0.0, 6.0), 0.0, None, (0.9, 1.1), (0.0, 1.5, 3.0)),
    _plane((-0.45, -0.1, 3.5), 0.0, (0.6, 0.45), (2.1, 1.6), (2.0, 0.3, 4.1)),
    _plane((0.95, 0.35, 4.5), 35.0, (0.4, 0.4), (1.8, 2.4), (1.0, 2.6, 0.4)),
]


def plane_color(plane: dict, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    fa, fb = plane["freq"]
    ph = plane["phase"]
    return np.stack(
        [0.5 + 0.35 * np.sin(fa * a + fb * b * (0.5 + 0.3 * c) + ph[c]) for c in range(3)],
        -1,
    )


def cast(origin: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First hits of world rays: (distance along ``dirs`` (N,), colour (N, 3) in [0, 1], plane id (N,))."""
    best = np.full(len(dirs), np.inf)
    col = np.zeros((len(dirs), 3))
    pid = np.full(len(dirs), -1)
    for i, pl in enumerate(PLANES):
        denom = dirs @ pl["n"]
        with np.errstate(divide="ignore", invalid="ignore"):
            s = ((pl["origin"] - origin) @ pl["n"]) / denom
        p = origin + s[:, None] * dirs
        a, b = (p - pl["origin"]) @ pl["u"], (p - pl["origin"]) @ pl["v"]
        ok = np.isfinite(s) & (s > 1e-9) & (s < best)
        if pl["half"] is not None:
            ok &= (np.abs(a) <= pl["half"][0]) & (np.abs(b) <= pl["half"][1])
        best = np.where(ok, s, best)
        col = np.where(ok[:, None], plane_color(pl, a, b), col)
        pid = np.where(ok, i, pid)
    return best, col, pid


def pixel_rays(k: np.ndarray, width: int, height: int, offset: float) -> np.ndarray:
    """(H, W, 3) camera-space rays with z = 1 through pixels (u, v) = (column + offset, row + offset)."""
    v, u = np.meshgrid(np.arange(height) + offset, np.arange(width) + offset, indexing="ij")
    return np.stack([(u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1], np.ones_like(u, dtype=float)], -1)


def render(e: np.ndarray, k: np.ndarray = K, width: int = W, height: int = H, offset: float = 0.0):
    """Ray-cast one camera: (camera-space depth z (H, W), colour (H, W, 3) float, world points (H, W, 3),
    plane id (H, W))."""
    rays = pixel_rays(k, width, height, offset).reshape(-1, 3)
    c2w = np.linalg.inv(e)
    origin = c2w[:3, 3]
    dirs = rays @ c2w[:3, :3].T
    s, col, pid = cast(origin, dirs)  # s = camera z because the rays have z = 1
    pts = origin + s[:, None] * dirs
    return (
        s.reshape(height, width),
        col.reshape(height, width, 3),
        pts.reshape(height, width, 3),
        pid.reshape(height, width),
    )


def visible_from(points: np.ndarray, e: np.ndarray, k: np.ndarray = K, width: int = W, height: int = H):
    """(N,) bool: world points that camera ``e`` sees unoccluded inside its DW-mesh's interior (the pixel
    grid without its one-pixel border ring, where depth is set to 100)."""
    x = points @ e[:3, :3].T + e[:3, 3]
    z = x[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = k[0, 0] * x[:, 0] / z + k[0, 2]
        v = k[1, 1] * x[:, 1] / z + k[1, 2]
    inside = (z > 1e-6) & (u >= 1) & (u <= width - 2) & (v >= 1) & (v <= height - 2)
    c2w = np.linalg.inv(e)
    dirs = np.stack([(u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1], np.ones_like(u)], -1) @ c2w[:3, :3].T
    s, _, _ = cast(c2w[:3, 3], np.where(inside[:, None], dirs, np.array([0.0, 0.0, 1.0])))
    return inside & (np.abs(s - z) <= 1e-6 * np.maximum(1.0, z))


def source_footage(extrinsics: np.ndarray, k: np.ndarray = K, width: int = W, height: int = H):
    """Frames (T, H, W, 3) uint8 and exact depth (T, H, W) float32 seen by each source camera."""
    frames, depth = [], []
    for e in extrinsics:
        z, col, _, _ = render(e, k, width, height, offset=0.0)
        frames.append(np.clip(col * 255 + 0.5, 0, 255).astype(np.uint8))
        depth.append(z.astype(np.float32))
    return np.stack(frames), np.stack(depth)


def jittery_source_path(n_frames: int = 8, seed: int = 3) -> np.ndarray:
    """(T, 4, 4) a handheld move: a dolly right and forward with a pan, plus random jitter of about 1 degree
    and 1.5 cm; frame 0 is NOT the world origin."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(n_frames):
        jr = rng.normal(0.0, 0.8, 3)
        jc = rng.normal(0.0, 0.015, 3)
        centre = np.array([-0.1 + 0.05 * t, -0.05, -0.2 + 0.04 * t]) + jc
        out.append(pose(centre, rot(4.0 - 0.5 * t + jr[0], -1.0 + jr[1], jr[2])))
    return np.stack(out)


def band(mask: np.ndarray, radius: int = 2) -> np.ndarray:
    """(H, W) bool: pixels within ``radius`` of a change of the boolean ``mask`` (a don't-care band)."""
    h, w = mask.shape
    pad = np.pad(mask, radius, mode="edge")
    lo = np.ones_like(mask)
    hi = np.zeros_like(mask)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            win = pad[dy : dy + h, dx : dx + w]
            lo &= win
            hi |= win
    return lo != hi


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((np.asarray(a, float) - np.asarray(b, float)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))
