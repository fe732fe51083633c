"""Job executors: one per request type, each a thin adapter over the pipeline's stages.

A job is ``{"type": ..., "params": {...}}`` (the request without its id); ``ex4d run JOB.json`` and
``ex4d serve`` both call :func:`run_job`, so a job gives the same outputs wherever it runs, and
``ex4d recon`` calls the same stages (``pipeline.stages``: what each stage's cache key holds), so a camera
change reuses frames and depth, and the CLI reuses what the service computed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import BAD_INPUT, Ex4dError
from ..pipeline import stages
from ..pipeline.settings import (
    DepthSettings,
    FrameSettings,
    GenerateSettings,
    IntrinsicsSettings,
    MeshSettings,
    RenderSettings,
    SourceSettings,
)
from ..pipeline.stages import STAGE_VERSION, Context
from . import info, protocol, stereo_jobs
from .info import hello, probe_footage
from .jobstore import JobStore, make_key
from .meter_job import exec_meter

log = logging.getLogger("ex4d_backend.service")


# ----------------------------------------------------------------------------------------------
# Params -> stage calls
# ----------------------------------------------------------------------------------------------
def intrinsics(p: dict, width: int, height: int) -> np.ndarray:
    """The source camera's K (pixels, at the processing resolution) from ``focal_px`` or ``lens`` (mm)."""
    return IntrinsicsSettings.from_params(p).matrix(width, height)


def _clip_depth(ctx: Context, p: dict) -> tuple[stages.Clip, stages.Depth]:
    clip = stages.frames_stage(ctx, p["footage"], FrameSettings.from_params(p))
    return clip, stages.depth_stage(ctx, clip, DepthSettings.from_params(p["depth"]))


def _guide(ctx: Context, p: dict) -> tuple[stages.Clip, stages.GuideEntry]:
    shot = _shot(ctx, p)
    return shot.clip, shot.guide


def _shot(ctx: Context, p: dict) -> stages.Shot:
    return stages.guide_for_shot(
        ctx,
        p["footage"],
        FrameSettings.from_params(p),
        DepthSettings.from_params(p["depth"]),
        IntrinsicsSettings.from_params(p),
        p["camera"],
        MeshSettings.from_params(p),
        RenderSettings.from_params(p),
        SourceSettings.from_params(p),  # a moving source camera and the depth scale (issue 15)
    )


def _clip_result(clip: stages.Clip) -> dict:
    return {"n_frames": clip.n_frames, "width": clip.size[0], "height": clip.size[1], "fps": clip.fps}


# ----------------------------------------------------------------------------------------------
# Executors (one per job type)
# ----------------------------------------------------------------------------------------------
def exec_estimate_depth(ctx: Context, p: dict) -> dict:
    clip, depth = _clip_depth(ctx, p)
    return {
        "depth_npy": str(depth.dir / "depth.npy"),
        "frames_npy": str(clip.dir / "frames.npy"),
        "depth_min": depth.meta.get("depth_min"),
        "depth_max": depth.meta.get("depth_max"),
        **_clip_result(clip),
    }


def _viewport_stride(p: dict, width: int, height: int) -> int:
    """build_dwmesh's proxy stride: ``viewport_stride`` as given, else from ``viewport_detail`` (default full)."""
    from .. import viewport_proxy

    if p.get("viewport_stride") is not None:
        return int(p["viewport_stride"])
    return viewport_proxy.viewport_stride(width, height, p.get("viewport_detail", "full"))


def _viewport_result(meta: dict) -> dict:
    """The mesh grid in a build_dwmesh result (an entry cached before the proxy existed: the full grid)."""
    w, h = int(meta["width"]), int(meta["height"])
    return {
        "viewport_stride": int(meta.get("viewport_stride", 1)),
        "mesh_columns": meta.get("mesh_columns", list(range(w))),
        "mesh_rows": meta.get("mesh_rows", list(range(h))),
    }


