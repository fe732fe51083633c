"""Depth adjustments before meshing: ``depth' = clip(scale * depth + offset, near, far)``.

A small pure core shared by the CLI, the service and the farm (they all reach it through the depth
stage's ``adjust`` params, ``pipeline.depth_adjust``), so the add-on only sends raw values.

Units: the backend's depth units (distance along the optical axis, z). ``near`` / ``far`` None: no clip on
that side (the reference's range ``[1e-4, 1e4]`` always applies). Clipping changes the DW-mesh: a vertex is
its pixel's ray ``K^-1 [u, v, 1]`` times its depth, so a clipped pixel moves along its own ray onto the
plane ``z = near`` or ``z = far``; a clipped background becomes one flat wall, and depth edges that fall
entirely beyond ``far`` (or before ``near``) vanish, so no occlusion faces are made there.
"""

from __future__ import annotations

import math

import numpy as np

from .depth_io import DEPTH_MAX, DEPTH_MIN
from .errors import Ex4dError

INVALID_REQUEST = "invalid_request"  # protocol error code (service.protocol.INVALID_REQUEST)
ADJUST_FIELDS = ("scale", "offset", "near", "far")
IDENTITY = {"scale": 1.0, "offset": 0.0, "near": None, "far": None}


def normalized(adjust: dict | None, where: str = "params.depth.adjust") -> dict:
    """The four fields (``IDENTITY`` filled in), checked: scale > 0, all finite, 0 < near < far."""
    a = {**IDENTITY, **{k: v for k, v in (adjust or {}).items() if v is not None}}
    unknown = sorted(set(a) - set(ADJUST_FIELDS))
    if unknown:
        raise Ex4dError(f"unknown depth adjustment {unknown}", where=where, hint="use scale, offset, near, far",
                        code=INVALID_REQUEST)  # fmt: skip
    values = {k: v for k, v in a.items() if v is not None}
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values.values()):
        raise Ex4dError(f"depth adjustments must be finite numbers, got {values}", where=where, code=INVALID_REQUEST)
    if not a["scale"] > 0:
        raise Ex4dError(f"depth scale must be positive, got {a['scale']}", where=f"{where}.scale", code=INVALID_REQUEST)
    if a["near"] is not None and not a["near"] > 0:
        raise Ex4dError(f"near clip must be positive, got {a['near']}", where=f"{where}.near", code=INVALID_REQUEST)
    if a["near"] is not None and a["far"] is not None and not a["near"] < a["far"]:
        raise Ex4dError(
            f"near clip {a['near']} must be less than far clip {a['far']}", where=where, code=INVALID_REQUEST
        )
    out = {k: (None if a[k] is None else float(a[k])) for k in ADJUST_FIELDS}
    return out


def is_identity(adjust: dict | None) -> bool:
    return normalized(adjust) == IDENTITY


def adjust_depth(depth: np.ndarray, adjust: dict | None) -> np.ndarray:
    """(T, H, W) depth -> (T, H, W) float32 ``clip(scale * depth + offset, near, far)``, also clipped to the
    reference's range [1e-4, 1e4] (a negative result becomes 1e-4: set ``near`` to say where instead)."""
    a = normalized(adjust)
    lo = DEPTH_MIN if a["near"] is None else max(a["near"], DEPTH_MIN)
    hi = DEPTH_MAX if a["far"] is None else min(a["far"], DEPTH_MAX)
    out = np.asarray(depth, dtype=np.float64) * a["scale"] + a["offset"]
    return np.clip(out, lo, hi).astype(np.float32)
