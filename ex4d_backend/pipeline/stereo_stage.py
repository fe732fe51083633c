"""Stereo eyes, side-by-side frames and EXR compositing passes as cached stages (issue 18).

Steps the service's ``render_guide`` / ``generate`` take when asked (``service.jobs``):

1. ``eye_guides``: the novel camera's two eyes (``stereo.eye_cameras``, Blender's camera.stereo settings
   sent raw: interocular, convergence, mode, pivot) through the same camera and guide stages as the centre
   camera: one DW-mesh (the guide stage re-meshes the same depth), two guides;
2. ``sbs_stage``: left | right frames side by side (``stereo.side_by_side``) as ``frames/`` PNGs and
   ``video.mp4``; key = both inputs' keys;
3. ``exr_stage``: the guide's colour, its mask as alpha and the novel view's Z from the DW-mesh
   (``passes.recon_passes``) as ``exr/frame_00000.exr`` ...; key = the guide's key.

Each stage writes atomically through ``JobStore.write_stage`` and is reused by key like every other stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import Ex4dError
from ..service.jobstore import make_key
from . import stages
from .guide_files import read_png_folder
from .settings import RenderSettings

EYES = ("left", "right")


@dataclass(frozen=True)
class StereoSettings:
    """Blender's ``camera.data.stereo`` values (scene units; mode OFFAXIS | PARALLEL | TOE, pivot CENTER |
    LEFT | RIGHT)."""

    interocular: float
    convergence: float = 1.95
    mode: str = "OFFAXIS"
    pivot: str = "CENTER"

    @classmethod
    def from_params(cls, p: dict) -> StereoSettings | None:
        s = p.get("stereo")
        if s is None:
            return None
        return cls(float(s["interocular"]), float(s.get("convergence", 1.95)), s.get("mode", "OFFAXIS"),
                   s.get("pivot", "CENTER"))  # fmt: skip


@dataclass
class Eye:
    camera: stages.CameraEntry
    guide: stages.GuideEntry


def eye_guides(ctx: stages.Context, shot: stages.Shot, s: StereoSettings, render: RenderSettings) -> dict[str, Eye]:
    """{"left": Eye, "right": Eye}: each eye's camera path and guide, from ``shot``'s centre camera."""
    from ..stereo import eye_cameras

    paths = eye_cameras(shot.camera.path, s.interocular, s.convergence, s.mode, s.pivot)
    out = {}
    for eye, path in zip(EYES, paths, strict=True):
        cam = stages.camera_stage(ctx, shot.clip, shot.depth, shot.k, path, shot.mesh, source=shot.source)
        out[eye] = Eye(cam, stages.guide_stage(ctx, shot.clip, shot.depth, shot.k, cam, shot.mesh, render, shot.source))
    return out


@dataclass
class Entry:
    key: str
    dir: Path
    meta: dict


def sbs_stage(ctx: stages.Context, what: str, left: Path, right: Path, keys: tuple[str, str], fps: float) -> Entry:
    """PNG folders ``left`` and ``right`` (same size and count) -> ``frames/`` and ``video.mp4`` side by side.
    ``keys``: the two inputs' stage keys (the result's key); ``what``: "guide" or "generate" (in the meta)."""
    from ..footage import write_png_sequence, write_video
    from ..stereo import side_by_side

    key = make_key(stages.STAGE_VERSION, "sbs", what, *keys)
    with stages._locked(ctx, "sbs", key):
        meta = stages._lookup(ctx, "sbs", key)
        cached = meta is not None
        if meta is None:
            ctx.progress("sbs", 0, 1, "left | right")
            frames = side_by_side(read_png_folder(left, 3), read_png_folder(right, 3))
            meta = {"what": what, "inputs": list(keys), "n_frames": len(frames), "width": frames.shape[2],
                    "height": frames.shape[1], "fps": fps}  # fmt: skip
            with ctx.store.write_stage("sbs", key, meta) as tmp:
                write_png_sequence(tmp / "frames", frames)
                write_video(tmp / "video.mp4", frames, fps)
            ctx.progress("sbs", 1, 1, "done")
    stages._reused(ctx, "sbs", key, cached)
    return Entry(key, ctx.store.stage_dir("sbs", key), meta)


def _passes(shot: stages.Shot, camera: stages.CameraEntry, guide: stages.GuideEntry, render: RenderSettings):
    from ..passes import recon_passes

    src = shot.source
    return recon_passes(
        shot.clip.frames, shot.depth.depth, camera.path, src.k, source=src.path, depth_scale=src.scales,
        renderer=guide.meta.get("renderer", render.renderer), mesh_filter=shot.mesh.mesh_filter,
        border_depth=shot.mesh.border_depth,
    )  # fmt: skip


def nearest_resize(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """(T, H, W, ...) -> (T, height, width, ...) by nearest pixel centres (no blending: right for a mask
    and for depth, where averaging across an edge would invent a surface)."""
    t, h, w = a.shape[:3]
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.int64), w - 1)
    return a[:, rows][:, :, cols]


def exr_stage(
    ctx: stages.Context,
    shot: stages.Shot,
    camera: stages.CameraEntry,
    guide: stages.GuideEntry,
    render: RenderSettings,
    result: tuple[stages.GenerateEntry, np.ndarray] | None = None,
) -> Entry:
    """The compositing passes of ``guide`` (its camera ``camera``): ``exr/frame_00000.exr`` ... (R, G, B
    linear half, A = the guide mask, Z float32 = the novel camera's depth of the DW-mesh, world units).
    With ``result`` (a generate entry and its frames (N, h, w, 3) uint8): the generated colour instead, on
    the generated frames (``source_frames``) at their size, the mask and Z resized to it (nearest)."""
    from ..passes import Passes, write_exr_sequence

    parts = [guide.key] if result is None else [guide.key, result[0].key]
    key = make_key(stages.STAGE_VERSION, "exr", *parts)
    with stages._locked(ctx, "exr", key):
        meta = stages._lookup(ctx, "exr", key)
        cached = meta is not None
        if meta is None:
            ctx.progress("exr", 0, 1, "colour, mask and Z")
            ps = _passes(shot, camera, guide, render)
            if result is not None:
                gen, frames = result
                idx = np.asarray(gen.meta["source_frames"], dtype=np.int64)
                h2, w2 = frames.shape[1:3]
                ps = Passes(np.asarray(frames), nearest_resize(ps.mask[idx], h2, w2), nearest_resize(ps.z[idx], h2, w2))
            t, h, w = ps.mask.shape
            meta = {"shot": shot.clip.key, "guide": guide.key, "camera_hash": guide.meta["camera_hash"],
                    "colour": "guide" if result is None else "generate", "n_frames": t, "width": w, "height": h,
                    "fps": shot.clip.fps, "channels": ["R", "G", "B", "A", "Z"]}  # fmt: skip
            with ctx.store.write_stage("exr", key, meta) as tmp:
                write_exr_sequence(tmp / "exr", ps)
            ctx.progress("exr", 1, 1, "done")
    stages._reused(ctx, "exr", key, cached)
    return Entry(key, ctx.store.stage_dir("exr", key), meta)


def check_eye(p: dict) -> str | None:
    """The ``eye`` of a generate request; it needs ``stereo``."""
    eye = p.get("eye")
    if eye is not None and p.get("stereo") is None:
        raise Ex4dError(
            f"params.eye '{eye}' needs params.stereo (the eyes' interocular and convergence)",
            where="params.eye",
            hint="send the novel camera's stereo settings with it",
            code=stages.INVALID_REQUEST,
        )
    return eye
