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
    second_eye: str = "independent"  # or "reuse_first": the right eye conditioned on the left eye's result

    @classmethod
    def from_params(cls, p: dict) -> StereoSettings | None:
        s = p.get("stereo")
        if s is None:
            return None
        return cls(float(s["interocular"]), float(s.get("convergence", 1.95)), s.get("mode", "OFFAXIS"),
                   s.get("pivot", "CENTER"), s.get("second_eye", "independent"))  # fmt: skip


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


# ----------------------------------------------------------------------------------------------
# The second eye conditioned on the first eye's result (the idea; ``stereo.second_eye``)
# ----------------------------------------------------------------------------------------------
def warp_to_eye(
    colour: np.ndarray, z: np.ndarray, k_from: np.ndarray, e_from: np.ndarray, k_to: np.ndarray, e_to: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Forward-warp one eye's frame into the other eye: ``colour`` (H, W, 3) uint8 with its novel-camera Z
    (H, W) world units (``passes``: Z_EMPTY where nothing is) seen by (``k_from`` (3, 3), ``e_from`` (4, 4)
    world-to-camera) -> (colour (H, W, 3) uint8, hit (H, W) bool) in the camera (``k_to``, ``e_to``). Pixel
    (i, j) is the point at its centre (i + 0.5, j + 0.5), as the rasteriser samples; the nearest point wins
    where several land on one pixel (a z-buffer)."""
    from ..passes import Z_EMPTY

    h, w = z.shape
    jj, ii = np.mgrid[0:h, 0:w]
    ok = z < Z_EMPTY * 0.5
    zz = z[ok].astype(np.float64)
    uv1 = np.stack([ii[ok] + 0.5, jj[ok] + 0.5, np.ones_like(zz)], 0)
    cam = np.linalg.inv(k_from) @ uv1 * zz  # (3, N) in the first eye's camera
    rel = e_to @ np.linalg.inv(e_from)  # first eye's camera -> second eye's camera
    p = rel[:3, :3] @ cam + rel[:3, 3:4]
    front = p[2] > 1e-6
    proj = k_to @ p[:, front]
    u, v = np.floor(proj[0] / proj[2]).astype(np.int64), np.floor(proj[1] / proj[2]).astype(np.int64)
    inside = (u >= 0) & (u < w) & (v >= 0) & (v < h)
    src = np.flatnonzero(ok.ravel())[front][inside]
    dst = v[inside] * w + u[inside]
    depth = p[2, front][inside]
    order = np.argsort(-depth)  # far first: the nearest point is written last and wins
    out = np.zeros((h * w, 3), np.uint8)
    hit = np.zeros(h * w, bool)
    out[dst[order]] = colour.reshape(-1, 3)[src[order]]
    hit[dst[order]] = True
    return out.reshape(h, w, 3), hit.reshape(h, w)


def reuse_first_eye(
    ctx: stages.Context,
    shot: stages.Shot,
    first: Eye,
    first_gen: stages.GenerateEntry,
    second: Eye,
    render: RenderSettings,
) -> stages.GuideEntry:
    """The second eye's guide with the first eye's RESULT warped into it where the second guide is unseen
    (mask 0) and the warp lands (those pixels become seen, mask 255): the generator then keeps what the first
    eye made there, so both eyes show the same invented content. Frames the first eye did not generate stay
    as they are. The first result is resized to the guide size; its depth is the first eye's Z pass from
    the DW-mesh (occlusion sheets where it invented content). Key: both inputs' keys."""
    import cv2

    from .guide import Guide
    from .guide_files import write_guide_files

    color, mask = (a.copy() for a in second.guide.arrays())
    z = _passes(shot, first.camera, first.guide, render).z
    frames = read_png_folder(first_gen.dir / "frames", 3)
    h, w = mask.shape[1:]
    cf, cs = first.camera.path, second.camera.path
    filled = 0
    done: set[int] = set()
    for j, t in enumerate(first_gen.meta["source_frames"]):
        if t in done or j >= len(frames):
            continue
        done.add(t)
        img = (
            cv2.resize(frames[j], (w, h), interpolation=cv2.INTER_AREA) if frames[j].shape[:2] != (h, w) else frames[j]
        )
        warped, hit = warp_to_eye(img, z[t], cf.intrinsics[t], cf.extrinsics[t], cs.intrinsics[t], cs.extrinsics[t])
        fill = hit & (mask[t] == 0)
        color[t][fill] = warped[fill]
        mask[t][fill] = 255
        filled += int(fill.sum())
    meta = {**second.guide.meta, "reused_first_eye": first_gen.key, "reused_pixels": filled}
    key = make_key(stages.STAGE_VERSION, "guide_second_eye", second.guide.key, first_gen.key)
    with stages._locked(ctx, "guide", key):  # a guide entry of its own: the generate stage reads its PNG folders
        if stages._lookup(ctx, "guide", key) is None:
            with ctx.store.write_stage("guide", key, meta) as tmp:
                write_guide_files(tmp, color, mask, cs)
    return stages.GuideEntry(key, ctx.store.stage_dir("guide", key), meta, Guide(color, mask, cs))
