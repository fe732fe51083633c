"""``ex4d recon``: footage + depth + camera -> colour/mask guide videos, camera file, optional mesh."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from ..constants import BORDER_DEPTH, MAX_SIDE, MESH_FILTER, NUM_FRAMES, RENDERER, SENSOR_WIDTH_MM
from ..errors import Ex4dError
from ..pipeline.settings import (
    DepthSettings,
    FrameSettings,
    IntrinsicsSettings,
    MeshSettings,
    RenderSettings,
    SourceSettings,
)
from . import add_store_argument

log = logging.getLogger("ex4d")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "recon",
        help="render the colour/mask guide of a novel camera",
        description="Footage + depth -> DW-mesh -> colour and occlusion-mask guide videos seen from a new camera.",
    )
    p.add_argument("--input", required=True, help="video file or image-sequence folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--depth", help="depth/disparity file: .npy/.npz (T,H,W) or a folder of EXR / 16-bit PNG")
    src.add_argument("--depth-model", help="estimate depth: depthcrafter, depth-anything-v2[-small|-base|-large]")
    p.add_argument("--depth-kind", choices=("depth", "disparity"), default="depth", help="what --depth holds")
    p.add_argument("--depth-scale", type=float, default=1.0, help="multiply file depth by this (e.g. 0.001 for mm)")
    p.add_argument("--repair-depth", action="store_true", help="fill NaN/inf/non-positive depth from neighbours")
    for flag, what in (("scale", "depth' = SCALE * depth + OFFSET"), ("offset", "(see --adjust-scale)"),
                       ("near", "clip nearer depths to NEAR"), ("far", "clip farther depths to FAR")):  # fmt: skip
        p.add_argument(f"--adjust-{flag}", type=float, default=None, help=f"depth tools: {what} (any depth source)")
    p.add_argument(
        "--cam",
        default="90",
        help="preset (30, 60, 90, 180, any angle, zoom_in, zoom_out; relative to the source camera), "
        "lock_off[:FRAME], stabilize[:SECONDS], or a .json/.npz world-space camera file",
    )
    p.add_argument(
        "--source-camera",
        help="the source camera path (.json/.npz: extrinsics (N,4,4) OpenCV world-to-camera in --cam's world, "
        "intrinsics (3,3) or (N,3,3)); default: a static source at the origin (the reference)",
    )
    p.add_argument("--bundles", help="the camera solve's 3D bundles (.json/.npz) to fit the depth's scale to")
    p.add_argument("--per-frame-scale", action="store_true", help="fit the depth scale per frame (with --bundles)")
    p.add_argument(
        "--source-scale", type=float, default=1.0, help="depth units -> source camera world units (without --bundles)"
    )
    p.add_argument("--output-dir", required=True, help="folder for the outputs (created)")
    p.add_argument(
        "--frames", type=int, default=NUM_FRAMES, help=f"use the first N frames (0 = all; default {NUM_FRAMES})"
    )
    p.add_argument("--max-side", type=int, default=MAX_SIDE, help="cap of the long side in pixels (0 = none)")
    p.add_argument("--fps", type=float, default=None, help="frame rate of image sequences / outputs")
    p.add_argument("--save-mesh", action="store_true", help="also write DW-Mesh.ply (frame 0)")
    p.add_argument("--png", action="store_true", help="also write PNG sequences color_<cam>/ and mask_<cam>/")
    p.add_argument("--exr", action="store_true", help="also write exr_<cam>/: EXR frames with RGB, A = mask, Z")
    p.add_argument(
        "--stereo",
        metavar="IOD[:CONV[:MODE]]",
        help="also render the left/right eyes' guides (<cam>_left, <cam>_right): interocular distance and "
        "convergence distance in world units, mode OFFAXIS (default), PARALLEL or TOE (Blender's conventions)",
    )
    p.add_argument("--renderer", choices=("auto", "cuda", "cpu"), default=RENDERER)
    p.add_argument("--mesh-filter", choices=("angle", "boundary"), default=MESH_FILTER, help="occlusion-face test")
    p.add_argument("--no-dwmesh", action="store_true", help="remove occlusion faces (non-watertight baseline)")
    p.add_argument("--fx", type=float, help="focal length in pixels at the processing resolution (default 500)")
    p.add_argument("--fy", type=float, help="default: --fx")
    p.add_argument("--cx", type=float, help="principal point, pixels (default W/2)")
    p.add_argument("--cy", type=float, help="principal point, pixels (default H/2)")
    p.add_argument("--focal-mm", type=float, help="focal length in mm (with --sensor-width), instead of --fx")
    p.add_argument("--sensor-width", type=float, default=SENSOR_WIDTH_MM, help="sensor width in mm (default 36)")
    p.add_argument("--models-dir", help="models folder for --depth-model")
    p.add_argument(
        "--depth-cache", help="ignored (kept for old scripts): estimated depth is kept in the job store (--store)"
    )
    add_store_argument(p)
    p.set_defaults(func=run)


def intrinsics_from_args(args: argparse.Namespace) -> IntrinsicsSettings:
    """The source camera's settings from --fx/--fy/--cx/--cy or --focal-mm/--sensor-width."""
    if args.fx is not None and args.focal_mm is not None:
        raise Ex4dError(
            "give the focal length either in pixels (--fx) or in mm (--focal-mm), not both",
            where="--fx/--focal-mm",
            hint="drop one of them",
        )
    return IntrinsicsSettings(
        focal_px=args.fx,
        lens=args.focal_mm,
        sensor_width=args.sensor_width,
        sensor_fit="HORIZONTAL",
        fy=args.fy,
        cx=args.cx,
        cy=args.cy,
    )


