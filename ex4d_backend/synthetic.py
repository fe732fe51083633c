"""Procedural footage with exact depth (ray-cast analytically): for ``ex4d demo`` and for tests.

The scene, in the OpenCV world of the static source camera (x right, y down, z forward):
- a back wall, the plane z = ``WALL_Z``, textured with a colour checker;
- a floating card (a fronto-parallel rectangle) at z = ``CARD_Z`` in front of the wall, striped;
- a sphere that moves from left to right over the clip, with latitude/longitude bands.
Colours are functions of the surface point, so any view of the scene has a known answer.
"""

from __future__ import annotations

import numpy as np

from .cameras import reference_intrinsics

WALL_Z = 6.0
CARD_Z = 4.0
CARD_RECT = (-1.4, -0.9, -0.3, 0.2)  # x0, y0, x1, y1 on the plane z = CARD_Z
SPHERE_RADIUS = 0.55
SPHERE_Z = 3.2


def wall_color(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """RGB of the wall at world (x, y): a 0.5-unit checker tinted by position."""
    checker = ((np.floor(x / 0.5) + np.floor(y / 0.5)) % 2).astype(np.float32)
    r = 0.35 + 0.45 * checker
    g = 0.45 + 0.25 * np.clip(0.5 + 0.15 * x, 0, 1)
    b = 0.55 + 0.35 * (1 - checker) * np.clip(0.5 - 0.15 * y, 0, 1)
    return np.stack([r, g, b], -1)


def card_color(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    stripes = (np.floor((x + y) / 0.15) % 2).astype(np.float32)
    return np.stack([0.95 * np.ones_like(x), 0.55 + 0.4 * stripes, 0.1 + 0.1 * stripes], -1)


def sphere_color(n: np.ndarray) -> np.ndarray:
    """RGB from the sphere's unit normal (bands in latitude and longitude)."""
    lat = np.arcsin(np.clip(-n[..., 1], -1, 1))
    lon = np.arctan2(n[..., 0], -n[..., 2])
    band = ((np.floor(lat / 0.35) + np.floor(lon / 0.5)) % 2).astype(np.float32)
    return np.stack([0.1 + 0.2 * band, 0.5 + 0.4 * band, 0.95 - 0.3 * band], -1)


def sphere_center(t: int, n_frames: int) -> np.ndarray:
    s = t / max(1, n_frames - 1)
    return np.array([-0.9 + 1.8 * s, 0.35, SPHERE_Z])


def make_scene(
    width: int = 256, height: int = 192, n_frames: int = 9, k: np.ndarray | None = None, with_sphere: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frames (T, H, W, 3) uint8, depth (T, H, W) float32 (z, scene units) and K (3, 3).

    Pixel (u, v) integer coordinates are sampled exactly as the DW-mesh places its vertices."""
    k = reference_intrinsics(width, height) if k is None else np.asarray(k, dtype=np.float64)
    v, u = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    rx, ry = (u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1]
    rays = np.stack([rx, ry, np.ones_like(rx)], -1)
    frames = np.empty((n_frames, height, width, 3), np.uint8)
    depths = np.empty((n_frames, height, width), np.float32)
    # Static part: wall, card in front of it.
    z = np.full((height, width), WALL_Z)
    col = wall_color(rx * WALL_Z, ry * WALL_Z)
    cx, cy = rx * CARD_Z, ry * CARD_Z
    x0, y0, x1, y1 = CARD_RECT
    on_card = (cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1)
    z = np.where(on_card, CARD_Z, z)
    col = np.where(on_card[..., None], card_color(cx, cy), col)
    norm2 = (rays * rays).sum(-1)
    for t in range(n_frames):
        zt, ct = z.copy(), col.copy()
        if with_sphere:
            c = sphere_center(t, n_frames)
            # |s r - c|^2 = R^2 with s the ray parameter (= depth z since r_z = 1).
            b = (rays @ c) / norm2
            disc = b * b - ((c @ c) - SPHERE_RADIUS**2) / norm2
            hit = disc >= 0
            s = b - np.sqrt(np.where(hit, disc, 0))
            hit &= (s > 0) & (s < zt)
            p = rays * s[..., None]
            normal = (p - c) / SPHERE_RADIUS
            zt = np.where(hit, s, zt)
            ct = np.where(hit[..., None], sphere_color(normal), ct)
        depths[t] = zt
        frames[t] = np.clip(ct * 255 + 0.5, 0, 255).astype(np.uint8)
    return frames, depths, k
