"""The cached stages, in the job store: frames, depth, mesh, camera, guide, generate.

Each stage is a function of explicit inputs (the previous stages' results and its settings dataclass)
whose result lives in ``<store>/cache/<stage>-<key>/``, ``key`` a content hash of everything it depends on::

    frames   footage bytes + FrameSettings
    depth    frames + DepthSettings (the depth file's bytes, or the model and its options)
    mesh     depth + K + MeshSettings                       (the add-on's DW-mesh: positions.pc2, ...)
    camera   the camera path's matrices and intrinsics + size
    guide    depth + K + MeshSettings + camera + renderer + use_dwmesh (+ the source path and depth
             scales, only for a moving source: ``pipeline.source``)
    guide_videos  guide (its two H.264 videos, made only when asked for)
    generate guide + GenerateSettings

so a camera change reuses frames and depth, and ``ex4d recon`` reuses what the service computed (and the
other way round): the same key gives the same folder. Every stage follows the store's lock pattern (one
worker computes a result, the others wait and reuse it) and writes atomically (``JobStore.write_stage``);
each reuse touches the entry's last-use stamp (``housekeeping.touch``) for least-recently-used cleaning.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..cameras import CameraPath
from ..errors import Ex4dError
from ..service.jobstore import JobStore, make_key, preallocated_npy
from ..service.resident import ResidentGenerator, free_memory
from . import housekeeping, resident_clip
from .camera import camera_hash, resolve_camera
from .depth_adjust import adjusted
from .guide_files import GUIDE_FILES, read_png_folder, write_guide_files, write_guide_videos  # noqa: F401
from .hashed_io import save_npy_hashed
from .settings import (
    DepthSettings,
    FrameSettings,
    GenerateSettings,  # noqa: F401 (re-exported)
    IntrinsicsSettings,
    MeshSettings,
    RenderSettings,
    SourceSettings,
)
from .source import SourceSetup, depth_scales, resolve_source

if TYPE_CHECKING:  # torch is imported by the stages that render, never at import (fast service start)
    from .guide import Guide

Progress = Callable[[str, int, int, str], None]
STAGE_VERSION = 3  # bump when a change alters stage results, so stale cache entries are never reused
INVALID_REQUEST = "invalid_request"  # protocol error code (service.protocol.INVALID_REQUEST)


@dataclass
class Context:
    """What a stage may use: the store, a progress callback (may raise ``Cancelled``), settings."""

    store: JobStore
    progress: Progress = lambda *a: None
    models_dir: str | None = None
    request_id: str | None = None
    cached: dict[str, bool] = field(default_factory=dict)  # stage -> reused from the store
    force_stage: str | None = None  # the stage that ``force`` recomputes
    resident: ResidentGenerator = field(default_factory=lambda: ResidentGenerator(0))  # default: load per job
    input_check: Callable[[str | os.PathLike, str], Path] | None = None  # default: the store's sandbox check

    def check_input(self, path: str | os.PathLike, what: str) -> Path:
        """The resolved path of an input (the service: inside the allowed folders, ``JobStore.check_input``)."""
        if self.input_check is not None:
            return self.input_check(path, what)
        return self.store.check_input(path, what)


def local_input(path: str | os.PathLike, what: str) -> Path:
    """The CLI's input check: the path must exist (any folder may be read)."""
    from ..errors import NOT_FOUND

    p = Path(path).expanduser()
    if not p.exists():
        raise Ex4dError(f"{what} not found: {p}", where=str(p), hint="check the path", code=NOT_FOUND)
    return p.resolve()


@contextlib.contextmanager
def _locked(ctx: Context, stage: str, key: str):
    """``store.stage_lock(stage, key)``: one process computes a stage result, the others wait (reporting
    progress, so a cancel stops the wait) and then reuse it."""

    def waiting() -> bool:
        ctx.progress(stage, 0, 1, "waiting for another worker computing it")  # raises Cancelled on a cancel
        return False

    with ctx.store.stage_lock(stage, key, cancelled=waiting):
        yield


def _lookup(ctx: Context, stage: str, key: str) -> dict | None:
    """The stage's meta if it may be reused (present, not forced), else None."""
    if ctx.force_stage == stage:
        return None
    return ctx.store.stage_meta(stage, key)


