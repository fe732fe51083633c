"""Job definitions: one executor per request type, built from cached stages in the job store.

A job is ``{"type": ..., "params": {...}}`` (the request without its id); ``ex4d run JOB.json`` and
``ex4d serve`` both call :func:`run_job`, so a job gives the same outputs wherever it runs.

Stages and what their cache key depends on (each a content hash, see ``jobstore``)::

    frames   footage bytes, max_frames, max_side, fps
    depth    frames + the depth source (file bytes and options, or model and options)
    mesh     depth + K + mesh_filter + border_depth
    guide    mesh + camera (matrices and intrinsics) + renderer + use_dwmesh
    generate guide + generator settings

so changing the camera reuses frames, depth and the DW-mesh.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import BAD_INPUT, Ex4dError
from . import protocol
from .jobstore import JobStore, make_key, preallocated_npy
from .resident import ResidentGenerator, free_memory

log = logging.getLogger("ex4d_backend.service")
Progress = Callable[[str, int, int, str], None]
STAGE_VERSION = 1  # bump when a change alters stage results, so stale cache entries are never reused


@dataclass
class Context:
    """What an executor may use: the store, a progress callback (may raise ``Cancelled``), settings."""

    store: JobStore
    progress: Progress = lambda *a: None
    models_dir: str | None = None
    request_id: str | None = None
    cached: dict[str, bool] = field(default_factory=dict)
    force_stage: str | None = None  # the stage that ``force`` recomputes
    resident: ResidentGenerator = field(default_factory=lambda: ResidentGenerator(0))  # default: load per job


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _stage_done(ctx: Context, stage: str, cached: bool) -> None:
    ctx.cached[stage] = cached
    if cached:
        ctx.progress(stage, 1, 1, "from the store")


def _array_hash(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a, dtype=np.float64)
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:20]


# ----------------------------------------------------------------------------------------------
# Stages
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


def clip_stage(ctx: Context, p: dict) -> Clip:
    footage = ctx.store.check_input(p["footage"], "footage")
    ctx.progress("frames", 0, 1, "hashing the footage")
    opts = {"max_frames": p.get("max_frames", 0), "max_side": p.get("max_side", 1024), "fps": p.get("fps")}
    key = make_key(STAGE_VERSION, "frames", ctx.store.input_hash(footage), opts)
    meta = ctx.store.stage_meta("frames", key)
    if meta is None:
        from ..footage import read_footage

        ctx.progress("frames", 0, 1, "reading the footage")
        f = read_footage(footage, max_frames=opts["max_frames"] or None, max_side=opts["max_side"], fps=opts["fps"])
        ctx.progress("frames", 0, 1, "writing the frames")
        meta = {
            **opts,
            "footage": str(footage),
            "fps": f.fps,
            "source_size": list(f.source_size),
            "total_frames": f.total_frames,
            "n_frames": len(f.frames),
            "width": f.size[0],
            "height": f.size[1],
        }
        with ctx.store.write_stage("frames", key, meta) as tmp:
            np.save(tmp / "frames.npy", f.frames)
        del f
        ctx.progress("frames", 1, 1, "done")
        ctx.cached["frames"] = False
    else:
        _stage_done(ctx, "frames", True)
    d = ctx.store.stage_dir("frames", key)
    return Clip(key, d, np.load(d / "frames.npy", mmap_mode="r"), float(meta["fps"]), meta)


@dataclass
class Depth:
    key: str
    dir: Path
    depth: np.ndarray  # (T, H, W) float32 (memory-mapped)


def depth_stage(ctx: Context, p: dict, clip: Clip) -> Depth:
    spec = dict(p["depth"])
    model = spec.pop("model")
    device = spec.pop("device", "auto")
    if model == "file":
        if spec.get("options"):
            raise Ex4dError(
                "depth 'options' do not apply to model 'file'",
                where="params.depth.options",
                hint="use kind, repair and scale",
                code=protocol.INVALID_REQUEST,
            )
        path = ctx.store.check_input(spec.pop("path"), "depth file")
        options = {
            "kind": spec.get("kind", "depth"),
            "repair": spec.get("repair", False),
            "scale": spec.get("scale", 1.0),
        }
        source = ["file", ctx.store.input_hash(path), options]
        options["path"] = str(path)
        options["total_frames"] = clip.meta["total_frames"]
    else:
        from ..depth import canonical_model

        model = canonical_model(model)
        options = dict(spec.get("options") or {})
        extra = set(spec) - {"options"}
        if extra:
            raise Ex4dError(
                f"depth fields {sorted(extra)} only apply to model 'file'",
                where="params.depth",
                code=protocol.INVALID_REQUEST,
            )
        source = [model, options]
    key = make_key(STAGE_VERSION, "depth", clip.key, source)
    meta = ctx.store.stage_meta("depth", key)
    if meta is None or ctx.force_stage == "depth":
        from ..depth import estimate

        if model != "file":
            ctx.resident.release()  # the depth model needs the VRAM the kept generator holds
        ctx.progress("depth", 0, 1, f"depth from {model}")
        frames = np.ascontiguousarray(clip.frames)
        result = estimate(frames, model, models_dir=ctx.models_dir, device=device, progress=ctx.progress, **options)
        depth = np.ascontiguousarray(result.depth, dtype=np.float32)
        if depth.shape != frames.shape[:3] or not np.isfinite(depth).all():
            raise Ex4dError(f"the depth has shape {depth.shape}, the frames {frames.shape[:3]}", where="depth")
        meta = {
            "model": model,
            "options": {k: v for k, v in options.items() if k != "path"},
            "depth_min": float(depth.min()),
            "depth_max": float(depth.max()),
        }
        with ctx.store.write_stage("depth", key, meta) as tmp:
            np.save(tmp / "depth.npy", depth)
        del result, depth, frames
        free_memory()
        ctx.progress("depth", 1, 1, "done")
        ctx.cached["depth"] = False
    else:
        _stage_done(ctx, "depth", True)
    d = ctx.store.stage_dir("depth", key)
    return Depth(key, d, np.load(d / "depth.npy", mmap_mode="r"))


def intrinsics(p: dict, width: int, height: int) -> np.ndarray:
    """The source camera's K (pixels, at the processing resolution) from ``focal_px`` or ``lens`` (mm)."""
    from ..cameras import blender_to_intrinsics, intrinsics_from_focal

    if "focal_px" in p:
        return intrinsics_from_focal(width, height, focal_px=float(p["focal_px"]))
    if "lens" in p:  # Blender's rule: the sensor size spans the side that sensor_fit names
        return blender_to_intrinsics(
            float(p["lens"]),
            width,
            height,
            sensor_width=float(p.get("sensor_width", 36.0)),
            sensor_height=float(p.get("sensor_height", 24.0)),
            sensor_fit=p.get("sensor_fit", "HORIZONTAL"),
        )
    return intrinsics_from_focal(width, height)