def exec_build_dwmesh(ctx: Context, p: dict) -> dict:
    from ..cameras import CV_TO_BLENDER

    # the source camera's intrinsics (when given), as render_guide's mesh; the depth scale (manual or fitted to
    # the bundles) only comes back for the add-on, which scales the DW-mesh object by it (the mesh stays in depth units)
    src = stages.source_for_shot(
        ctx, p["footage"], FrameSettings.from_params(p), DepthSettings.from_params(p["depth"]),
        IntrinsicsSettings.from_params(p), SourceSettings(p.get("source_camera"), p.get("depth_scale", 1.0)),
    )  # fmt: skip
    clip, depth = src.clip, src.depth
    stride = _viewport_stride(p, depth.depth.shape[2], depth.depth.shape[1])
    mesh = stages.mesh_stage(ctx, clip, depth, src.setup.k, MeshSettings.from_params(p), viewport_stride=stride)
    d = mesh.dir
    return {
        **_viewport_result(mesh.meta),
        "positions_pc2": str(d / "positions.pc2"),
        "faces_npy": str(d / "faces.npy"),
        "occlusion_npy": str(d / "occlusion.npy"),
        "K": mesh.meta["K"],
        "n_vertices": mesh.meta["n_vertices"],
        "n_faces": mesh.meta["n_faces"],
        "cv_to_blender": np.asarray(CV_TO_BLENDER).tolist(),
        "source_camera": info.blender_source_camera(
            np.asarray(mesh.meta["K"]), *clip.size, IntrinsicsSettings.from_params(p).sensor_width
        ),
        "depth_npy": str(depth.dir / "depth.npy"),
        "frames_npy": str(clip.dir / "frames.npy"),
        "depth_scales": [float(v) for v in src.setup.scales],
        "depth_scale_fit": src.setup.fit,
        **_clip_result(clip),
    }


def exec_camera_preset(ctx: Context, p: dict) -> dict:
    from .. import cameras

    clip, depth = _clip_depth(ctx, p)
    w, h = clip.size
    k = intrinsics(p, w, h)
    sensor_width = float(p.get("sensor_width", IntrinsicsSettings.sensor_width))
    mesh = MeshSettings.from_params(p)  # as render_guide's preset, so both give the same path
    src = None
    if p.get("source_camera") is not None:  # the preset follows a moving source, as render_guide's (issue 15)
        src = stages.source_for_shot(
            ctx, p["footage"], FrameSettings.from_params(p), DepthSettings.from_params(p["depth"]),
            IntrinsicsSettings.from_params(p), SourceSettings(p["source_camera"], p.get("depth_scale", 1.0)),
        ).setup  # fmt: skip
        k = src.k0
    cam = stages.camera_stage(ctx, clip, depth, k, {"preset": p["preset"]}, mesh, where="params.preset", source=src)
    mw = cameras.opencv_to_blender_matrix_world(cam.path.extrinsics)
    lens = [cameras.intrinsics_to_blender(kk, w, h, sensor_width, "HORIZONTAL") for kk in cam.path.intrinsics]
    return {
        "preset": p["preset"],
        "matrix_world": np.asarray(mw).tolist(),
        "lens": [b["lens"] for b in lens],
        **{f: lens[0][f] for f in ("sensor_width", "sensor_height", "sensor_fit", "shift_x", "shift_y")},
        "camera_npz": str(cam.dir / "camera.npz"),
        **_clip_result(clip),
    }


def exec_render_guide(ctx: Context, p: dict) -> dict:
    shot = _shot(ctx, p)
    clip, guide = shot.clip, shot.guide
    extras = stereo_jobs.guide_extras(ctx, p, shot) if ("stereo" in p or p.get("exr")) else {}  # issue 18
    return {
        **stereo_jobs.guide_fields(ctx, guide, bool(p.get("videos"))),  # files, camera hash, unseen share
        "camera": guide.meta["camera"],
        "frame0_is_source": guide.meta.get("frame0_is_source", True),
        "depth_scale_fit": guide.meta.get("depth_scale_fit", {}),
        **_clip_result(clip),
        **extras,
    }