def check_camera_arg(cam: str) -> str:
    """Validate --cam before any work; returns the output name (<cam>)."""
    from ..camera_paths import camera_spec_name

    if cam.lower().endswith((".json", ".npz")):
        if not Path(cam).is_file():
            raise Ex4dError("camera file not found", where=cam, code="not_found")
    return camera_spec_name(cam)  # raises the clear error for an unknown preset


def source_from_args(args: argparse.Namespace) -> SourceSettings:
    """The moving source's settings: --source-camera FILE and the depth scale (--bundles [--per-frame-scale]
    fitted, else --source-scale); the flags are checked before any work."""
    from ..depth_scale import ScaleFit

    if args.bundles and not args.source_camera:
        raise Ex4dError("--bundles needs --source-camera (the solve's camera path)", where="--bundles")
    for flag, path in (("--source-camera", args.source_camera), ("--bundles", args.bundles)):
        if path and not Path(path).is_file():
            raise Ex4dError(f"{flag[2:].replace('-', ' ')} file not found", where=path, code="not_found")
    if args.bundles:
        scale = {"file": str(args.bundles), "per_frame": bool(args.per_frame_scale)}
    else:
        scale = ScaleFit.manual(args.source_scale).scale
    return SourceSettings({"file": str(args.source_camera)} if args.source_camera else None, scale)


class StageBars:
    """tqdm bars for the stages' progress on stderr; a bar opens with a stage's first multi-step report,
    so an error message never shares a terminal line with a bar."""

    def __init__(self) -> None:
        self.bars: dict = {}

    def __call__(self, stage: str, step: int, total: int, message: str = "") -> None:
        from tqdm import tqdm

        if total <= 1 and stage not in self.bars:
            return
        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(desc=stage, unit="step", leave=False, total=total)
        bar.total = total
        bar.n = step
        bar.refresh()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def open_store(path: str | None):
    """The job store the CLI computes in (``--store``; default the user cache's), any input allowed."""
    from ..service.jobstore import JobStore

    anywhere = sorted({Path(Path.cwd().anchor), Path(Path.home().anchor)})  # the file system's roots
    return JobStore(path, allowed=anywhere)  # the CLI reads what its user names (the service sandboxes)


