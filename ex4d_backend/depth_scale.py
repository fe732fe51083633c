"""The depth's scale from a camera solve: fit monocular depth (its own units) to the solve's 3D bundles.

A camera solve (Blender's Movie Clip Editor, another tracker) has its own scale; monocular depth another.
The DW-mesh is built from the depth, the source camera path is the solve's, so the depth must be brought to
the solve's units: ``z_world = s * z_depth``.

1. Observations: every bundle X_j (world point) on every frame t where it is tracked: its camera-space
   depth ``z_solve = (E_src[t] @ X_j).z`` and the depth map at its image position (the projection
   ``K_t x / z``, or the tracked marker position when given), bilinearly sampled: ``z_depth``. Bundles behind
   the camera or outside the image (and its one-pixel border ring) are skipped.
2. Robust fit in log space: ``log s = argmin sum huber((log z_solve - log z_depth - log s) / sigma)`` by
   iteratively reweighted least squares started from the median of the log ratios; sigma = 1.4826 * MAD.
   Per shot, or per frame (frames with fewer than ``min_per_frame`` observations take the shot's scale).
3. Report: the scale, the robust relative residual (sigma of the log ratios: 0.05 = about 5 %), the share
   of observations within ``INLIER_LOG`` of the fit, and the robust slope of the log ratio against log
   depth (0 for a scaled copy; an affine disparity gives a clear slope even where a robust scale looks
   fine); warnings when the fit is poor (residual above ``WARN_RESIDUAL``, |slope| above ``WARN_SLOPE``,
   too few observations, few inliers): monocular depth is then not a scaled copy of the solve's geometry
   (an affine disparity, a bad solve) and a single scale cannot fix it.
Without bundles: a manual scale (``ScaleFit.manual``).

Bundle files: .json ``{"bundles": [{"co": [x, y, z], "frames": [t, ...], "uv": [[u, v], ...]?}, ...],
"convention": "opencv" | "blender"}`` (Blender world coordinates are converted with ``CV_TO_BLENDER``) or
.npz with ``points`` (M, 3), ``visibility`` (T, M) bool and optional ``uv`` (T, M, 2) pixels.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cameras import CV_TO_BLENDER, CameraPath, small_file
from .errors import Ex4dError

HUBER_K = 1.345  # Huber's threshold in sigmas (95 % efficiency for Gaussian residuals)
IRLS_ITERATIONS = 30
MIN_OBSERVATIONS = 8  # fewer: the fit is reported but warned about
MIN_PER_FRAME = 5  # a per-frame scale needs this many observations on the frame
WARN_RESIDUAL = 0.10  # robust relative residual above which the fit is called poor
INLIER_LOG = 0.10  # |log ratio - log s| below this counts as an inlier (about 10 %)
WARN_INLIERS = 0.5  # inlier share below which the fit is called poor
WARN_SLOPE = 0.15  # |d log(z_solve / z_depth) / d log z_depth| above which depth is not a scaled copy
MIN_LOG_RANGE = 0.1  # the slope is judged only when the solve's depths span this much (log, 5-95 %)
SIGMA_FLOOR = 1e-6


@dataclass
class Bundles:
    """3D points of a camera solve and where they are tracked."""

    points: np.ndarray  # (M, 3) float64, OpenCV world (the source camera path's world)
    visibility: np.ndarray  # (T, M) bool: bundle j is tracked on frame t
    uv: np.ndarray | None = None  # (T, M, 2) float64 marker positions in pixels (u = column, v = row), or None


@dataclass
class ScaleFit:
    """Depth units -> world units: ``scale`` per shot and optionally ``per_frame`` (T,)."""

    scale: float
    per_frame: np.ndarray | None = None
    residual: float = 0.0  # robust relative residual (sigma of log ratios)
    slope: float = 0.0  # robust slope of log ratio against log depth: 0 for a scaled copy
    n_obs: int = 0
    inlier_share: float = 1.0
    warnings: list[str] = field(default_factory=list)

    @property
    def poor(self) -> bool:
        return bool(self.warnings)

    def scales(self, n_frames: int) -> np.ndarray:
        """(T,) the per-frame scales (the shot's scale where there is no per-frame fit)."""
        if self.per_frame is not None:
            return np.asarray(self.per_frame, dtype=np.float64)[:n_frames]
        return np.full(n_frames, self.scale)

    @classmethod
    def manual(cls, scale: float) -> ScaleFit:
        if not (math.isfinite(scale) and scale > 0):
            raise Ex4dError(f"the depth scale must be a positive number, got {scale}", where="depth scale")
        return cls(float(scale))

    def summary(self) -> dict:
        return {
            "scale": self.scale,
            "per_frame": None if self.per_frame is None else [float(x) for x in self.per_frame],
            "residual": self.residual,
            "slope": self.slope,
            "n_obs": self.n_obs,
            "inlier_share": self.inlier_share,
            "warnings": list(self.warnings),
        }


# ----------------------------------------------------------------------------------------------
# Bundles in
# ----------------------------------------------------------------------------------------------
def bundles_from_blender(points_blender: np.ndarray) -> np.ndarray:
    """(M, 3) OpenCV-world points from Blender world coordinates (``inv(CV_TO_BLENDER)``)."""
    p = np.asarray(points_blender, dtype=np.float64)
    return p @ np.linalg.inv(CV_TO_BLENDER)[:3, :3].T


def load_bundles(path: str | os.PathLike, n_frames: int) -> Bundles:
    """A bundle file (see the module docstring), visibility cut or padded to ``n_frames`` frames."""
    p = Path(path)
    where = str(p)
    with small_file(p, "bundle file") as read:
        if p.suffix.lower() == ".npz":
            with np.load(io.BytesIO(read())) as data:
                points = np.asarray(data["points"], dtype=np.float64)
                vis = np.asarray(data["visibility"], dtype=bool)
                uv = np.asarray(data["uv"], dtype=np.float64) if "uv" in data else None
            if points.ndim != 2 or points.shape[1] != 3 or vis.ndim != 2 or vis.shape[1] != len(points):
                raise Ex4dError(
                    f"points must be (M, 3) and visibility (T, M), got {points.shape} and {vis.shape}", where=where
                )
            if uv is not None and uv.shape != vis.shape + (2,):
                raise Ex4dError(f"uv must be (T, M, 2) = {vis.shape + (2,)}, got {uv.shape}", where=where)
        elif p.suffix.lower() == ".json":
            points, vis, uv = bundles_from_json(json.loads(read().decode("utf-8")), n_frames, where)
        else:
            raise Ex4dError("bundle files must be .json or .npz", where=where)
    if not np.isfinite(points).all() or (uv is not None and not np.isfinite(uv[vis]).all()):
        raise Ex4dError("the bundle file contains NaN or infinite values", where=where)
    t = vis.shape[0]
    if t < n_frames:  # frames past the end: nothing tracked
        vis = np.concatenate([vis, np.zeros((n_frames - t, vis.shape[1]), bool)])
        if uv is not None:
            uv = np.concatenate([uv, np.zeros((n_frames - t,) + uv.shape[1:])])
    return Bundles(points, vis[:n_frames], None if uv is None else uv[:n_frames])


def bundles_from_json(data: object, n_frames: int, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(points (M, 3) OpenCV world, visibility (T, M), uv (T, M, 2) or None) from the JSON bundle layout."""
    if not isinstance(data, dict) or not isinstance(data.get("bundles"), list):
        raise Ex4dError("a JSON bundle file must hold {'bundles': [...]}", where=where)
    convention = str(data.get("convention", "opencv")).lower()
    if convention not in ("opencv", "blender"):
        raise Ex4dError(f"unknown convention '{convention}'", where=where, hint="use opencv or blender")
    items = data["bundles"]
    points = np.array([b["co"] for b in items], dtype=np.float64).reshape(-1, 3)
    if convention == "blender":
        points = bundles_from_blender(points)
    vis = np.zeros((n_frames, len(items)), bool)
    has_uv = any("uv" in b for b in items)
    uv = np.zeros((n_frames, len(items), 2)) if has_uv else None
    for j, b in enumerate(items):
        frames = [int(f) for f in b["frames"]]
        coords = b.get("uv")
        if has_uv and (coords is None or len(coords) != len(frames)):
            raise Ex4dError(f"bundle {j}: 'uv' must give one [u, v] per frame", where=where)
        for i, f in enumerate(frames):
            if 0 <= f < n_frames:
                vis[f, j] = True
                if has_uv:
                    uv[f, j] = coords[i]
    return points, vis, uv


# ----------------------------------------------------------------------------------------------
# Observations and the robust fit
# ----------------------------------------------------------------------------------------------
def bilinear(depth: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(N,) bilinear samples of an (H, W) map at pixel coordinates (u = column, v = row), inside the map."""
    h, w = depth.shape
    c0 = np.clip(np.floor(u).astype(int), 0, w - 2)
    r0 = np.clip(np.floor(v).astype(int), 0, h - 2)
    fu, fv = u - c0, v - r0
    d = np.asarray(depth, dtype=np.float64)
    return (
        d[r0, c0] * (1 - fu) * (1 - fv)
        + d[r0, c0 + 1] * fu * (1 - fv)
        + d[r0 + 1, c0] * (1 - fu) * fv
        + d[r0 + 1, c0 + 1] * fu * fv
    )


def observations(bundles: Bundles, source: CameraPath, depth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frame index (O,), z_solve (O,), z_depth (O,)) for every usable tracked bundle (step 1)."""
    t_n, h, w = np.shape(depth)
    frames, z_solve, z_depth = [], [], []
    pts = np.concatenate([bundles.points, np.ones((len(bundles.points), 1))], 1)  # (M, 4)
    for t in range(min(t_n, len(source), len(bundles.visibility))):
        j = np.flatnonzero(bundles.visibility[t])
        if not len(j):
            continue
        x = (source.extrinsics[t] @ pts[j].T).T[:, :3]
        z = x[:, 2]
        if bundles.uv is not None:
            u, v = bundles.uv[t, j, 0], bundles.uv[t, j, 1]
        else:
            k = source.intrinsics[t]
            with np.errstate(divide="ignore", invalid="ignore"):
                u = k[0, 0] * x[:, 0] / z + k[0, 1] * x[:, 1] / z + k[0, 2]
                v = k[1, 1] * x[:, 1] / z + k[1, 2]
        ok = (z > 0) & np.isfinite(u) & np.isfinite(v) & (u >= 1) & (u <= w - 2) & (v >= 1) & (v <= h - 2)
        if not ok.any():
            continue
        d = bilinear(np.asarray(depth[t]), u[ok], v[ok])
        good = np.isfinite(d) & (d > 0)
        frames.append(np.full(int(good.sum()), t))
        z_solve.append(z[ok][good])
        z_depth.append(d[good])
    if not frames:
        return np.zeros(0, int), np.zeros(0), np.zeros(0)
    return np.concatenate(frames), np.concatenate(z_solve), np.concatenate(z_depth)


def robust_log_mean(values: np.ndarray, huber_k: float = HUBER_K) -> tuple[float, float]:
    """Huber M-estimate of the location of (N,) values (IRLS from the median) and the robust sigma
    (1.4826 * MAD about it)."""
    x = np.asarray(values, dtype=np.float64)
    mu = float(np.median(x))
    sigma = max(1.4826 * float(np.median(np.abs(x - mu))), SIGMA_FLOOR)
    for _ in range(IRLS_ITERATIONS):
        r = np.abs(x - mu) / sigma
        wgt = np.minimum(1.0, huber_k / np.maximum(r, 1e-12))
        new = float((wgt * x).sum() / wgt.sum())
        if abs(new - mu) < 1e-12:
            break
        mu = new
    sigma = max(1.4826 * float(np.median(np.abs(x - mu))), SIGMA_FLOOR)
    return mu, sigma


def robust_slope(x: np.ndarray, y: np.ndarray, huber_k: float = HUBER_K) -> float:
    """Huber IRLS slope of the line y = a + b x (started from least squares on the median-centred data)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    a = np.stack([np.ones_like(x), x], 1)
    wgt = np.ones_like(x)
    coef = np.zeros(2)
    for _ in range(IRLS_ITERATIONS):
        sw = np.sqrt(wgt)
        coef = np.linalg.lstsq(a * sw[:, None], y * sw, rcond=None)[0]
        r = y - a @ coef
        sigma = max(1.4826 * float(np.median(np.abs(r - np.median(r)))), SIGMA_FLOOR)
        wgt = np.minimum(1.0, huber_k / np.maximum(np.abs(r) / sigma, 1e-12))
    return float(coef[1])


def fit_depth_scale(
    bundles: Bundles,
    source: CameraPath,
    depth: np.ndarray,
    *,
    per_frame: bool = False,
    min_per_frame: int = MIN_PER_FRAME,
    warn_residual: float = WARN_RESIDUAL,
) -> ScaleFit:
    """Fit ``z_world = s * z_depth`` to the bundles (steps 1-3). ``depth``: (T, H, W) in depth units."""
    frames, z_solve, z_depth = observations(bundles, source, depth)
    if len(frames) == 0:
        raise Ex4dError(
            "no bundle projects into the footage in front of the camera",
            where="bundles",
            hint="check that the bundles and the source camera are in one world (and the frame range)",
        )
    log_ratio = np.log(z_solve) - np.log(z_depth)
    mu, sigma = robust_log_mean(log_ratio)
    inliers = float(np.mean(np.abs(log_ratio - mu) < INLIER_LOG))
    warnings = []
    if len(frames) < MIN_OBSERVATIONS:
        warnings.append(f"only {len(frames)} bundle observations (at least {MIN_OBSERVATIONS} recommended)")
    if sigma > warn_residual:
        warnings.append(
            f"the depth does not follow the solve: robust residual {100 * sigma:.1f} % "
            f"(> {100 * warn_residual:.0f} %); monocular depth may not be a scaled copy of the scene"
        )
    if inliers < WARN_INLIERS:
        warnings.append(f"only {100 * inliers:.0f} % of the observations agree with the fitted scale within 10 %")
    # The slope is taken against the depth map's log depth (a bad bundle keeps its pixel, so its error does
    # not correlate with it), judged where the solve's depths span enough of a range.
    spread = float(np.subtract(*np.percentile(np.log(z_solve), [95, 5])))
    slope = robust_slope(np.log(z_depth), log_ratio) if spread >= MIN_LOG_RANGE and len(frames) >= 3 else 0.0
    if abs(slope) > WARN_SLOPE:
        warnings.append(
            f"the depth does not follow the solve: the solve/depth ratio changes with depth (slope {slope:.2f}); "
            "the depth is not a scaled copy of the scene (a relative or affine depth?)"
        )
    scales = None
    if per_frame:
        scales = np.full(int(np.shape(depth)[0]), math.exp(mu))
        for t in np.unique(frames):
            sel = frames == t
            if sel.sum() >= min_per_frame:
                scales[t] = math.exp(robust_log_mean(log_ratio[sel])[0])
    return ScaleFit(math.exp(mu), scales, sigma, slope, int(len(frames)), inliers, warnings)
