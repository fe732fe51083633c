"""A CPU triangle rasteriser with nvdiffrast's conventions (numba; no GPU, no display).

Same inputs and conventions as ``nvdiffrast.torch.rasterize`` + ``interpolate``:
- ``clip``: (T, V, 4) clip-space positions (OpenGL style, w > 0 in front of the camera);
- pixel (i, j) (column, row) samples ndc ((i + 0.5) * 2 / W - 1, (j + 0.5) * 2 / H - 1): row 0 is ndc y = -1;
- a pixel is covered by the nearest triangle (smallest ndc z) with -1 <= ndc z <= 1 (near/far clipping);
  triangles crossing the camera plane are handled by homogeneous rasterisation (no artefacts);
- no back-face culling; attributes are interpolated with perspective-correct barycentrics.
Not reproduced: nvdiffrast's ``antialias`` (analytic silhouette-edge blending); the GPU test measures the
difference (mask IoU, colour PSNR).
"""

from __future__ import annotations

import math

import numba
import numpy as np

NEAR_W = 1e-7  # w (= camera z) below which a vertex counts as behind the camera
BBOX_EPS = 1e-3  # pixels added around each triangle's screen bounding box (coverage is decided exactly)


@numba.njit(cache=True, fastmath=False)
def _raster_one(clip, faces, face_ok, use_mask, height, width, tri_out, bary_out, zbuf):
    """Rasterise one frame. clip (V,4) f32, faces (F,3) i32. Writes tri_out (H,W) i32 (-1 = empty),
    bary_out (H,W,2) f32 (weights of vertices 0 and 1), zbuf (H,W) f32 (ndc z)."""
    n_faces = faces.shape[0]
    sx = width * 0.5
    sy = height * 0.5
    for f in range(n_faces):
        if use_mask and not face_ok[f]:
            continue
        i0, i1, i2 = faces[f, 0], faces[f, 1], faces[f, 2]
        x0, y0, z0, w0 = clip[i0, 0], clip[i0, 1], clip[i0, 2], clip[i0, 3]
        x1, y1, z1, w1 = clip[i1, 0], clip[i1, 1], clip[i1, 2], clip[i1, 3]
        x2, y2, z2, w2 = clip[i2, 0], clip[i2, 1], clip[i2, 2], clip[i2, 3]
        # Near clipping volume z >= -w: if every vertex is outside, skip.
        if z0 < -w0 and z1 < -w1 and z2 < -w2:
            continue
        if z0 > w0 and z1 > w1 and z2 > w2:
            continue
        # Screen bounding box (pixels) of the part in front of the near plane (clip z >= -w): clip the
        # triangle's edges against that plane so triangles crossing the camera plane stay bounded.
        d0, d1, d2 = z0 + w0, z1 + w1, z2 + w2
        xmin, xmax, ymin, ymax = np.inf, -np.inf, np.inf, -np.inf
        for e in range(3):
            if e == 0:
                xa, ya, wa, da, xb, yb, wb, db = x0, y0, w0, d0, x1, y1, w1, d1
            elif e == 1:
                xa, ya, wa, da, xb, yb, wb, db = x1, y1, w1, d1, x2, y2, w2, d2
            else:
                xa, ya, wa, da, xb, yb, wb, db = x2, y2, w2, d2, x0, y0, w0, d0
            if da >= 0.0:
                xmin = min(xmin, xa / wa)
                xmax = max(xmax, xa / wa)
                ymin = min(ymin, ya / wa)
                ymax = max(ymax, ya / wa)
            if (da >= 0.0) != (db >= 0.0):
                s_ = da / (da - db)
                xi = xa + s_ * (xb - xa)
                yi = ya + s_ * (yb - ya)
                wi = wa + s_ * (wb - wa)
                if wi > NEAR_W:
                    xmin = min(xmin, xi / wi)
                    xmax = max(xmax, xi / wi)
                    ymin = min(ymin, yi / wi)
                    ymax = max(ymax, yi / wi)
        if not (xmin <= xmax and ymin <= ymax):
            continue
        # ndc -> pixel coordinates; pixel i covers centre i + 0.5. The box is widened by BBOX_EPS pixels:
        # the edge functions below decide coverage, and a centre lying exactly on a shared edge must not be
        # dropped by the rounding of x / w here (that left holes between adjacent triangles).
        c0 = max(0, int(math.ceil(min((xmin + 1.0) * sx, 1e9) - 0.5 - BBOX_EPS)))
        c1 = min(width - 1, int(math.floor(max((xmax + 1.0) * sx, -1e9) - 0.5 + BBOX_EPS)))
        r0 = max(0, int(math.ceil(min((ymin + 1.0) * sy, 1e9) - 0.5 - BBOX_EPS)))
        r1 = min(height - 1, int(math.floor(max((ymax + 1.0) * sy, -1e9) - 0.5 + BBOX_EPS)))
        if c0 > c1 or r0 > r1:
            continue
        # Homogeneous edge functions: b'_i(p) = (c_j x c_k) . (px, py, 1) with c_i = (x_i, y_i, w_i).
        a0 = y1 * w2 - w1 * y2
        b0 = w1 * x2 - x1 * w2
        k0 = x1 * y2 - y1 * x2
        a1 = y2 * w0 - w2 * y0
        b1 = w2 * x0 - x2 * w0
        k1 = x2 * y0 - y2 * x0
        a2 = y0 * w1 - w0 * y1
        b2 = w0 * x1 - x0 * w1
        k2 = x0 * y1 - y0 * x1
        det = x0 * a0 + y0 * b0 + w0 * k0
        if det == 0.0:
            continue
        s = 1.0 if det > 0.0 else -1.0
        for r in range(r0, r1 + 1):
            ny = (r + 0.5) / sy - 1.0
            for c in range(c0, c1 + 1):
                nx = (c + 0.5) / sx - 1.0
                e0 = s * (a0 * nx + b0 * ny + k0)
                e1 = s * (a1 * nx + b1 * ny + k1)
                e2 = s * (a2 * nx + b2 * ny + k2)
                if e0 < 0.0 or e1 < 0.0 or e2 < 0.0:
                    continue
                tot = e0 + e1 + e2
                if tot <= 0.0:
                    continue
                u = e0 / tot
                v = e1 / tot
                q = 1.0 - u - v
                wz = u * w0 + v * w1 + q * w2
                if wz <= 0.0:
                    continue
                z = (u * z0 + v * z1 + q * z2) / wz
                if z < -1.0 or z > 1.0:
                    continue
                if z < zbuf[r, c]:
                    zbuf[r, c] = z
                    tri_out[r, c] = f
                    bary_out[r, c, 0] = u
                    bary_out[r, c, 1] = v