def run(args: argparse.Namespace) -> int:
    from ..pipeline import stages
    from ..pipeline.camera import spec_from_arg
    from ..recon import export_guide

    cam_name = check_camera_arg(args.cam)
    if args.stereo:
        parse_stereo(args.stereo)  # before any work
    if args.frames < 0:
        raise Ex4dError("--frames must be >= 0", where="--frames")
    intrinsics = intrinsics_from_args(args)  # flag conflicts are reported before any work
    source = source_from_args(args)
    store = open_store(args.store)
    bars = StageBars()
    ctx = stages.Context(store, bars, args.models_dir, input_check=stages.local_input)
    try:
        if args.depth:
            depth_s = DepthSettings(
                "file", str(args.depth), args.depth_kind, bool(args.repair_depth), float(args.depth_scale)
            )
        else:
            depth_s = DepthSettings(args.depth_model)
        adjust = {k: getattr(args, f"adjust_{k}") for k in ("scale", "offset", "near", "far")}
        depth_s = dataclasses.replace(depth_s, adjust={k: v for k, v in adjust.items() if v is not None})
        shot = stages.guide_for_shot(
            ctx,
            args.input,
            FrameSettings(args.frames, args.max_side or None, args.fps),
            depth_s,
            intrinsics,
            spec_from_arg(args.cam),
            MeshSettings(args.mesh_filter, BORDER_DEPTH),
            RenderSettings(args.renderer, not args.no_dwmesh),
            source,
            where="--cam",
            where_source=("--source-camera", "--bundles"),
        )
        if args.frames and shot.clip.n_frames < args.frames:
            log.warning("the footage has %d frames; using all of them (asked for %d)", shot.clip.n_frames, args.frames)
        for fit_warning in shot.source.fit.get("warnings", []):
            log.warning("depth scale: %s", fit_warning)
        eyes = []
        for eye, eye_cam in stereo_cameras(args.stereo, shot.camera.path):  # issue 18: both eyes, one DW-mesh
            cam = stages.camera_stage(ctx, shot.clip, shot.depth, shot.k, eye_cam, shot.mesh, source=shot.source)
            render = RenderSettings(args.renderer, not args.no_dwmesh)
            guide = stages.guide_stage(ctx, shot.clip, shot.depth, shot.k, cam, shot.mesh, render, shot.source)
            eyes.append((eye, guide, stages.guide_videos_stage(ctx, guide)))
        videos = stages.guide_videos_stage(ctx, shot.guide)  # the exported videos
    finally:
        bars.close()
    if not shot.guide.meta.get("frame0_is_source", True):
        log.warning("the novel camera does not start at the source camera: guide frame 0 is rendered (with holes)")
    mesh_of = (shot.clip, shot.depth, shot.k, shot.mesh) if args.save_mesh else None
    paths = export_guide(shot.guide.dir, videos.dir, args.output_dir, cam_name, png=args.png, mesh_of=mesh_of)
    if args.exr:  # compositing passes (issue 18): colour, mask as alpha, the DW-mesh's depth as Z
        from ..passes import recon_passes, write_exr_sequence

        src = shot.source
        ps = recon_passes(shot.clip.frames, shot.depth.depth, shot.camera.path, src.k,
                          source=src.path, depth_scale=src.scales, renderer=args.renderer,
                          mesh_filter=args.mesh_filter)  # fmt: skip
        paths["exr_frames"] = write_exr_sequence(Path(args.output_dir) / f"exr_{cam_name}", ps)
    for eye, guide, eye_videos in eyes:
        for key, path in export_guide(
            guide.dir, eye_videos.dir, args.output_dir, f"{cam_name}_{eye}", png=args.png
        ).items():
            paths[f"{eye}_{key}"] = path
    for key, path in paths.items():
        print(f"{key}: {path}")
    return 0


def parse_stereo(spec: str) -> tuple[float, float, str]:
    """(interocular, convergence, mode) of ``--stereo IOD[:CONV[:MODE]]``, validated."""
    from ..stereo import DEFAULT_CONVERGENCE, MODES

    parts = spec.split(":")
    try:
        iod = float(parts[0])
        conv = float(parts[1]) if len(parts) > 1 and parts[1] else DEFAULT_CONVERGENCE
    except ValueError:
        iod = conv = float("nan")
    mode = parts[2].upper() if len(parts) > 2 else "OFFAXIS"
    if not (iod > 0 and conv > 0 and mode in MODES and len(parts) <= 3):
        raise Ex4dError(
            f"bad --stereo '{spec}'", where="--stereo", hint="write IOD[:CONV[:MODE]], e.g. 0.065:1.95:OFFAXIS"
        )
    return iod, conv, mode


def stereo_cameras(spec: str | None, centre):
    """[(eye name, CameraPath)] for ``--stereo IOD[:CONV[:MODE]]`` (empty without it)."""
    if not spec:
        return []
    from ..stereo import eye_cameras

    left, right = eye_cameras(centre, *parse_stereo(spec))
    return [("left", left), ("right", right)]
