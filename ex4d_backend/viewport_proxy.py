"""The add-on's viewport proxy of the DW-mesh: a regular subsample of the pixel-grid mesh (numpy, no torch).

The add-on shows the DW-mesh as a Blender object; at full resolution (1024 x 576: 590k vertices, 1.2M faces)
that object takes seconds to build and its point cache 154 MB per 49 frames at 512². The proxy keeps every
``s``-th grid column and row plus the last ones (so the border ring, at ``border_depth``, and the image
corners stay: the proxy spans the whole frame). Its vertices ARE full-mesh vertices (a subset: it lines up
with the footage from the source camera); its faces follow the reference triangulation on the proxy grid
(``dwmesh.grid_faces``' rule); a proxy face is an occlusion face when any full face it covers is (a full face
is covered by the proxy face that holds its centroid, in pixel coordinates: each full face belongs to exactly
one proxy face). The backend's own rendering (guide, meter, passes) never uses the proxy.

1. :func:`viewport_stride`: ``s`` for a processing size and a detail ("proxy": the smallest s with
   W*H / s² <= :data:`MAX_PROXY_VERTICES`; "full": 1);
2. :func:`grid_lines`: the kept columns / rows; :func:`vertex_index`: the proxy's full-mesh vertex indices;
3. :func:`proxy_faces`: the proxy's (Fp, 3) faces in proxy vertex indices;
4. :func:`face_owner`: for every full face, the proxy face that covers it; :func:`proxy_occlusion` ORs the
   full mesh's (T, F) occlusion flags into the proxy's (T, Fp).
"""

from __future__ import annotations

import numpy as np

from .errors import Ex4dError

MAX_PROXY_VERTICES = 65_536  # W*H / s² per frame: 512² -> s = 2, 1024 x 576 -> s = 3
DETAILS = ("proxy", "full")
MAX_STRIDE = 64


def viewport_stride(width: int, height: int, detail: str = "full") -> int:
    """The proxy's stride ``s`` (1 = the full mesh) for a W x H processing grid."""
    if detail == "full":
        return 1
    if detail != "proxy":
        raise Ex4dError(f"unknown viewport detail '{detail}'", where="viewport_detail", hint="use proxy or full")
    s = 1
    while width * height > MAX_PROXY_VERTICES * s * s:
        s += 1
    return s


def grid_lines(n: int, stride: int) -> np.ndarray:
    """(m,) int64 kept grid lines of a grid of ``n`` lines: 0, s, 2s, ... and n - 1."""
    if stride < 1 or n < 2:
        raise Ex4dError(f"a proxy of stride {stride} on {n} grid lines", where="viewport_stride", hint="stride >= 1")
    return np.unique(np.append(np.arange(0, n, stride), n - 1)).astype(np.int64)


def vertex_index(width: int, height: int, stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(columns (wp,), rows (hp,), index (hp*wp,)): the proxy vertices' full-mesh indices, row-major."""
    cols, rows = grid_lines(width, stride), grid_lines(height, stride)
    return cols, rows, (rows[:, None] * width + cols[None, :]).ravel()


def proxy_faces(wp: int, hp: int) -> np.ndarray:
    """(2 (hp-1)(wp-1) + 2, 3) int32 faces of the reference triangulation on an hp x wp grid."""
    idx = np.arange(hp * wp).reshape(hp, wp)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, :-1], idx[1:, 1:]
    quads = np.stack([np.stack([c, a, b], -1), np.stack([c, b, d], -1)], axis=2).reshape(-1, 3)
    closing = np.array([[wp - 1, 0, hp * wp - 1], [hp * wp - 1, 0, (hp - 1) * wp]])
    return np.concatenate([quads, closing]).astype(np.int32)


def face_owner(width: int, height: int, cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(F,) int64: the proxy face covering each full face (the one holding its pixel-space centroid).

    Full face 2q / 2q+1 of quad q = r (W-1) + c has its centroid at (c + 1/3, r + 1/3) / (c + 2/3, r + 2/3)
    (x = column, y = row); proxy quad (i, j) spans columns cols[j]..cols[j+1] and rows rows[i]..rows[i+1];
    its face (c, a, b) is the half u + v < 1 (u, v: the centroid's position across the quad, 0..1). The two
    closing faces cover the full mesh's two closing faces (the same vertex triples)."""
    wp, hp = len(cols), len(rows)
    r, c = np.meshgrid(np.arange(height - 1), np.arange(width - 1), indexing="ij")
    cx = np.stack([c + 1 / 3, c + 2 / 3], -1).ravel()  # interleaved like the faces
    cy = np.stack([r + 1 / 3, r + 2 / 3], -1).ravel()
    j = np.clip(np.searchsorted(cols, cx, side="right") - 1, 0, wp - 2)
    i = np.clip(np.searchsorted(rows, cy, side="right") - 1, 0, hp - 2)
    u = (cx - cols[j]) / (cols[j + 1] - cols[j])
    v = (cy - rows[i]) / (rows[i + 1] - rows[i])
    owner = 2 * (i * (wp - 1) + j) + (u + v >= 1.0)
    n_quad = 2 * (hp - 1) * (wp - 1)
    return np.concatenate([owner, [n_quad, n_quad + 1]]).astype(np.int64)


def proxy_occlusion(occlusion: np.ndarray, owner: np.ndarray, n_proxy_faces: int) -> np.ndarray:
    """(T, Fp) uint8 {0, 1}: 1 where any full face (``occlusion`` (T, F), nonzero = occlusion) the proxy face
    covers is an occlusion face."""
    occ = np.asarray(occlusion).reshape(len(occlusion), -1) != 0
    out = np.zeros((len(occ), n_proxy_faces), dtype=np.uint8)
    for t, flags in enumerate(occ):
        out[t] = np.bincount(owner[flags], minlength=n_proxy_faces) > 0
    return out