def _reused(ctx: Context, stage: str, key: str, cached: bool) -> None:
    ctx.cached[stage] = cached
    housekeeping.touch(ctx.store, stage, key)
    if cached:
        ctx.progress(stage, 1, 1, "from the store")


# ----------------------------------------------------------------------------------------------
# 1. frames
# ----------------------------------------------------------------------------------------------
@dataclass
class Clip:
    key: str
    dir: Path
    frames: np.ndarray  # (T, H, W, 3) uint8 (memory-mapped)
    fps: float
    meta: dict

    @property
    def size(self) -> tuple[int, int]:
        return self.frames.shape[2], self.frames.shape[1]

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0])


def frames_stage(ctx: Context, footage: str | os.PathLike, s: FrameSettings) -> Clip:
    """Footage -> the processed frames (``frames.npy``)."""
    path = ctx.check_input(footage, "footage")
    ctx.progress("frames", 0, 1, "hashing the footage")
    key = make_key(STAGE_VERSION, "frames", ctx.store.input_hash(path), s.key())
    with _locked(ctx, "frames", key):
        meta = ctx.store.stage_meta("frames", key)
        cached = meta is not None
        if meta is None:
            from ..footage import read_footage

            ctx.progress("frames", 0, 1, "reading the footage")
            f = read_footage(path, max_frames=s.max_frames or None, max_side=s.max_side, fps=s.fps)
            ctx.progress("frames", 0, 1, "writing the frames")
            meta = {
                **s.key(),
                "shot": key,
                "footage": str(path),
                "fps": f.fps,
                "source_size": list(f.source_size),
                "total_frames": f.total_frames,
                "n_frames": len(f.frames),
                "width": f.size[0],
                "height": f.size[1],
            }
            with ctx.store.write_stage("frames", key, meta) as tmp:
                save_npy_hashed(tmp / "frames.npy", f.frames)  # hashed while written: no re-read
            del f
            ctx.progress("frames", 1, 1, "done")
    _reused(ctx, "frames", key, cached)
    d = ctx.store.stage_dir("frames", key)
    return Clip(key, d, np.load(d / "frames.npy", mmap_mode="r"), float(meta["fps"]), meta)


# ----------------------------------------------------------------------------------------------
# 2. depth
# ----------------------------------------------------------------------------------------------
@dataclass
class Depth:
    key: str
    dir: Path
    depth: np.ndarray  # (T, H, W) float32 (memory-mapped)
    meta: dict


def _depth_source(ctx: Context, s: DepthSettings, clip: Clip) -> tuple[str, list, dict]:
    """(model, what the key holds, the options ``depth.estimate`` takes)."""
    if s.model == "file":
        if s.options:
            raise Ex4dError(
                "depth 'options' do not apply to model 'file'",
                where="params.depth.options",
                hint="use kind, repair and scale",
                code=INVALID_REQUEST,
            )
        if not s.path:
            raise Ex4dError("the 'file' depth provider needs a path", where="--depth", hint="pass the depth file")
        path = ctx.check_input(s.path, "depth file")
        opts = {"kind": s.kind, "repair": bool(s.repair), "scale": float(s.scale)}
        source = ["file", ctx.store.input_hash(path), opts]
        return "file", source, {**opts, "path": str(path), "total_frames": clip.meta["total_frames"]}
    from ..depth import canonical_model

    model = canonical_model(s.model)
    if s.path or s.kind != "depth" or s.repair or s.scale != 1.0:
        raise Ex4dError(
            "depth fields path, kind, repair and scale only apply to model 'file'",
            where="params.depth",
            code=INVALID_REQUEST,
        )
    options = dict(s.options or {})
    return model, [model, options], options


