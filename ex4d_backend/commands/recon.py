"""``ex4d recon``: footage + depth + camera -> colour/mask guide videos, camera file, optional mesh."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import Ex4dError

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
    p.add_argument("--frames", type=int, default=49, help="use the first N frames (0 = all; default 49)")
    p.add_argument("--max-side", type=int, default=1024, help="cap of the long side in pixels (0 = none)")
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
    p.add_argument("--renderer", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--mesh-filter", choices=("angle", "boundary"), default="angle", help="occlusion-face test")
    p.add_argument("--no-dwmesh", action="store_true", help="remove occlusion faces (non-watertight baseline)")
    p.add_argument("--fx", type=float, help="focal length in pixels at the processing resolution (default 500)")
    p.add_argument("--fy", type=float, help="default: --fx")
    p.add_argument("--cx", type=float, help="principal point, pixels (default W/2)")
    p.add_argument("--cy", type=float, help="principal point, pixels (default H/2)")
    p.add_argument("--focal-mm", type=float, help="focal length in mm (with --sensor-width), instead of --fx")
    p.add_argument("--sensor-width", type=float, default=36.0, help="sensor width in mm (default 36)")
    p.add_argument("--models-dir", help="models folder for --depth-model")
    p.add_argument("--depth-cache", help="depth cache folder for --depth-model (default: user cache)")
    p.set_defaults(func=run)


def intrinsics_from_args(args: argparse.Namespace, width: int, height: int):
    from ..cameras import intrinsics_from_focal

    if args.fx is not None and args.focal_mm is not None:
        raise Ex4dError(
            "give the focal length either in pixels (--fx) or in mm (--focal-mm), not both",
            where="--fx/--focal-mm",
            hint="drop one of them",
        )
    k = intrinsics_from_focal(
        width, height, focal_mm=args.focal_mm, sensor_width_mm=args.sensor_width, focal_px=args.fx
    )
    if args.fy is not None:
        k[1, 1] = args.fy
    if args.cx is not None:
        k[0, 2] = args.cx
    if args.cy is not None:
        k[1, 2] = args.cy
    return k


def check_camera_arg(cam: str) -> str:
    """Validate --cam before any work; returns the output name (<cam>)."""
    from ..camera_paths import camera_spec_name

    if cam.lower().endswith((".json", ".npz")):
        if not Path(cam).is_file():
            raise Ex4dError("camera file not found", where=cam, code="not_found")
    return camera_spec_name(cam)  # raises the clear error for an unknown preset


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..depth_io import load_depth
    from ..footage import read_footage
    from ..recon import run_recon, write_recon_outputs

    cam_name = check_camera_arg(args.cam)
    if args.stereo:
        parse_stereo(args.stereo)  # before any work
    if args.frames < 0:
        raise Ex4dError("--frames must be >= 0", where="--frames")
    footage = read_footage(args.input, max_frames=args.frames or None, max_side=args.max_side or None, fps=args.fps)
    t = len(footage.frames)
    if args.frames and t < args.frames:
        log.warning("the footage has %d frames; using all of them (asked for %d)", t, args.frames)
    w, h = footage.size
    k = intrinsics_from_args(args, w, h)
    source = None
    if args.source_camera:  # validated before the depth work
        from ..camera_paths import load_source_camera

        source = load_source_camera(args.source_camera, t, w, h, default_k=k)
    if args.depth:
        depth = load_depth(
            args.depth,
            kind=args.depth_kind,
            size=(w, h),
            n_frames=t,
            total_frames=footage.total_frames,
            repair=args.repair_depth,
            scale=args.depth_scale,
        )
    else:
        from ..depth import estimate_cached

        depth_bar: list = []  # opened with the first depth step: errors never share a line with a bar

        def depth_progress(stage: str, step: int, total: int, message: str = "") -> None:
            if not depth_bar:
                depth_bar.append(tqdm(desc="depth", unit="step", leave=False, total=total))
            depth_bar[0].total = total
            depth_bar[0].n = step
            depth_bar[0].set_postfix_str(f"{stage} {message}"[:40])
            depth_bar[0].refresh()

        try:
            depth = estimate_cached(
                footage.path,
                footage.frames,
                args.depth_model,
                args.depth_cache,
                models_dir=args.models_dir,
                progress=depth_progress,
            ).depth
        finally:
            for bar in depth_bar:
                bar.close()
    # The render bar starts with the first render step, i.e. after the camera and renderer are validated,
    # so an error message never lands on the same terminal line as a progress bar.
    render_bar: list = []

    def progress(stage: str, step: int, total: int, message: str = "") -> None:
        if not render_bar:
            render_bar.append(tqdm(desc="render", unit="chunk", leave=False, total=total))
        render_bar[0].total = total
        render_bar[0].n = step
        render_bar[0].refresh()

    scale = source_depth_scale(args, source, depth, t)
    try:
        guide = run_recon(
            footage.frames,
            depth,
            args.cam,
            k=k,
            renderer=args.renderer,
            mesh_filter=args.mesh_filter,
            use_dwmesh=not args.no_dwmesh,
            keep_mesh0=args.save_mesh,
            progress=progress,
            source_camera=source,
            depth_scale=scale,
            fps=footage.fps,
        )
    finally:
        for bar in render_bar:
            bar.close()
    if not guide.frame0_is_source:
        log.warning("the novel camera does not start at the source camera: guide frame 0 is rendered (with holes)")
    paths = write_recon_outputs(guide, args.output_dir, cam_name, footage.fps, png=args.png, save_mesh=args.save_mesh)
    if args.exr:  # compositing passes (issue 18): colour, mask as alpha, the DW-mesh's depth as Z
        from ..passes import recon_passes, write_exr_sequence

        k_src = k if source is None else source.intrinsics
        ps = recon_passes(footage.frames, depth, guide.camera, k_src, source=source, depth_scale=scale,
                          renderer=args.renderer, mesh_filter=args.mesh_filter)  # fmt: skip
        paths["exr_frames"] = write_exr_sequence(Path(args.output_dir) / f"exr_{cam_name}", ps)
    for eye, eye_cam in stereo_cameras(args.stereo, guide.camera):  # issue 18: both eyes from one DW-mesh
        g = run_recon(footage.frames, depth, eye_cam, k=k, renderer=args.renderer, mesh_filter=args.mesh_filter,
                      use_dwmesh=not args.no_dwmesh, source_camera=source, depth_scale=scale, fps=footage.fps)  # fmt: skip
        for key, path in write_recon_outputs(
            g, args.output_dir, f"{cam_name}_{eye}", footage.fps, png=args.png
        ).items():
            paths[f"{eye}_{key}"] = path
    for key, path in paths.items():
        print(f"{key}: {path}")
    return 0


def source_depth_scale(args: argparse.Namespace, source, depth, n_frames: int):
    """The depth's scale to the source camera's world: fitted to --bundles, else --source-scale."""
    from ..depth_scale import ScaleFit, fit_depth_scale, load_bundles

    if not args.bundles:
        return ScaleFit.manual(args.source_scale).scale
    if source is None:
        raise Ex4dError("--bundles needs --source-camera (the solve's camera path)", where="--bundles")
    fit = fit_depth_scale(load_bundles(args.bundles, n_frames), source, depth, per_frame=args.per_frame_scale)
    log.info("depth scale %.6g from %d bundle observations, residual %.1f %%", fit.scale, fit.n_obs, 100 * fit.residual)
    for w in fit.warnings:
        log.warning("depth scale: %s", w)
    return fit.scales(n_frames)


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
