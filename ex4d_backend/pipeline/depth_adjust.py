"""The depth stage's adjustments (``ex4d_backend.depth_adjust``) as a cached derived depth entry.

``adjusted(ctx, depth, adjust)`` returns ``depth`` itself for no adjustment (every key stays as before),
else a depth entry ``depth-<key>`` with ``key = hash(the raw depth's key, the adjustments)``: the depth model
is not run again when only the scale, offset or clip changes, and the mesh and guide keys (which hold the
depth key) change with the adjustments.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..depth_adjust import adjust_depth, is_identity, normalized
from ..service.jobstore import make_key


def adjusted(ctx, depth, adjust: dict | None):
    """A ``stages.Depth`` -> the same with ``clip(scale * d + offset, near, far)`` applied (see module doc)."""
    from .stages import STAGE_VERSION, _locked, _lookup, _reused

    a = normalized(adjust)
    if is_identity(a):
        return depth
    key = make_key(STAGE_VERSION, "depth", depth.key, "adjust", a)
    with _locked(ctx, "depth", key):
        meta = _lookup(ctx, "depth", key)
        cached = meta is not None
        if meta is None:
            ctx.progress("depth", 0, 1, "adjusting the depth")
            out = adjust_depth(depth.depth, a)
            meta = {
                **depth.meta,
                "raw_depth": depth.key,
                "adjust": a,
                "depth_min": float(out.min()),
                "depth_max": float(out.max()),
            }
            with ctx.store.write_stage("depth", key, meta) as tmp:
                np.save(tmp / "depth.npy", out)
            del out
            ctx.progress("depth", 1, 1, "adjusted")
    _reused(ctx, "depth", key, cached)
    d = ctx.store.stage_dir("depth", key)
    return dataclasses.replace(depth, key=key, dir=d, depth=np.load(d / "depth.npy", mmap_mode="r"), meta=meta)