def depth_stage(ctx: Context, clip: Clip, s: DepthSettings) -> Depth:
    """Frames -> depth (``depth.npy``, float32 (T, H, W), scene units) from a file or a depth model."""
    model, source, options = _depth_source(ctx, s, clip)
    key = make_key(STAGE_VERSION, "depth", clip.key, source)
    with _locked(ctx, "depth", key):
        meta = _lookup(ctx, "depth", key)
        cached = meta is not None
        if meta is None:
            ctx.progress("depth", 0, 1, f"depth from {model}")
            depth = _compute_depth(ctx, clip, s, model, options)
            lo, hi = float(depth.min()), float(depth.max())  # NaN propagates: both finite <=> all finite
            if depth.shape != clip.frames.shape[:3] or not (np.isfinite(lo) and np.isfinite(hi)):
                raise Ex4dError(f"the depth has shape {depth.shape}, the frames {clip.frames.shape[:3]}", where="depth")
            meta = {
                "shot": clip.key,
                "model": model,
                "options": {k: v for k, v in options.items() if k != "path"},
                "depth_min": lo,
                "depth_max": hi,
            }
            with ctx.store.write_stage("depth", key, meta) as tmp:
                save_npy_hashed(tmp / "depth.npy", depth)  # hashed while written: no re-read
            del depth
            if model != "file":
                free_memory()  # a depth model ran: collect it and hand its VRAM back (a file needs neither)
            ctx.progress("depth", 1, 1, "done")
    _reused(ctx, "depth", key, cached)
    d = ctx.store.stage_dir("depth", key)
    return adjusted(ctx, Depth(key, d, np.load(d / "depth.npy", mmap_mode="r"), meta), s.adjust)  # scale/offset/clip