def _chunk(width: int, height: int, n: int, renderer: str = "cpu") -> int:
    """Frames per chunk: bounded memory, and at least ~8 steps so progress and cancel stay fine-grained."""
    from ..recon import CHUNK_PIXELS

    by_memory = max(1, CHUNK_PIXELS.get(renderer, CHUNK_PIXELS["cpu"]) // (width * height))
    return max(1, min(by_memory, -(-n // 8)))


@dataclass
class Mesh:
    key: str
    dir: Path
    meta: dict


def mesh_stage(ctx: Context, p: dict, clip: Clip, depth: Depth, k: np.ndarray) -> Mesh:
    mesh_filter = p.get("mesh_filter", "angle")
    border = float(p.get("border_depth", 100.0))
    key = make_key(STAGE_VERSION, "mesh", depth.key, np.round(k, 9).tolist(), mesh_filter, border)
    meta = ctx.store.stage_meta("mesh", key)
    if meta is None or ctx.force_stage == "mesh":
        import torch

        from ..dwmesh import build_dwmesh
        from .pointcache import write_pc2

        t, h, w = depth.depth.shape
        n_faces = 2 * (h - 1) * (w - 1) + 2
        meta = {
            "n_frames": t,
            "width": w,
            "height": h,
            "n_vertices": h * w,
            "n_faces": n_faces,
            "K": np.asarray(k).tolist(),
            "mesh_filter": mesh_filter,
            "border_depth": border,
            "fps": clip.fps,
        }
        step = _chunk(w, h, t)
        total = -(-t // step)
        with ctx.store.write_stage("mesh", key, meta) as tmp:
            pos = preallocated_npy(tmp / "positions.npy", np.float32, (t, h * w, 3))  # never SIGBUS on a full disk
            occ = preallocated_npy(tmp / "occlusion.npy", np.uint8, (t, n_faces))
            col = preallocated_npy(tmp / "colors.npy", np.uint8, (t, h * w, 4))
            for i, start in enumerate(range(0, t, step)):
                ctx.progress("mesh", i, total, f"frames {start}-{min(t, start + step) - 1}")
                stop = min(t, start + step)
                m = build_dwmesh(
                    torch.from_numpy(np.array(depth.depth[start:stop])),
                    k if np.ndim(k) == 2 else k[start:stop],  # per-frame K: a zooming source camera
                    torch.from_numpy(np.array(clip.frames[start:stop])),
                    mesh_filter=mesh_filter,
                    border_depth=border,
                )
                if i == 0:
                    np.save(tmp / "faces.npy", m.faces.cpu().numpy().astype(np.int32))
                pos[start:stop] = m.vertices.cpu().numpy()
                occ[start:stop] = m.invalid.cpu().numpy()
                col[start:stop] = m.colors.cpu().numpy()
                del m
            pos.flush(), occ.flush(), col.flush()
            ctx.progress("mesh", total, total, "writing the point cache")
            write_pc2(tmp / "positions.pc2", (pos[s : s + step] for s in range(0, t, step)), h * w, t)
            del pos, occ, col
        ctx.cached["mesh"] = False
    else:
        _stage_done(ctx, "mesh", True)
    return Mesh(key, ctx.store.stage_dir("mesh", key), meta)


def _check_rigid(m: np.ndarray, where: str, *, scale_ok: bool) -> None:
    """4x4 matrices must be finite with a last row (0, 0, 0, 1) and an invertible (``scale_ok``: scaled)
    rotation part; raises ``bad_input``."""
    if not np.isfinite(m).all():
        raise Ex4dError("the camera contains NaN or infinite values", where=where)
    if not np.allclose(m[:, 3], [0, 0, 0, 1], atol=1e-6):
        raise Ex4dError("a camera matrix's last row is not (0, 0, 0, 1)", where=where, hint="send affine matrices")
    rot = m[:, :3, :3]
    if scale_ok:
        rot = rot / np.maximum(np.linalg.norm(rot, axis=-2, keepdims=True), 1e-300)
    if not np.allclose(rot @ np.swapaxes(rot, 1, 2), np.eye(3), atol=1e-3) or np.any(np.linalg.det(rot) < 0):
        raise Ex4dError(
            "a camera matrix is not a rotation (shear, zero scale or a mirror?)",
            where=where,
            hint="remove shear and negative scale from the camera object and its parents",
        )


def camera_path(ctx: Context, p: dict, clip: Clip, depth: Depth, k: np.ndarray, source=None, depth_scale=1.0):
    """The novel camera as a ``cameras.CameraPath`` at the processing resolution (>= T frames); presets,
    lock_off and stabilize relative to ``source`` (``camera_paths``; None: static at the origin)."""
    try:
        return _camera_path(ctx, p, clip, depth, k, source, depth_scale)
    except (ValueError, TypeError, ArithmeticError, np.linalg.LinAlgError) as exc:
        raise Ex4dError(
            f"unusable camera: {str(exc)[:300]}",
            where="params.camera",
            hint="send finite, rigid camera matrices with positive focal lengths",
        ) from None


def _camera_path(ctx: Context, p: dict, clip: Clip, depth: Depth, k: np.ndarray, source=None, depth_scale=1.0):
    from .. import camera_paths, cameras
    from .source import camera_spec

    cam = p["camera"]
    w, h = clip.size
    t = clip.frames.shape[0]
    name = cam.get("name")
    if camera_spec(cam) is not None:  # presets follow the source path; lock_off / stabilize hold / smooth it
        k0 = k if np.ndim(k) == 2 else k[0]
        path = camera_paths.novel_camera_path(
            camera_spec(cam), t, k0, np.asarray(depth.depth[0]), w, h, source=source, fps=clip.fps,
            depth_scale=depth_scale, border_depth=float(p.get("border_depth", 100.0)),
        )  # fmt: skip
    elif "blender" in cam:
        b = cam["blender"]
        if "resolution" in b:
            rw, rh = b["resolution"]
            if abs(rw / rh - w / h) > 0.01 * (w / h):
                raise Ex4dError(
                    f"the camera's resolution {rw}x{rh} has another aspect ratio than the footage ({w}x{h})",
                    where="params.camera.blender.resolution",
                    hint="set the scene resolution to the footage's aspect ratio",
                )
        mw = np.asarray(b["matrix_world"], dtype=np.float64)
        lens = np.asarray(b["lens"], dtype=np.float64)
        for field in ("lens", "shift_x", "shift_y"):
            v = np.asarray(b.get(field, 0.0), dtype=np.float64)
            if v.ndim == 1 and len(v) not in (1, len(mw)):
                raise Ex4dError(
                    f"{len(v)} {field} values for {len(mw)} camera matrices",
                    where=f"params.camera.blender.{field}",
                    hint="send one value, or one per matrix",
                )
        _check_rigid(mw, "params.camera.blender.matrix_world", scale_ok=True)
        path = cameras.camera_path_from_blender(
            mw,
            lens,
            w,
            h,
            sensor_width=b.get("sensor_width", 36.0),
            sensor_height=b.get("sensor_height", 24.0),
            sensor_fit=b.get("sensor_fit", "AUTO"),
            shift_x=b.get("shift_x", 0.0),
            shift_y=b.get("shift_y", 0.0),
            name=name or "blender",
        )
    elif "opencv" in cam:
        o = cam["opencv"]
        ext = np.asarray(o["extrinsics"], dtype=np.float64)
        ks = np.asarray(o["intrinsics"], dtype=np.float64) if "intrinsics" in o else k
        if ks.ndim == 3 and len(ks) != len(ext):
            raise Ex4dError(f"{len(ks)} intrinsics for {len(ext)} extrinsics", where="params.camera.opencv")
        _check_rigid(ext, "params.camera.opencv.extrinsics", scale_ok=False)
        path = cameras.CameraPath(ext, ks, w, h, name=name or "opencv")
    else:
        f = ctx.store.check_input(cam["file"], "camera file")
        path = cameras.load_camera_file(f, t, w, h, default_k=k)
    if len(path) < t:
        raise Ex4dError(
            f"the camera path has {len(path)} frames but the footage {t}",
            where="params.camera",
            hint="send one camera per footage frame",
        )
    ext, ks = path.extrinsics[:t], path.intrinsics[:t]
    if not (np.isfinite(ext).all() and np.isfinite(ks).all()):
        raise Ex4dError("the camera contains NaN or infinite values", where="params.camera")
    if np.any(np.abs(np.linalg.det(ext[:, :3, :3]) - 1.0) > 1e-3):
        raise Ex4dError(
            "a camera matrix is not a rotation (scale or shear in matrix_world?)",
            where="params.camera",
            hint="remove scale from the camera object and its parents",
        )
    if np.any(ks[:, 0, 0] <= 0) or np.any(ks[:, 1, 1] <= 0) or not np.allclose(ks[:, 2], [0, 0, 1]):
        raise Ex4dError(
            "the camera's intrinsics must have positive focal lengths and a last row (0, 0, 1)",
            where="params.camera",
        )
    if np.any(ks[:, :2, :] > 1e7):
        raise Ex4dError("the camera's focal length or centre is absurdly large", where="params.camera")
    name = name or path.name or "custom"
    return cameras.CameraPath(ext, ks, w, h, name=name)


def guide_stage(ctx: Context, p: dict, clip: Clip, depth: Depth, k: np.ndarray) -> tuple[Path, dict, str]:
    import torch

    from .. import cameras
    from ..camera_paths import guide_starts_at_source
    from ..dwmesh import DWMesh
    from ..render import render_guide, resolve_renderer
    from .source import source_setup

    src = source_setup(ctx, p, clip, depth, k)  # the moving source camera and depth scale (issue 15)
    k = src.k
    mesh = mesh_stage(ctx, p, clip, depth, k)
    ctx.progress("camera", 0, 1, "camera path")
    cam = camera_path(ctx, p, clip, depth, k, source=src.path, depth_scale=float(src.scales[0]))
    cam_hash = _array_hash(cam.extrinsics, cam.intrinsics)
    ctx.progress("camera", 1, 1, cam.name)
    renderer = resolve_renderer(p.get("renderer", "auto"))
    use_dwmesh = bool(p.get("use_dwmesh", True))
    key = make_key(STAGE_VERSION, "guide", mesh.key, cam_hash, renderer, use_dwmesh, *src.key_parts())
    if ctx.store.stage_meta("guide", key) is not None and ctx.force_stage != "guide":
        _stage_done(ctx, "guide", True)
        return ctx.store.stage_dir("guide", key), ctx.store.stage_meta("guide", key), key
    t, h, w = depth.depth.shape
    device = torch.device("cuda") if renderer == "cuda" else torch.device("cpu")
    faces = torch.from_numpy(np.load(mesh.dir / "faces.npy").astype(np.int64)).to(device)
    pos = np.load(mesh.dir / "positions.npy", mmap_mode="r")
    occ = np.load(mesh.dir / "occlusion.npy", mmap_mode="r")
    col = np.load(mesh.dir / "colors.npy", mmap_mode="r")
    frames = np.ascontiguousarray(clip.frames)
    color = np.empty((t, h, w, 3), np.uint8)
    mask = np.empty((t, h, w), np.uint8)
    step = _chunk(w, h, t, renderer)
    total = -(-t // step)
    for i, start in enumerate(range(0, t, step)):
        ctx.progress("render", i, total, f"frames {start}-{min(t, start + step) - 1}")
        stop = min(t, start + step)
        m = DWMesh(
            torch.from_numpy(np.array(pos[start:stop])).to(device),
            faces,
            torch.from_numpy(np.array(occ[start:stop])).to(device).bool(),
            torch.from_numpy(np.array(col[start:stop])).to(device),
            h,
            w,
        )
        color[start:stop], mask[start:stop] = render_guide(
            m, cam, frames, renderer=renderer, use_dwmesh=use_dwmesh, first_frame=start,
            source=src.path, depth_scale=src.scales, source_k=k if np.ndim(k) == 2 else k[0],
        )  # fmt: skip
        del m
    ctx.progress("render", total, total, "done")
    meta = {
        "camera": cam.name,
        "camera_hash": cam_hash,
        "renderer": renderer,
        "use_dwmesh": use_dwmesh,
        "frame0_is_source": guide_starts_at_source(cam, src.path, k if np.ndim(k) == 2 else k[0]),
        "depth_scale_fit": src.fit,
        "n_frames": t,
        "width": w,
        "height": h,
        "fps": clip.fps,
    }
    from ..footage import write_png_sequence, write_video

    with ctx.store.write_stage("guide", key, meta) as tmp:
        ctx.progress("write", 0, 5, "colour video")
        write_video(tmp / "color.mp4", color, clip.fps)
        ctx.progress("write", 1, 5, "mask video")
        write_video(tmp / "mask.mp4", mask, clip.fps)
        ctx.progress("write", 2, 5, "colour frames")
        write_png_sequence(tmp / "color", color)
        ctx.progress("write", 3, 5, "mask frames")
        write_png_sequence(tmp / "mask", mask)
        ctx.progress("write", 4, 5, "camera")
        cameras.save_camera_npz(tmp / "camera.npz", cam)
        np.save(tmp / "color.npy", color)
        np.save(tmp / "mask.npy", mask)
    ctx.progress("write", 5, 5, "done")
    ctx.cached["guide"] = False
    return ctx.store.stage_dir("guide", key), meta, key


# ----------------------------------------------------------------------------------------------
# Executors (one per job type)
# ----------------------------------------------------------------------------------------------
def _clip_result(clip: Clip) -> dict:
    return {"n_frames": int(clip.frames.shape[0]), "width": clip.size[0], "height": clip.size[1], "fps": clip.fps}


def exec_estimate_depth(ctx: Context, p: dict) -> dict:
    clip = clip_stage(ctx, p)
    depth = depth_stage(ctx, p, clip)
    meta = ctx.store.stage_meta("depth", depth.key) or {}
    return {
        "depth_npy": str(depth.dir / "depth.npy"),
        "frames_npy": str(clip.dir / "frames.npy"),
        "depth_min": meta.get("depth_min"),
        "depth_max": meta.get("depth_max"),
        **_clip_result(clip),
    }


def exec_build_dwmesh(ctx: Context, p: dict) -> dict:
    from ..cameras import CV_TO_BLENDER
    from .source import source_setup

    clip = clip_stage(ctx, p)
    depth = depth_stage(ctx, p, clip)
    k = intrinsics(p, *clip.size)
    if p.get("source_camera"):  # the source camera's intrinsics, as render_guide's mesh
        k = source_setup(ctx, {**p, "depth_scale": 1.0}, clip, depth, k).k
    mesh = mesh_stage(ctx, p, clip, depth, k)
    d = mesh.dir
    return {
        "positions_npy": str(d / "positions.npy"),
        "positions_pc2": str(d / "positions.pc2"),
        "faces_npy": str(d / "faces.npy"),
        "occlusion_npy": str(d / "occlusion.npy"),
        "colors_npy": str(d / "colors.npy"),
        "K": mesh.meta["K"],
        "n_vertices": mesh.meta["n_vertices"],
        "n_faces": mesh.meta["n_faces"],
        "cv_to_blender": np.asarray(CV_TO_BLENDER).tolist(),
        "source_camera": blender_source_camera(np.asarray(mesh.meta["K"]), *clip.size, p.get("sensor_width", 36.0)),
        "depth_npy": str(depth.dir / "depth.npy"),
        **_clip_result(clip),
    }


def exec_camera_preset(ctx: Context, p: dict) -> dict:
    from .. import cameras

    clip = clip_stage(ctx, p)
    depth = depth_stage(ctx, p, clip)
    w, h = clip.size
    k = intrinsics(p, w, h)
    sensor_width = float(p.get("sensor_width", 36.0))
    t = clip.frames.shape[0]
    ctx.progress("camera", 0, 1, f"preset {p['preset']}")
    border = float(p.get("border_depth", 100.0))  # as render_guide's preset, so both give the same path
    path = cameras.preset_path(p["preset"], t, k, np.asarray(depth.depth[0]), w, h, border_depth=border)
    mw = cameras.opencv_to_blender_matrix_world(path.extrinsics)
    lens = [cameras.intrinsics_to_blender(kk, w, h, sensor_width, "HORIZONTAL") for kk in path.intrinsics]
    key = make_key(STAGE_VERSION, "camera", depth.key, p["preset"], np.round(k, 9).tolist(), border)
    if ctx.store.stage_meta("camera", key) is None or ctx.force_stage == "camera":
        with ctx.store.write_stage("camera", key, {"preset": p["preset"]}) as tmp:
            cameras.save_camera_npz(tmp / "camera.npz", path)
    ctx.progress("camera", 1, 1, "done")
    return {
        "preset": p["preset"],
        "matrix_world": np.asarray(mw).tolist(),
        "lens": [b["lens"] for b in lens],
        **{f: lens[0][f] for f in ("sensor_width", "sensor_height", "sensor_fit", "shift_x", "shift_y")},
        "camera_npz": str(ctx.store.stage_dir("camera", key) / "camera.npz"),
        **_clip_result(clip),
    }


def exec_render_guide(ctx: Context, p: dict) -> dict:
    clip = clip_stage(ctx, p)
    depth = depth_stage(ctx, p, clip)
    d, meta, _ = guide_stage(ctx, p, clip, depth, intrinsics(p, *clip.size))
    return {
        "color_mp4": str(d / "color.mp4"),
        "mask_mp4": str(d / "mask.mp4"),
        "color_dir": str(d / "color"),
        "mask_dir": str(d / "mask"),
        "camera_npz": str(d / "camera.npz"),
        "camera_hash": meta["camera_hash"],
        "camera": meta["camera"],
        "frame0_is_source": meta.get("frame0_is_source", True),
        "depth_scale_fit": meta.get("depth_scale_fit", {}),
        **_clip_result(clip),
    }


GEN_DEFAULTS = {
    "generator": "ex4d",
    "steps": 25,
    "cfg": 5.0,
    "shift": 5.0,
    "seed": 0,
    "height": 512,
    "width": 512,
    "num_frames": 49,
    "vram_profile": "full",
    "device": "auto",
}


def exec_generate(ctx: Context, p: dict) -> dict:
    from ..generation import REFERENCE_NEGATIVE, REFERENCE_PROMPT, load_generator
    from ..generation.conditioning import sample_indices

    clip = clip_stage(ctx, p)
    depth = depth_stage(ctx, p, clip)
    gdir, gmeta, gkey = guide_stage(ctx, p, clip, depth, intrinsics(p, *clip.size))
    s = {
        **GEN_DEFAULTS,
        "prompt": REFERENCE_PROMPT,
        "negative_prompt": REFERENCE_NEGATIVE,
        **{f: p[f] for f in GEN_DEFAULTS.keys() | {"prompt", "negative_prompt"} if f in p},
    }
    key = make_key(STAGE_VERSION, "generate", gkey, {f: v for f, v in s.items() if f != "device"})
    if ctx.store.stage_meta("generate", key) is None or ctx.force_stage == "generate":
        color = np.load(gdir / "color.npy")
        mask = np.load(gdir / "mask.npy")

        def load():
            ctx.progress("load", 0, 1, f"loading the {s['generator']} generator")
            return load_generator(
                s["generator"], models_dir=ctx.models_dir, device=s["device"], vram_profile=s["vram_profile"]
            )

        gen_key = (s["generator"], str(ctx.models_dir), s["device"], s["vram_profile"])
        gen, reused = ctx.resident.acquire(gen_key, load)
        ok = False
        try:
            ctx.progress("load", 1, 1, "the generator was still loaded" if reused else "loaded")
            frames = gen(
                color,
                mask,
                height=s["height"],
                width=s["width"],
                num_frames=s["num_frames"],
                steps=s["steps"],
                cfg=s["cfg"],
                shift=s["shift"],
                seed=s["seed"],
                prompt=s["prompt"],
                negative_prompt=s["negative_prompt"],
                callback=ctx.progress,
            )
            ok = True
        finally:
            ctx.resident.done(ok)  # kept for the next job, or closed (a cancel, an error, keep-alive 0)
            del gen
            free_memory()
        from ..footage import write_png_sequence, write_video

        idx = sample_indices(len(color), s["num_frames"]).tolist()
        meta = {
            "settings": s,
            "camera_hash": gmeta["camera_hash"],
            "source_frames": idx,
            "fps": clip.fps,
            "n_frames": len(frames),
            "width": s["width"],
            "height": s["height"],
        }
        with ctx.store.write_stage("generate", key, meta) as tmp:
            ctx.progress("save", 0, 2, "frames")
            write_png_sequence(tmp / "frames", frames)
            ctx.progress("save", 1, 2, "video")
            write_video(tmp / "video.mp4", frames, clip.fps)
        ctx.progress("save", 2, 2, "done")
        ctx.cached["generate"] = False
    else:
        _stage_done(ctx, "generate", True)
    d = ctx.store.stage_dir("generate", key)
    meta = ctx.store.stage_meta("generate", key) or {}
    return {
        "frames_dir": str(d / "frames"),
        "video_mp4": str(d / "video.mp4"),
        "n_frames": meta["n_frames"],
        "width": meta["width"],
        "height": meta["height"],
        "fps": meta["fps"],
        "source_frames": meta["source_frames"],
        "camera_hash": meta["camera_hash"],
        "settings": meta["settings"],
        "guide_dir": str(gdir),
    }


EXECUTORS = {
    "estimate_depth": exec_estimate_depth,
    "build_dwmesh": exec_build_dwmesh,
    "camera_preset": exec_camera_preset,
    "render_guide": exec_render_guide,
    "generate": exec_generate,
}
FORCED_STAGE = {
    "estimate_depth": "depth",
    "build_dwmesh": "mesh",
    "camera_preset": "camera",
    "render_guide": "guide",
    "generate": "generate",
}


def job_key(store: JobStore, type_: str, params: dict) -> str:
    """The job's key: its type and params with every input path replaced by the input's content hash
    (so a moved file still hits; an edited one never does). Checks the input paths."""
    from .source import canonical

    canon = canonical(store, {k: v for k, v in params.items() if k != "force"})
    canon["footage"] = store.input_hash(store.check_input(params["footage"], "footage"))
    depth = dict(params["depth"])
    if depth.get("model") == "file" and "path" in depth:
        depth["path"] = store.input_hash(store.check_input(depth["path"], "depth file"))
    canon["depth"] = depth
    cam = params.get("camera")
    if isinstance(cam, dict) and "file" in cam:
        canon["camera"] = {**cam, "file": store.input_hash(store.check_input(cam["file"], "camera file"))}
    return make_key(STAGE_VERSION, type_, canon)


def run_job(type_: str, params: dict, ctx: Context) -> dict:
    """Run one job (validated params) through the store; return the result payload."""
    if type_ not in EXECUTORS:
        raise Ex4dError(f"'{type_}' is not a job type", code=protocol.UNKNOWN_TYPE)
    ctx.progress("inputs", 0, 1, "checking the inputs")
    key = job_key(ctx.store, type_, params)
    job_dir = ctx.store.job_dir(type_, key)
    if not params.get("force"):
        cached = ctx.store.cached_result(job_dir)
        if cached is not None:
            ctx.progress("inputs", 1, 1, "the result is in the store")
            return {**cached, "cached": {stage: True for stage in cached.get("cached", {})}}
    ctx.progress("inputs", 1, 1, "ok")
    ctx.cached = {}
    ctx.force_stage = FORCED_STAGE[type_] if params.get("force") else None
    ctx.store.begin_job(type_, key, {k: v for k, v in params.items() if k != "force"}, ctx.request_id)
    try:
        payload = EXECUTORS[type_](ctx, params)
    except BaseException as exc:
        state = "cancelled" if getattr(exc, "code", None) == "cancelled" else "failed"
        err = exc.to_dict() if isinstance(exc, Ex4dError) else {"code": "internal", "message": repr(exc)[:500]}
        ctx.store.finish_job(job_dir, state, error=err)
        raise
    payload.update(
        {
            "job": job_dir.name,
            "job_dir": str(job_dir),
            "job_file": str(job_dir / "job.json"),
            "cached": dict(ctx.cached),
            "store": str(ctx.store.root),
        }
    )
    ctx.store.finish_job(job_dir, "done", result=payload)
    return payload


# ----------------------------------------------------------------------------------------------
# Light requests
# ----------------------------------------------------------------------------------------------
def probe_footage(store: JobStore, p: dict) -> dict:
    """Size, rate and frame count of footage (without decoding it all) and the matching source camera."""
    from ..footage import list_image_sequence, processing_size, read_footage

    path = store.check_input(p["footage"], "footage")
    f = read_footage(path, max_frames=1, max_side=None)
    total = f.total_frames
    if not path.is_dir() and total <= 1:
        total = _count_video_frames(path)
    elif path.is_dir():
        total = len(list_image_sequence(path))
    w, h = f.source_size
    pw, ph = processing_size(w, h, p.get("max_side", 1024))
    k = intrinsics(p, pw, ph)
    blender = blender_source_camera(k, pw, ph, p.get("sensor_width", 36.0))
    return {
        "footage": str(path),
        "width": w,
        "height": h,
        "fps": f.fps,
        "frame_count": int(total),
        "processing_width": pw,
        "processing_height": ph,
        "focal_px": float(k[0, 0]),
        "K": k.tolist(),
        **blender,
    }


def blender_source_camera(k: np.ndarray, width: int, height: int, sensor_width: float = 36.0) -> dict:
    """The source camera as Blender camera data, for the add-on (which holds no camera convention):
    ``matrix_world`` (4x4, the pose of source frame 0 = the world origin) and lens/sensor/shift for ``k``."""
    from .. import cameras

    mw = cameras.opencv_to_blender_matrix_world(np.eye(4)[None])[0]
    return {
        "matrix_world": mw.tolist(),
        **cameras.intrinsics_to_blender(k, width, height, float(sensor_width), "HORIZONTAL"),
    }


def _count_video_frames(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for pkt in container.demux(stream) if pkt.size)


def hello(store: JobStore, models_dir: str | None, interrupted: list[dict]) -> dict:
    """Versions, devices, free VRAM and which models are present."""
    from .. import modelstore

    info: dict = {
        "protocol": protocol.PROTOCOL_VERSION,
        "backend_version": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "pid": os.getpid(),
        "torch": None,
        "cuda": False,
        "devices": [],
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = bool(torch.cuda.is_available())
        for i in range(torch.cuda.device_count() if info["cuda"] else 0):
            free, total = torch.cuda.mem_get_info(i)
            info["devices"].append(
                {"index": i, "name": torch.cuda.get_device_name(i), "total_vram": int(total), "free_vram": int(free)}
            )
    except Exception as exc:  # noqa: BLE001 - a broken torch is reported, not fatal
        info["torch_error"] = f"{type(exc).__name__}: {exc}"[:300]
    models = {}
    try:
        for name, spec in sorted(modelstore.all_specs().items()):
            missing = modelstore.missing_files(spec, models_dir)
            models[name] = {
                "present": not missing,
                "missing": len(missing),
                "repo_id": spec.repo_id,
                "purpose": spec.purpose,
            }
    except Exception as exc:  # noqa: BLE001
        info["models_error"] = f"{type(exc).__name__}: {exc}"[:300]
    try:
        from ..depth import MODELS as depth_models
    except Exception:  # noqa: BLE001
        depth_models = ("file",)
    counts: dict[str, int] = {}
    for j in store.list_jobs(limit=10000):
        counts[j["state"]] = counts.get(j["state"], 0) + 1
    info.update(
        {
            "models": models,
            "models_dir": str(modelstore.models_dir(models_dir)),
            "store": str(store.root),
            "allowed": [str(a) for a in store.allowed],
            "generators": list(protocol.GENERATORS),
            "depth_models": list(depth_models),
            "presets": list(protocol.PRESETS),
            "jobs": counts,
            "interrupted": [j["job"] for j in interrupted],
            "time": time.time(),
        }
    )
    return info


def check_job_file(job: object) -> tuple[str, dict]:
    """(type, params) of a job definition ``{"type": ..., "params": {...}}``; ProtocolError if invalid."""
    if not isinstance(job, dict) or not isinstance(job.get("type"), str):
        raise protocol.ProtocolError(protocol.INVALID_REQUEST, 'a job is {"type": ..., "params": {...}}')
    extra = set(job) - {"type", "params", "id", "protocol"}
    if extra:
        raise protocol.ProtocolError(
            protocol.INVALID_REQUEST,
            f"unknown job file field(s): {', '.join(sorted(map(str, extra)))[:200]}",
            hint='a job is {"type": ..., "params": {...}}',
        )
    if not isinstance(job.get("params", {}), dict):
        raise protocol.ProtocolError(protocol.INVALID_REQUEST, "the job's params must be an object", where="params")
    if job["type"] not in EXECUTORS:
        raise protocol.ProtocolError(
            protocol.UNKNOWN_TYPE, f"'{job['type'][:64]}' is not a job type", hint=f"job types: {', '.join(EXECUTORS)}"
        )
    params = job.get("params") or {}
    protocol.validate_params(job["type"], params)
    return job["type"], params


__all__ = ["BAD_INPUT", "Context", "EXECUTORS", "check_job_file", "hello", "probe_footage", "run_job"]