@numba.njit(parallel=True, cache=True)
def _raster_frames(clip, faces, face_ok, use_mask, height, width, tri_out, bary_out):
    n = clip.shape[0]
    for t in numba.prange(n):
        zbuf = np.full((height, width), np.inf, dtype=np.float32)
        ok = face_ok[t] if use_mask else face_ok[0]
        _raster_one(clip[t], faces, ok, use_mask, height, width, tri_out[t], bary_out[t], zbuf)


@numba.njit(parallel=True, cache=True)
def _interpolate(attr, faces, tri, bary, out):
    n, height, width = tri.shape
    channels = attr.shape[2]
    for t in numba.prange(n):
        for r in range(height):
            for c in range(width):
                f = tri[t, r, c]
                if f < 0:
                    for ch in range(channels):
                        out[t, r, c, ch] = 0.0
                    continue
                u = bary[t, r, c, 0]
                v = bary[t, r, c, 1]
                q = 1.0 - u - v
                i0, i1, i2 = faces[f, 0], faces[f, 1], faces[f, 2]
                for ch in range(channels):
                    out[t, r, c, ch] = u * attr[t, i0, ch] + v * attr[t, i1, ch] + q * attr[t, i2, ch]


def rasterize(
    clip: np.ndarray, faces: np.ndarray, resolution: tuple[int, int], face_valid: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise (T, V, 4) clip positions. ``resolution`` = (H, W).

    Returns ``tri`` (T, H, W) int32 (covering face index, -1 where empty) and ``bary`` (T, H, W, 2) float32
    (perspective-correct weights of the face's vertices 0 and 1; vertex 2 gets 1 - u - v), i.e. nvdiffrast's
    ``rast[..., 0:2]`` and ``rast[..., 3] - 1``. ``face_valid`` (T, F) bool skips faces per frame.
    """
    clip = np.ascontiguousarray(clip, dtype=np.float32)
    faces = np.ascontiguousarray(faces, dtype=np.int32)
    height, width = resolution
    n = clip.shape[0]
    tri = np.full((n, height, width), -1, dtype=np.int32)
    bary = np.zeros((n, height, width, 2), dtype=np.float32)
    use_mask = face_valid is not None
    ok = np.ascontiguousarray(face_valid, dtype=np.bool_) if use_mask else np.ones((1, 1), dtype=np.bool_)
    _raster_frames(clip, faces, ok, use_mask, height, width, tri, bary)
    return tri, bary


def interpolate(attr: np.ndarray, faces: np.ndarray, tri: np.ndarray, bary: np.ndarray) -> np.ndarray:
    """Interpolate (T, V, C) vertex attributes at the rasterised pixels: (T, H, W, C) float32, 0 where empty."""
    attr = np.ascontiguousarray(attr, dtype=np.float32)
    out = np.empty(tri.shape + (attr.shape[2],), dtype=np.float32)
    _interpolate(attr, np.ascontiguousarray(faces, dtype=np.int32), tri, bary, out)
    return out