def _compute_depth(ctx: Context, clip: Clip, s: DepthSettings, model: str, options: dict) -> np.ndarray:
    """(T, H, W) float32 C-contiguous depth of the clip: a file read once (``depth_io.load_depth``: checked,
    resampled, scaled), or a depth model run on the frames."""
    t, h, w = clip.frames.shape[:3]
    if model == "file":
        from ..depth import _check_frames  # the limits ``depth.estimate`` applies to every provider
        from ..depth_io import load_depth

        _check_frames(clip.frames, model)
        opts = {k: v for k, v in options.items() if k != "path"}
        return np.ascontiguousarray(load_depth(options["path"], size=(w, h), n_frames=t, **opts), dtype=np.float32)
    from ..depth import estimate

    ctx.resident.release()  # the depth model needs the VRAM the kept generator holds
    resident_clip.release()  # ... and the clip the guide renderer keeps
    frames = np.ascontiguousarray(clip.frames)
    result = estimate(frames, model, models_dir=ctx.models_dir, device=s.device, progress=ctx.progress, **options)
    return np.ascontiguousarray(result.depth, dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# 3. mesh (the DW-mesh files the add-on shows; the guide re-meshes on the device instead)
# ----------------------------------------------------------------------------------------------
@dataclass
class MeshEntry:
    key: str
    dir: Path
    meta: dict


def _mesh_key(depth: Depth, k: np.ndarray, s: MeshSettings) -> list:
    return [depth.key, np.round(np.asarray(k, dtype=np.float64), 9).tolist(), *s.key()]


def mesh_stage(
    ctx: Context, clip: Clip, depth: Depth, k: np.ndarray, s: MeshSettings, viewport_stride: int = 1
) -> MeshEntry:
    """Depth + K ((3, 3), or (T, 3, 3) for a zooming source camera) -> the DW-mesh as files: ``positions.pc2``
    (the only copy of the per-frame vertex positions,
    (T, N, 3) float32 OpenCV world, in the PC2 format of Blender's Mesh Cache modifier; read it with
    ``service.pointcache.read_pc2``), ``faces.npy`` (F, 3) int32 and ``occlusion.npy`` (T, F) uint8 {0, 1}.
    Vertex colours are the frames (``frames.npy``) with alpha 0 on occlusion faces' vertices.
    ``viewport_stride`` s > 1: the add-on's viewport proxy instead (``viewport_proxy``: every s-th grid
    column / row and the last; N = len(mesh_columns) * len(mesh_rows), the full mesh's vertices there)."""
    import torch

    from .. import viewport_proxy as vp
    from ..dwmesh import build_dwmesh
    from ..render import resolve_renderer
    from ..service.pointcache import HEADER, MAGIC
    from .guide import chunk_frames

    stride = int(viewport_stride)
    key = make_key(STAGE_VERSION, "mesh", *_mesh_key(depth, k, s), *(["viewport_stride", stride] if stride > 1 else []))
    with _locked(ctx, "mesh", key):
        meta = _lookup(ctx, "mesh", key)
        cached = meta is not None
        if meta is None:
            t, h, w = depth.depth.shape
            cols, rows, vidx = vp.vertex_index(w, h, stride)
            n_vert, n_faces = len(vidx), 2 * (len(rows) - 1) * (len(cols) - 1) + 2
            owner = vp.face_owner(w, h, cols, rows) if stride > 1 else None
            meta = {
                "shot": clip.key,
                "n_frames": t,
                "width": w,
                "height": h,
                "n_vertices": n_vert,
                "n_faces": n_faces,
                "viewport_stride": stride,
                "mesh_columns": cols.tolist(),
                "mesh_rows": rows.tolist(),
                "K": np.asarray(k).tolist(),
                "mesh_filter": s.mesh_filter,
                "border_depth": s.border_depth,
                "fps": clip.fps,
            }
            backend = resolve_renderer("auto")
            device = torch.device("cuda" if backend == "cuda" else "cpu")
            step = chunk_frames(w, h, t, backend)
            total = -(-t // step)
            with ctx.store.write_stage("mesh", key, meta) as tmp:
                occ = preallocated_npy(tmp / "occlusion.npy", np.uint8, (t, n_faces))  # never SIGBUS on a full disk
                with open(tmp / "positions.pc2", "wb") as pc2:
                    if hasattr(os, "posix_fallocate"):  # a full disk is ENOSPC now, before any work
                        os.posix_fallocate(pc2.fileno(), 0, HEADER.size + t * n_vert * 12)
                    pc2.write(HEADER.pack(MAGIC, 1, n_vert, 0.0, 1.0, t))
                    if stride > 1:
                        np.save(tmp / "faces.npy", vp.proxy_faces(len(cols), len(rows)))
                    keep = torch.from_numpy(vidx).to(device)
                    for i, start in enumerate(range(0, t, step)):
                        stop = min(t, start + step)
                        ctx.progress("mesh", i, total, f"frames {start}-{stop - 1}")
                        m = build_dwmesh(
                            torch.from_numpy(np.array(depth.depth[start:stop])).to(device),
                            k if np.ndim(k) == 2 else k[start:stop],
                            torch.from_numpy(np.array(clip.frames[start:stop])).to(device),
                            mesh_filter=s.mesh_filter,
                            border_depth=s.border_depth,
                        )
                        if i == 0 and stride == 1:
                            np.save(tmp / "faces.npy", m.faces.cpu().numpy().astype(np.int32))
                        verts = m.vertices if stride == 1 else m.vertices[:, keep]
                        pc2.write(np.ascontiguousarray(verts.cpu().numpy(), dtype="<f4").tobytes())
                        invalid = m.invalid.cpu().numpy()
                        occ[start:stop] = invalid if owner is None else vp.proxy_occlusion(invalid, owner, n_faces)
                        del m
                occ.flush()
                del occ
                ctx.progress("mesh", total, total, "written")
    _reused(ctx, "mesh", key, cached)
    return MeshEntry(key, ctx.store.stage_dir("mesh", key), meta)


# ----------------------------------------------------------------------------------------------
# 4. camera
# ----------------------------------------------------------------------------------------------
@dataclass
class CameraEntry:
    key: str
    dir: Path
    path: CameraPath  # T frames, checked


def camera_stage(
    ctx: Context,
    clip: Clip,
    depth: Depth,
    k: np.ndarray,
    spec: dict | CameraPath,
    mesh: MeshSettings,
    *,
    where: str = "params.camera",
    source: SourceSetup | None = None,
) -> CameraEntry:
    """A camera spec (see ``pipeline.camera``) -> the checked path for the clip, stored as ``camera.npz``;
    presets, lock_off and stabilize follow ``source``'s path (None: the static source at the origin)."""
    from ..cameras import save_camera_npz

    ctx.progress("camera", 0, 1, "camera path")
    w, h = clip.size
    path = resolve_camera(
        spec, clip.n_frames, k, depth.depth[0], w, h, mesh, where=where, check_input=ctx.check_input,
        source=None if source is None else source.path, fps=clip.fps,
        depth_scale=1.0 if source is None else float(source.scales[0]),
    )  # fmt: skip
    key = make_key(STAGE_VERSION, "camera", camera_hash(path), w, h)
    with _locked(ctx, "camera", key):
        if _lookup(ctx, "camera", key) is None:
            meta = {"shot": clip.key, "name": path.name, "camera_hash": camera_hash(path), "n_frames": len(path)}
            with ctx.store.write_stage("camera", key, meta) as tmp:
                save_camera_npz(tmp / "camera.npz", path)
    housekeeping.touch(ctx.store, "camera", key)
    ctx.progress("camera", 1, 1, path.name)
    return CameraEntry(key, ctx.store.stage_dir("camera", key), path)


# ----------------------------------------------------------------------------------------------
# 5. guide
# ----------------------------------------------------------------------------------------------
@dataclass
class GuideEntry:
    key: str
    dir: Path
    meta: dict
    guide: Guide | None = None  # the arrays, when this call rendered them

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(colour (T, H, W, 3), mask (T, H, W)) uint8, exact (from the PNG frames when reused)."""
        if self.guide is not None:
            return self.guide.color, self.guide.mask
        return read_png_folder(self.dir / "color", 3), read_png_folder(self.dir / "mask", 1)


def guide_stage(
    ctx: Context,
    clip: Clip,
    depth: Depth,
    k: np.ndarray,
    camera: CameraEntry,
    mesh: MeshSettings,
    render: RenderSettings,
    source: SourceSetup | None = None,
) -> GuideEntry:
    """Frames + depth + K + camera (+ a moving source: its path and the depth scales) -> the guide
    (``pipeline.guide.render_guide``), stored as ``color/``, ``mask/`` (PNG frames, exact) and ``camera.npz``;
    the meta says whether frame 0 is the source frame. Its videos are :func:`guide_videos_stage`'s."""
    from ..render import guide_masked_share, resolve_renderer
    from .guide import render_guide

    backend = resolve_renderer(render.renderer)
    src_key = [] if source is None else source.key_parts()  # empty for a static source: the keys stay
    key = make_key(
        STAGE_VERSION, "guide", *_mesh_key(depth, k, mesh), camera.key, backend, bool(render.use_dwmesh), *src_key
    )
    with _locked(ctx, "guide", key):
        meta = _lookup(ctx, "guide", key)
        if meta is not None:
            _reused(ctx, "guide", key, True)
            return GuideEntry(key, ctx.store.stage_dir("guide", key), meta)
        cam = camera.path
        t, h, w = depth.depth.shape
        meta = {
            "shot": clip.key,
            "camera": cam.name,
            "camera_hash": camera_hash(cam),
            "renderer": backend,
            "use_dwmesh": bool(render.use_dwmesh),
            "depth_scale_fit": {} if source is None else source.fit,
            "n_frames": t,
            "width": w,
            "height": h,
            "fps": clip.fps,
        }
        guide = render_guide(
            clip.frames,
            depth.depth,
            k,
            cam,
            mesh,
            RenderSettings(backend, render.use_dwmesh),
            source=None if source is None else source.path,
            depth_scale=1.0 if source is None else source.scales,
            progress=ctx.progress,
            resident_key=f"{clip.key}:{depth.key}",  # the next camera of this shot reuses the uploaded clip
        )
        meta["frame0_is_source"] = guide.frame0_is_source
        meta["masked_share"] = [round(float(v), 6) for v in guide_masked_share(guide.mask)]  # unseen, per frame
        ctx.progress("write", 0, 1, "guide files")
        with ctx.store.write_stage("guide", key, meta) as tmp:
            write_guide_files(tmp, guide.color, guide.mask, guide.camera)
        ctx.progress("write", 1, 1, "done")
    _reused(ctx, "guide", key, False)
    return GuideEntry(key, ctx.store.stage_dir("guide", key), meta, guide)


@dataclass
class GuideVideos:
    key: str
    dir: Path  # color.mp4, mask.mp4


def guide_videos_stage(ctx: Context, guide: GuideEntry) -> GuideVideos:
    """A guide -> its H.264 videos ``color.mp4`` and ``mask.mp4`` (``guide_files.write_guide_videos``),
    keyed by the guide alone: what ``ex4d recon`` exports and a ``render_guide`` request with ``videos``
    returns. Kept out of the guide stage so that a new camera costs no video encoding (the add-on reads the
    PNG frames)."""
    key = make_key(STAGE_VERSION, "guide_videos", guide.key)
    with _locked(ctx, "guide_videos", key):
        meta = _lookup(ctx, "guide_videos", key)
        cached = meta is not None
        if meta is None:
            ctx.progress("guide_videos", 0, 1, "encoding")
            meta = {"shot": guide.meta["shot"], "guide": guide.key, "fps": guide.meta["fps"]}
            color, mask = guide.arrays()
            with ctx.store.write_stage("guide_videos", key, meta) as tmp:
                write_guide_videos(tmp, color, mask, float(meta["fps"]))
            ctx.progress("guide_videos", 1, 1, "done")
    _reused(ctx, "guide_videos", key, cached)
    return GuideVideos(key, ctx.store.stage_dir("guide_videos", key))


# ----------------------------------------------------------------------------------------------
# 6. generate: ``pipeline/generate.py`` (windows, composite, resume), re-exported here
# ----------------------------------------------------------------------------------------------
GENERATE_NAMES = ("GenerateEntry", "generate_stage", "generate_windows_stage", "generator_key")


def __getattr__(name: str):
    if name in GENERATE_NAMES:  # imported on first use (the generate module imports this one)
        from . import generate

        return getattr(generate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------
# The shot path most requests take: frames -> depth -> camera -> guide
# ----------------------------------------------------------------------------------------------
@dataclass
class Shot:
    clip: Clip
    depth: Depth
    k: np.ndarray  # source intrinsics, pixels: (3, 3), or (T, 3, 3) from a zooming source camera
    mesh: MeshSettings
    camera: CameraEntry
    guide: GuideEntry
    source: SourceSetup  # the source camera path (None: static) and the depth scales


def guide_for_shot(
    ctx: Context,
    footage: str | os.PathLike,
    frames: FrameSettings,
    depth: DepthSettings,
    intrinsics: IntrinsicsSettings,
    camera: dict | CameraPath,
    mesh: MeshSettings,
    render: RenderSettings,
    source: SourceSettings = SourceSettings(),
    *,
    where: str = "params.camera",
    where_source: tuple[str, str] = ("params.source_camera", "params.depth_scale"),
) -> Shot:
    """Stages 1, 2, 4 and 5 for one shot and one novel camera (``ex4d recon``, ``render_guide``, ``generate``);
    the source camera is checked before the depth is computed."""
    src = source_for_shot(ctx, footage, frames, depth, intrinsics, source, where=where_source)
    clip, d, k = src.clip, src.depth, src.setup.k
    cam = camera_stage(ctx, clip, d, k, camera, mesh, where=where, source=src.setup)
    return Shot(clip, d, k, mesh, cam, guide_stage(ctx, clip, d, k, cam, mesh, render, src.setup), src.setup)


@dataclass
class SourceShot:
    clip: Clip
    depth: Depth
    setup: SourceSetup


def source_for_shot(
    ctx: Context,
    footage: str | os.PathLike,
    frames: FrameSettings,
    depth: DepthSettings,
    intrinsics: IntrinsicsSettings,
    source: SourceSettings = SourceSettings(),
    *,
    where: tuple[str, str] = ("params.source_camera", "params.depth_scale"),
) -> SourceShot:
    """Stages 1 and 2 with the source camera (``pipeline.source``: checked between them, before any depth
    work) and the depth scales (fitted to the depth when bundles are given)."""
    clip = frames_stage(ctx, footage, frames)
    w, h = clip.size
    k = intrinsics.matrix(w, h)
    path, k = resolve_source(source.source_camera, clip.n_frames, k, w, h, where=where[0], check_input=ctx.check_input)
    d = depth_stage(ctx, clip, depth)
    scales, fit = depth_scales(
        source.depth_scale, path, d.depth, where=where[1], check_input=ctx.check_input,
        warn=lambda m: ctx.progress("camera", 0, 1, m),
    )  # fmt: skip
    return SourceShot(clip, d, SourceSetup(path, scales, k, fit))
