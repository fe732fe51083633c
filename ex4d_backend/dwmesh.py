"""The depth watertight mesh (DW-mesh), built for every frame, batched over frames (torch).

Reference construction (EX4D_REFERENCE.md, "DW-mesh"):
1. the outer one-pixel ring of each depth map is set to ``border_depth`` (100);
2. one vertex per pixel at ``depth * ray``, ray = ((u - cx)/fx, (v - cy)/fy, 1), OpenCV world;
3. each pixel quad (r, c) with corners a=(r,c), b=(r,c+1), c=(r+1,c), d=(r+1,c+1) gives triangles
   (c, a, b) and (c, b, d) (stored interleaved: face 2q and 2q+1 of quad q = r*(W-1)+c), plus two closing
   triangles across the image corners: (W-1, 0, H*W-1) and (H*W-1, 0, (H-1)*W);
4. "invalid" (occlusion) faces: filter ``angle`` (smallest interior angle in 3D below 2.5 degrees) or
   ``boundary`` (z-extent / max(x-extent, y-extent) > 2). They are kept (they still occlude: that makes
   the mesh watertight), and their vertices get alpha 0;
5. vertex colours = source RGB, alpha 255 (0 on invalid faces' vertices).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_path
from .constants import BORDER_DEPTH, MESH_FILTER
from .errors import Ex4dError

ANGLE_THRESHOLD_DEG = 2.5
BOUNDARY_RATIO = 2.0
FILTERS = ("angle", "boundary")


@dataclass
class DWMesh:
    """DW-meshes of T frames sharing one pixel-grid topology."""

    vertices: torch.Tensor  # (T, H*W, 3) float32, OpenCV world coordinates
    faces: torch.Tensor  # (F, 3) int64 vertex indices, F = 2 (H-1)(W-1) + 2
    invalid: torch.Tensor  # (T, F) bool: occlusion faces
    colors: torch.Tensor  # (T, H*W, 4) uint8 RGBA, alpha 0 on invalid faces' vertices
    height: int
    width: int

    def __len__(self) -> int:
        return self.vertices.shape[0]


def grid_faces(height: int, width: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(F, 3) int64 faces of the reference triangulation (see the module docstring)."""
    idx = torch.arange(height * width, device=device).view(height, width)
    a, b = idx[:-1, :-1], idx[:-1, 1:]
    c, d = idx[1:, :-1], idx[1:, 1:]
    quads = torch.stack([torch.stack([c, a, b], -1), torch.stack([c, b, d], -1)], dim=2)  # (H-1, W-1, 2, 3)
    closing = torch.tensor(
        [[width - 1, 0, height * width - 1], [height * width - 1, 0, (height - 1) * width]], device=device
    )
    return torch.cat([quads.reshape(-1, 3), closing])


def pixel_rays(height: int, width: int, k: torch.Tensor) -> torch.Tensor:
    """(H, W, 3) rays ((u - cx)/fx, (v - cy)/fy, 1) for integer pixel coordinates u = column, v = row;
    (T, H, W, 3) for per-frame intrinsics k (T, 3, 3)."""
    k = k.to(torch.float64)
    v, u = torch.meshgrid(
        torch.arange(height, dtype=torch.float64, device=k.device),
        torch.arange(width, dtype=torch.float64, device=k.device),
        indexing="ij",
    )
    kk = k.reshape(-1, 3, 3)[:, :, :, None, None]  # (T, 3, 3, 1, 1)
    rays = torch.stack(
        [
            (u - kk[:, 0, 2]) / kk[:, 0, 0],
            (v - kk[:, 1, 2]) / kk[:, 1, 1],
            torch.ones_like(u).expand_as(kk[:, 0, 0] * u),
        ],
        -1,
    )
    return rays[0] if k.ndim == 2 else rays


def set_border(depth: torch.Tensor, border_depth: float = BORDER_DEPTH) -> torch.Tensor:
    """A copy of (T, H, W) depth with its outer one-pixel ring set to ``border_depth``."""
    d = depth.clone()
    d[:, 0, :] = border_depth
    d[:, -1, :] = border_depth
    d[:, :, 0] = border_depth
    d[:, :, -1] = border_depth
    return d


