"""Disocclusion meter: the share of each guide frame the source never saw, from a cheap low-resolution pass.

The full guide's mask is ``alpha > 125`` of each frame's rendered DW-mesh (``render.py``); the meter renders
a decimated DW-mesh of the same frames with the same cameras at a lower output resolution and counts the
masked pixels. What keeps it within about 2 percentage points of the full guide:

1. Decimation keeps the full-resolution geometry where it decides the mask: the grid keeps rows/columns
   0 and 1 and the last two (the border ring at ``border_depth`` and the first interior pixels, whose
   stretched faces become the unseen area beyond the source's frame) and every ``step``-th one between
   them; vertices are the full-resolution pixels' ``depth * ray`` (exact points of the full mesh).
2. Occlusion faces are found by the same test on the decimated mesh (``dwmesh.face_invalid``): a depth
   edge still gives a face spanning it, only one that is ``step`` pixels wide.
3. The output is rasterised at ``1 / out_step`` of the full size with the same clip-space projection; an
   odd ``out_step`` makes meter pixels sample (about, where the size is not a multiple of it) the centres of
   guide pixels (an even one samples on the mesh's vertex rows and aliases the border ring).
4. The decimated occlusion face along a depth edge also covers ``step - 1`` source pixels of surface, where
   the full mesh masks the gap plus about half a pixel of alpha fade on each side; the meter's alpha
   threshold (``fade_threshold``) narrows its fade to compensate (for step >= 2: no fade).
``tests/test_meter.py`` bounds the difference to the full guide (2 percentage points per frame).

``masked_share`` is a pure function of (depth, K, camera, source, scale); callers cache it per camera hash.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from . import raster_cpu
from .cameras import CameraPath
from .constants import MESH_FILTER
from .dwmesh import ANGLE_THRESHOLD_DEG, BORDER_DEPTH, _min_angle_below, face_invalid, grid_faces, vertex_invalid
from .render import MASK_THRESHOLD, clip_positions, guide_masked_share  # noqa: F401 (re-exported)

TARGET_SIDE = 170  # the meter's long side in pixels (512 px footage: every 3rd pixel)


def meter_step(width: int, height: int, target: int = TARGET_SIDE) -> int:
    """The decimation for footage of this size: an ODD number of guide pixels per meter pixel, so that meter
    pixels sample exactly the centres of guide pixels ((i + 0.5) * s is a half-integer), about ``target``
    meter pixels along the long side (1 = no decimation below ~250 px)."""
    return max(1, 2 * round((max(width, height) / target - 1) / 2) + 1)


def decimated_indices(n: int, step: int) -> np.ndarray:
    """Indices 0, 1, 1 + step, 1 + 2 step, ..., n - 2, n - 1 (sorted, unique): the border ring and the first
    interior pixel at each end kept exactly."""
    inner = np.arange(1, n - 1, max(1, step))
    return np.unique(np.concatenate([[0], inner, [n - 2, n - 1]]))


def decimated_vertices(
    depth: np.ndarray, k: np.ndarray, rows: np.ndarray, cols: np.ndarray, border_depth: float = BORDER_DEPTH
) -> torch.Tensor:
    """(T, h*w, 3) float32: full-resolution DW-mesh vertices (border ring at ``border_depth``) at the kept
    rows and columns. ``k``: (3, 3) or (T, 3, 3)."""
    d = np.asarray(depth)[:, rows[:, None], cols[None, :]].astype(np.float32)  # one gather, (T, h, w)
    d[:, 0, :] = d[:, -1, :] = d[:, :, 0] = d[:, :, -1] = border_depth
    k = np.asarray(k, dtype=np.float64)
    kk = k[None] if k.ndim == 2 else k  # (1 or T, 3, 3)
    u = cols[None, None, :].astype(np.float64)
    v = rows[None, :, None].astype(np.float64)
    rx = ((u - kk[:, 0, 2, None, None]) / kk[:, 0, 0, None, None]).astype(np.float32)  # (1|T, 1, w)
    ry = ((v - kk[:, 1, 2, None, None]) / kk[:, 1, 1, None, None]).astype(np.float32)  # (1|T, h, 1)
    verts = np.empty(d.shape + (3,), np.float32)
    np.multiply(d, rx, out=verts[..., 0])
    np.multiply(d, ry, out=verts[..., 1])
    verts[..., 2] = d
    return torch.from_numpy(verts.reshape(len(d), -1, 3))


def fade_threshold(step: int) -> float:
    """The alpha (0..255) at or below which a meter pixel counts as masked, chosen so that the meter's masked
    width along a depth edge matches the full guide's (see the module docstring): the full mesh masks the gap
    plus about 0.49 px of fade on each side; the decimated mesh's occlusion face also covers ``step - 1``
    source pixels of surface, and its fade is ``tau * step`` px per side, so tau = (1.98 - step) / (2 step),
    clipped at 0 (step 1: the guide's own threshold)."""
    if step <= 1:
        return float(MASK_THRESHOLD)
    tau = max(0.0, (1.0 + 2 * MASK_THRESHOLD / 255.0 - step) / (2.0 * step))
    return max(0.5, 255.0 * tau)


@numba.njit(cache=True, inline="always")
def _small(ax, ay, az, bx, by, bz, cos2):
    dot = ax * bx + ay * by + az * bz
    return dot > 0.0 and dot * dot > cos2 * (ax * ax + ay * ay + az * az) * (bx * bx + by * by + bz * bz)


@numba.njit(cache=True, inline="always")
def _tri_small_angle(p, q, r, cos2):
    """dwmesh._min_angle_below for one triangle (points as 3-tuples)."""
    e01 = (q[0] - p[0], q[1] - p[1], q[2] - p[2])
    e02 = (r[0] - p[0], r[1] - p[1], r[2] - p[2])
    e12 = (r[0] - q[0], r[1] - q[1], r[2] - q[2])
    return (
        _small(e01[0], e01[1], e01[2], e02[0], e02[1], e02[2], cos2)
        or _small(-e01[0], -e01[1], -e01[2], e12[0], e12[1], e12[2], cos2)
        or _small(e02[0], e02[1], e02[2], e12[0], e12[1], e12[2], cos2)
    )


@numba.njit(parallel=True, cache=True)
def _angle_vertex_invalid(g, cos2, out):
    """out (T, h, w) bool |= vertices of the quads' (c, a, b) / (c, b, d) faces with a small angle (the
    'angle' filter of ``dwmesh.face_invalid``, fused with ``vertex_invalid``; closing faces excluded)."""
    n, h, w, _ = g.shape
    for t in numba.prange(n):
        for r in range(h - 1):
            for c in range(w - 1):
                a = (g[t, r, c, 0], g[t, r, c, 1], g[t, r, c, 2])
                b = (g[t, r, c + 1, 0], g[t, r, c + 1, 1], g[t, r, c + 1, 2])
                cc = (g[t, r + 1, c, 0], g[t, r + 1, c, 1], g[t, r + 1, c, 2])
                d = (g[t, r + 1, c + 1, 0], g[t, r + 1, c + 1, 1], g[t, r + 1, c + 1, 2])
                if _tri_small_angle(cc, a, b, cos2):
                    out[t, r, c] = True
                    out[t, r, c + 1] = True
                    out[t, r + 1, c] = True
                if _tri_small_angle(cc, b, d, cos2):
                    out[t, r, c + 1] = True
                    out[t, r + 1, c] = True
                    out[t, r + 1, c + 1] = True


def vertex_alpha(verts: torch.Tensor, h: int, w: int, faces: torch.Tensor, mesh_filter: str) -> torch.Tensor:
    """(T, h*w, 1) float32 vertex alpha (0 on occlusion faces' vertices, else 255), as ``build_dwmesh``; the
    'angle' filter runs as one fused numba pass (the torch version dominates the meter's time)."""
    t = verts.shape[0]
    if mesh_filter == "angle":
        cos = math.cos(math.radians(ANGLE_THRESHOLD_DEG))
        bad = np.zeros((t, h, w), np.bool_)
        _angle_vertex_invalid(np.ascontiguousarray(verts.numpy().reshape(t, h, w, 3)), cos * cos, bad)
        bad = torch.from_numpy(bad.reshape(t, -1))
        corners = faces[-2:]  # the two closing faces across the image corners
        tri = verts[:, corners]  # (T, 2, 3, 3)
        closing = _min_angle_below(tri[..., 0, :], tri[..., 1, :], tri[..., 2, :], ANGLE_THRESHOLD_DEG)
        for i in range(2):
            bad[:, corners[i]] |= closing[:, i : i + 1]
    else:
        bad = vertex_invalid(face_invalid(verts, h, w, faces, mesh_filter), h, w)
    return (~bad).to(torch.float32)[..., None] * 255.0


def masked_share(
    depth: np.ndarray,
    k: np.ndarray,
    camera: CameraPath,
    *,
    source: CameraPath | None = None,
    depth_scale: float | np.ndarray = 1.0,
    step: int | None = None,
    out_step: int | None = None,
    mesh_filter: str = MESH_FILTER,
    border_depth: float = BORDER_DEPTH,
    first_frame_rule: bool = True,
    renderer: str = "cpu",
) -> np.ndarray:
    """(T,) float: the share (0..1) of each guide frame that is masked (unseen by the source).

    Args:
        depth: (T, H, W) depth (z, depth units) at the processing resolution.
        k: (3, 3) or (T, 3, 3) source intrinsics (pixels, processing resolution).
        camera: the novel camera (world space, >= T frames, processing resolution).
        source: the source camera path (None: static at the origin); depth_scale: depth -> world units.
        step, out_step: mesh and output decimation (default ``meter_step``; 1, 1 = the full guide's mesh and
            resolution; keep ``out_step`` odd).
        first_frame_rule: frame 0 reads 0 when the novel camera starts at the source (as the guide).
        renderer: "cpu" (numba) or "cuda" (nvdiffrast, no antialiasing; "auto": cuda when available).
    """
    from .camera_paths import guide_starts_at_source
    from .render import novel_extrinsics, resolve_renderer

    depth = np.asarray(depth)
    t, h, w = depth.shape
    step = meter_step(w, h) if step is None else int(step)
    out_step = step if out_step is None else int(out_step)
    rows, cols = decimated_indices(h, step), decimated_indices(w, step)
    hl, wl = len(rows), len(cols)
    verts = decimated_vertices(depth, k, rows, cols, border_depth)
    faces = grid_faces(hl, wl)
    alpha = vertex_alpha(verts, hl, wl, faces, mesh_filter)  # (T, V, 1)
    ext = novel_extrinsics(t, camera, 0, source, depth_scale)  # the guide's placement of each frame's mesh
    clip = clip_positions(verts, ext, camera.intrinsics[:t], w, h)  # same clip space as the full guide
    ho, wo = max(1, round(h / out_step)), max(1, round(w / out_step))
    if resolve_renderer(renderer) == "cuda":
        from . import raster_cuda

        f32 = faces.to(device="cuda", dtype=torch.int32).contiguous()
        a_t, _ = raster_cuda.rasterize_interpolate(clip.cuda(), f32, alpha.cuda(), (ho, wo), antialias=False)
        a = a_t[..., 0].cpu().numpy()
    else:
        tri, bary = raster_cpu.rasterize(clip.numpy(), faces.numpy(), (ho, wo))
        a = raster_cpu.interpolate(alpha.numpy(), faces.numpy(), tri, bary)[..., 0]
    share = (a <= fade_threshold(step)).reshape(t, -1).mean(1)
    if first_frame_rule:
        k0 = np.asarray(k)[0] if np.ndim(k) == 3 else np.asarray(k)
        if guide_starts_at_source(camera, source, k0):
            share[0] = 0.0
    return share