def exec_generate(ctx: Context, p: dict) -> dict:
    from ..generation.windows import check_settings

    gs = GenerateSettings.from_params(p)
    check_settings(gs.shot_settings())  # window, overlap, sampling, size: before any stage runs
    if "stereo" in p or "eye" in p or p.get("exr"):  # issue 18: per eye, side by side, EXR passes
        return stereo_jobs.exec_generate(ctx, p, _shot(ctx, p), generate_payload)
    clip, guide = _guide(ctx, p)
    if p.get("upto_window") is not None:  # a farm step of a long shot: windows 0..k into the store
        return {**stages.generate_windows_stage(ctx, guide, gs, int(p["upto_window"])), "guide_dir": str(guide.dir)}
    return generate_payload(stages.generate_stage(ctx, clip, guide, gs), guide)


def generate_payload(gen: stages.GenerateEntry, guide: stages.GuideEntry) -> dict:
    """The result fields of one generate stage entry."""
    d, meta = gen.dir, gen.meta
    return {
        "frames_dir": str(d / "frames"),
        "video_mp4": str(d / "video.mp4"),
        "composite_dir": str(d / "composite"),
        "composite_mp4": str(d / "composite.mp4"),
        "n_frames": meta["n_frames"],
        "width": meta["width"],
        "height": meta["height"],
        "size": meta["size"],
        "composite_size": (meta.get("composite") or {}).get("size"),
        "fps": meta["fps"],
        "source_frames": meta["source_frames"],
        "plan": meta["plan"],
        "windows": meta["windows"],
        "camera_hash": meta["camera_hash"],
        "settings": meta["settings"],
        "guide_dir": str(guide.dir),
    }


EXECUTORS = {
    "estimate_depth": exec_estimate_depth,
    "build_dwmesh": exec_build_dwmesh,
    "camera_preset": exec_camera_preset,
    "render_guide": exec_render_guide,
    "generate": exec_generate,
    "meter": exec_meter,  # the disocclusion meter (meter_job.py)
}
FORCED_STAGE = {
    "estimate_depth": "depth",
    "build_dwmesh": "mesh",
    "camera_preset": "camera",
    "render_guide": "guide",
    "generate": "generate",
    "meter": "meter",
}


def job_key(store: JobStore, type_: str, params: dict) -> str:
    """The job's key: its type and params with every input path replaced by the input's content hash
    (so a moved file still hits; an edited one never does). Checks the input paths."""
    canon = {k: v for k, v in params.items() if k != "force"}
    canon["footage"] = store.input_hash(store.check_input(params["footage"], "footage"))
    depth = dict(params["depth"])
    if depth.get("model") == "file" and "path" in depth:
        depth["path"] = store.input_hash(store.check_input(depth["path"], "depth file"))
    canon["depth"] = depth
    for name, what in (("camera", "camera file"), ("source_camera", "camera file"), ("depth_scale", "bundle file")):
        value = params.get(name)
        if isinstance(value, dict) and "file" in value:
            canon[name] = {**value, "file": store.input_hash(store.check_input(value["file"], what))}
    return make_key(STAGE_VERSION, type_, canon)


def touch_result(store: JobStore, result: dict) -> None:
    """Record a use of every stage entry a stored job result points into (``cache/<stage>-<key>/...``)."""
    from ..pipeline import housekeeping

    cache = store.root / "cache"
    for value in result.values():
        if isinstance(value, str) and value.startswith(str(cache)):
            rel = Path(value).relative_to(cache).parts
            if rel and "-" in rel[0]:
                housekeeping.touch(store, *rel[0].split("-", 1))


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
            touch_result(ctx.store, cached)
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
    from ..pipeline import housekeeping

    try:
        housekeeping.enforce_limit(ctx.store)  # the store's size limit, least recently used first
    except OSError as exc:  # housekeeping never fails a job
        log.warning("store clean-up failed: %s", exc)
    return payload


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


__all__ = [
    "BAD_INPUT",
    "Context",
    "EXECUTORS",
    "STAGE_VERSION",
    "info",
    "check_job_file",
    "hello",
    "probe_footage",
    "run_job",
]