def _small_angle(dot: torch.Tensor, len2_a: torch.Tensor, len2_b: torch.Tensor, cos_t: float) -> torch.Tensor:
    """True where the angle between two edges (given their dot product and squared lengths) is below the
    threshold whose cosine is ``cos_t``: cos > cos_t  <=>  dot > 0 and dot^2 > cos_t^2 |a|^2 |b|^2.
    Degenerate (zero-length) edges give False, as the reference's arccos (NaN) test does."""
    return (dot > 0) & (dot * dot > (cos_t * cos_t) * len2_a * len2_b)


def _dot(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _neg(a: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(-x for x in a)


def _angle_filter_quads(g: torch.Tensor, threshold_deg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Small-angle flags of the (c, a, b) and (c, b, d) faces of every quad, each (T, H-1, W-1).

    Works on the pixel grid's edges, each computed once: horizontal h = (r, c+1) - (r, c), vertical
    v = (r+1, c) - (r, c) and diagonal q = b - c = (r, c+1) - (r+1, c)."""
    cos_t = math.cos(math.radians(threshold_deg))
    p = g.permute(3, 0, 1, 2).contiguous()  # (3, T, H, W): one contiguous plane per coordinate
    h = tuple(x[:, :, 1:] - x[:, :, :-1] for x in p)  # (T, H, W-1)
    v = tuple(x[:, 1:, :] - x[:, :-1, :] for x in p)  # (T, H-1, W)
    q = tuple(x[:, :-1, 1:] - x[:, 1:, :-1] for x in p)  # (T, H-1, W-1)
    lh, lv, lq = _dot(h, h), _dot(v, v), _dot(q, q)
    h_top, h_bot = tuple(x[:, :-1] for x in h), tuple(x[:, 1:] for x in h)
    v_left, v_right = tuple(x[:, :, :-1] for x in v), tuple(x[:, :, 1:] for x in v)
    lh_top, lh_bot, lv_left, lv_right = lh[:, :-1], lh[:, 1:], lv[:, :, :-1], lv[:, :, 1:]
    # Face (c, a, b): corner c between a-c = -v_left and b-c = q; corner a between v_left and h_top;
    # corner b between -q and -h_top.
    face_a = _small_angle(_dot(_neg(v_left), q), lv_left, lq, cos_t)
    face_a |= _small_angle(_dot(v_left, h_top), lv_left, lh_top, cos_t)
    face_a |= _small_angle(_dot(q, h_top), lq, lh_top, cos_t)
    # Face (c, b, d): corner c between q and h_bot; corner b between -q and v_right; corner d between
    # -h_bot and -v_right.
    face_b = _small_angle(_dot(q, h_bot), lq, lh_bot, cos_t)
    face_b |= _small_angle(_dot(_neg(q), v_right), lq, lv_right, cos_t)
    face_b |= _small_angle(_dot(h_bot, v_right), lh_bot, lv_right, cos_t)
    return face_a, face_b


def _min_angle_below(p0: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, threshold_deg: float) -> torch.Tensor:
    """True where the triangle (p0, p1, p2) (..., 3) has an interior angle below ``threshold_deg``."""
    cos_t = math.cos(math.radians(threshold_deg))
    e01, e02, e12 = p1 - p0, p2 - p0, p2 - p1
    l01, l02, l12 = (e01 * e01).sum(-1), (e02 * e02).sum(-1), (e12 * e12).sum(-1)
    return (
        _small_angle((e01 * e02).sum(-1), l01, l02, cos_t)
        | _small_angle(-(e01 * e12).sum(-1), l01, l12, cos_t)
        | _small_angle((e02 * e12).sum(-1), l02, l12, cos_t)
    )


def _boundary(p0: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, ratio: float) -> torch.Tensor:
    """True where z-extent / max(x-extent, y-extent) > ``ratio`` for the triangle (p0, p1, p2)."""
    pts = torch.stack([p0, p1, p2], -1)  # (..., 3 coords, 3 vertices)
    ext = pts.amax(-1) - pts.amin(-1)
    return ext[..., 2] > ratio * torch.maximum(ext[..., 0], ext[..., 1])


def face_invalid(
    vertices: torch.Tensor, height: int, width: int, faces: torch.Tensor, mesh_filter: str = MESH_FILTER
) -> torch.Tensor:
    """(T, F) bool occlusion flags of the reference triangulation, from (T, H*W, 3) vertices.

    Quad faces are evaluated on the pixel grid (no gather), the two closing faces by index."""
    t = vertices.shape[0]
    g = vertices.view(t, height, width, 3)
    if mesh_filter == "angle":
        face_a, face_b = _angle_filter_quads(g, ANGLE_THRESHOLD_DEG)
        test = lambda p0, p1, p2: _min_angle_below(p0, p1, p2, ANGLE_THRESHOLD_DEG)  # noqa: E731
    elif mesh_filter == "boundary":
        a, b, c, d = g[:, :-1, :-1], g[:, :-1, 1:], g[:, 1:, :-1], g[:, 1:, 1:]
        face_a, face_b = _boundary(c, a, b, BOUNDARY_RATIO), _boundary(c, b, d, BOUNDARY_RATIO)
        test = lambda p0, p1, p2: _boundary(p0, p1, p2, BOUNDARY_RATIO)  # noqa: E731
    else:
        raise Ex4dError(f"unknown mesh filter '{mesh_filter}'", where="--mesh-filter", hint="use angle or boundary")
    quad = torch.stack([face_a, face_b], dim=-1).view(t, -1)  # interleaved like grid_faces
    closing = vertices[:, faces[-2:]]  # (T, 2, 3, 3)
    close = test(closing[..., 0, :], closing[..., 1, :], closing[..., 2, :])
    return torch.cat([quad, close], dim=1)


def vertex_invalid(invalid: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(T, H*W) bool: vertices that belong to at least one invalid face (OR over the grid neighbours)."""
    t = invalid.shape[0]
    quad = invalid[:, :-2].view(t, height - 1, width - 1, 2)
    ia, ib = quad[..., 0], quad[..., 1]  # (c, a, b) and (c, b, d) faces of each quad
    v = torch.zeros(t, height, width, dtype=torch.bool, device=invalid.device)
    v[:, :-1, :-1] |= ia  # a
    v[:, :-1, 1:] |= ia | ib  # b
    v[:, 1:, :-1] |= ia | ib  # c
    v[:, 1:, 1:] |= ib  # d
    v = v.view(t, -1)
    corners = torch.tensor([width - 1, 0, height * width - 1, (height - 1) * width], device=invalid.device)
    ci = invalid[:, -2:]
    v[:, corners[[0, 1, 2]]] |= ci[:, :1]
    v[:, corners[[2, 1, 3]]] |= ci[:, 1:]
    return v


def build_dwmesh(
    depth: torch.Tensor | np.ndarray,
    k: torch.Tensor | np.ndarray,
    colors: torch.Tensor | np.ndarray,
    *,
    mesh_filter: str = MESH_FILTER,
    border_depth: float = BORDER_DEPTH,
    device: torch.device | str | None = None,
) -> DWMesh:
    """DW-meshes for every frame.

    Args:
        depth: (T, H, W) depth along the optical axis (z), scene units.
        k: (3, 3) intrinsics in pixels, or (T, 3, 3) per frame (a zooming source camera).
        colors: (T, H, W, 3) uint8 RGB source frames.
        mesh_filter: "angle" (reference default) or "boundary".
        border_depth: depth given to the outer pixel ring (reference: 100).
        device: torch device (default: the depth tensor's, or CPU for numpy input).
    """
    depth = torch.as_tensor(depth, device=device)
    dev = depth.device
    colors = torch.as_tensor(colors, device=dev)
    k = torch.as_tensor(np.asarray(k, dtype=np.float64) if not torch.is_tensor(k) else k, device=dev)
    if depth.ndim != 3:
        raise Ex4dError(f"depth must have shape (T, H, W), got {tuple(depth.shape)}")
    t, h, w = depth.shape
    if h < 2 or w < 2:
        raise Ex4dError(f"depth of {w}x{h} pixels is too small for a mesh")
    if tuple(colors.shape) != (t, h, w, 3):
        raise Ex4dError(f"colours {tuple(colors.shape)} do not match depth {tuple(depth.shape)}")
    d = set_border(depth.to(torch.float32), border_depth)
    if tuple(k.shape) not in ((3, 3), (t, 3, 3)):
        raise Ex4dError(f"intrinsics must be (3, 3) or ({t}, 3, 3), got {tuple(k.shape)}")
    rays = pixel_rays(h, w, k).to(torch.float32).view(-1, h * w, 3)
    vertices = d.view(t, h * w, 1) * rays
    faces = grid_faces(h, w, dev)
    invalid = face_invalid(vertices, h, w, faces, mesh_filter)
    alpha = (~vertex_invalid(invalid, h, w)).to(torch.uint8) * 255
    rgba = torch.cat([colors.reshape(t, h * w, 3).to(torch.uint8), alpha.unsqueeze(-1)], dim=-1)
    return DWMesh(vertices, faces, invalid, rgba, h, w)


def write_ply(path: str | os.PathLike, mesh: DWMesh, t: int = 0) -> Path:
    """Binary PLY of frame ``t``: vertices (x, y, z float, OpenCV world; red, green, blue, alpha uchar) and
    faces (vertex_indices, plus an ``occluded`` uchar flag: 1 for invalid/occlusion faces)."""
    verts = mesh.vertices[t].detach().cpu().numpy().astype("<f4")
    cols = mesh.colors[t].detach().cpu().numpy()
    faces = mesh.faces.detach().cpu().numpy().astype("<i4")
    occl = mesh.invalid[t].detach().cpu().numpy().astype(np.uint8)
    vdt = np.dtype(
        [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1"), ("alpha", "u1")]
    )
    vrec = np.empty(len(verts), vdt)
    for i, name in enumerate("xyz"):
        vrec[name] = verts[:, i]
    for i, name in enumerate(("red", "green", "blue", "alpha")):
        vrec[name] = cols[:, i]
    fdt = np.dtype([("n", "u1"), ("v", "<i4", (3,)), ("occluded", "u1")])
    frec = np.empty(len(faces), fdt)
    frec["n"], frec["v"], frec["occluded"] = 3, faces, occl
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        "comment EX-4D DW-mesh, OpenCV world (x right, y down, z forward), source frame 0 camera at origin\n"
        f"comment frame {t}\n"
        f"element vertex {len(verts)}\n"
        "property float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\nproperty uchar alpha\n"
        f"element face {len(faces)}\n"
        "property list uchar int vertex_indices\nproperty uchar occluded\nend_header\n"
    )
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(header.encode("ascii"))
            fh.write(vrec.tobytes())
            fh.write(frec.tobytes())
    return Path(path)


def read_ply(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read a PLY written by :func:`write_ply`: (vertices (V,3), colors (V,4), faces (F,3), occluded (F,))."""
    data = Path(path).read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    nv = int(next(line.split()[2] for line in header if line.startswith("element vertex")))
    nf = int(next(line.split()[2] for line in header if line.startswith("element face")))
    vdt = np.dtype(
        [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1"), ("alpha", "u1")]
    )
    fdt = np.dtype([("n", "u1"), ("v", "<i4", (3,)), ("occluded", "u1")])
    v = np.frombuffer(data, vdt, nv, end)
    f = np.frombuffer(data, fdt, nf, end + nv * vdt.itemsize)
    verts = np.stack([v["x"], v["y"], v["z"]], 1)
    cols = np.stack([v["red"], v["green"], v["blue"], v["alpha"]], 1)
    return verts, cols, f["v"].copy(), f["occluded"].copy()
