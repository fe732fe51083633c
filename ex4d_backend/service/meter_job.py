"""The ``meter`` request: the disocclusion meter (``meter.masked_share``) for one novel camera, on the cached stages.

1. frames, depth and the source camera come from the store (``stages.source_for_shot``: a camera change reuses
   them), the camera spec is resolved and checked like render_guide's (``stages.camera_stage``);
2. the meter's own cache entry ``cache/meter-<key>/meta.json`` holds the per-frame shares, keyed by the depth,
   K, mesh settings, camera hash, renderer and source (as the guide's key), so a repeated camera is a hit even
   when it is sent another way (a Blender camera and the same matrices as OpenCV);
3. the result: ``masked_share`` (T,) in 0..1, the worst frame and share, and the camera hash (the guide's).
"""

from __future__ import annotations

import numpy as np

from ..pipeline import stages
from ..pipeline.settings import DepthSettings, FrameSettings, IntrinsicsSettings, MeshSettings, SourceSettings
from ..pipeline.stages import STAGE_VERSION, Context, _locked, _lookup, _mesh_key, _reused
from .jobstore import make_key

STAGE = "meter"
METER_VERSION = 1  # bump when meter.masked_share's results change


def meter_summary(share: np.ndarray | list[float]) -> dict:
    """``{"masked_share": [...], "worst_frame": t, "worst_share": x}`` for (T,) shares (0-based frame;
    the first worst frame on a tie)."""
    s = [round(float(v), 6) for v in np.asarray(share, dtype=np.float64).ravel()]
    worst = int(np.argmax(s)) if s else 0
    return {"masked_share": s, "worst_frame": worst, "worst_share": s[worst] if s else 0.0}


def meter_stage(ctx: Context, p: dict) -> tuple[dict, str]:
    """Steps 1 and 2 of the module docstring: (the stage meta (``masked_share``, ``camera_hash``), the
    camera's name in this request)."""
    from .. import meter
    from ..pipeline.camera import camera_hash
    from ..render import resolve_renderer

    mesh = MeshSettings.from_params(p)
    src = stages.source_for_shot(
        ctx, p["footage"], FrameSettings.from_params(p), DepthSettings.from_params(p["depth"]),
        IntrinsicsSettings.from_params(p), SourceSettings.from_params(p),
    )  # fmt: skip
    clip, depth, setup = src.clip, src.depth, src.setup
    cam = stages.camera_stage(ctx, clip, depth, setup.k, p["camera"], mesh, source=setup)
    backend = resolve_renderer(p.get("renderer", "auto"))
    key = make_key(
        STAGE_VERSION, STAGE, METER_VERSION, *_mesh_key(depth, setup.k, mesh), cam.key, backend, *setup.key_parts()
    )
    with _locked(ctx, STAGE, key):
        meta = _lookup(ctx, STAGE, key)
        cached = meta is not None
        if meta is None:
            t, h, w = depth.depth.shape
            ctx.progress(STAGE, 0, 1, f"unseen share of {t} frames ({w}x{h}, 1/{meter.meter_step(w, h)} size)")
            share = meter.masked_share(
                np.asarray(depth.depth),
                setup.k,
                cam.path,
                source=setup.path,
                depth_scale=setup.scales,
                mesh_filter=mesh.mesh_filter,
                border_depth=mesh.border_depth,
                renderer=backend,
            )
            meta = {
                "shot": clip.key,
                "camera": cam.path.name,
                "camera_hash": camera_hash(cam.path),
                "renderer": backend,
                **meter_summary(share),
                "n_frames": t,
                "width": w,
                "height": h,
            }
            with ctx.store.write_stage(STAGE, key, meta) as tmp:
                np.save(tmp / "masked_share.npy", np.asarray(share, dtype=np.float64))  # the manifest's one file
            ctx.progress(STAGE, 1, 1, "done")
    _reused(ctx, STAGE, key, cached)
    return meta, cam.path.name


def exec_meter(ctx: Context, p: dict) -> dict:
    meta, name = meter_stage(ctx, p)
    return {
        **meter_summary(meta["masked_share"]),
        "camera_hash": meta["camera_hash"],
        "camera": name,
        "renderer": meta["renderer"],
        "n_frames": meta["n_frames"],
        "width": meta["width"],
        "height": meta["height"],
    }
