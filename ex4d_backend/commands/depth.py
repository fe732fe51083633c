"""``ex4d depth``: estimate a depth video for footage and write it as .npz / .npy (+ optional preview)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..constants import MAX_SIDE, SENSOR_WIDTH_MM

log = logging.getLogger("ex4d.depth")

MODEL_CHOICES = (
    "depthcrafter",
    "depth-anything-v2",
    "depth-anything-v2-small",
    "depth-anything-v2-base",
    "depth-anything-v2-large",
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "depth",
        help="estimate a depth video for footage (DepthCrafter or Depth Anything V2)",
        description=(
            "Estimate depth for every frame of a video or image sequence. The .npz output holds "
            "'depth' (float32 (T,H,W), scene units: the EX-4D reference mapping of disparity, nearest "
            "surface ~2.56), 'disparity' (float32 (T,H,W), relative, 0..1, 1 = nearest) and "
            "'intrinsics' (3x3, pixels), at the processing size (long side capped by --max-side). "
            "Results are cached per footage content."
        ),
    )
    p.add_argument("--input", "-i", required=True, help="video file or image-sequence folder")
    p.add_argument("--output", "-o", required=True, help="output .npz (depth + disparity) or .npy (depth)")
    p.add_argument(
        "--model", "-m", default="depthcrafter", choices=MODEL_CHOICES, help="depth model (default: %(default)s)"
    )
    p.add_argument("--models-dir", help="models directory (default: $EX4D_MODELS_DIR or ~/.cache/ex4d/models)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cuda, cuda:N or cpu")
    p.add_argument("--max-frames", type=int, default=None, help="use only the first N frames")
    p.add_argument(
        "--max-side", type=int, default=MAX_SIDE, help=f"cap of the long side in pixels (default: {MAX_SIDE})"
    )
    g = p.add_argument_group("DepthCrafter")
    g.add_argument("--steps", type=int, help="denoising steps (default 5)")
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale (default 1.0: none)")
    g.add_argument("--window", type=int, help="frames per window (default 110)")
    g.add_argument("--overlap", type=int, help="frames shared by consecutive windows (default 25)")
    g.add_argument("--seed", type=int, help="noise seed (default 42)")
    g.add_argument("--max-res", type=int, help="long side DepthCrafter runs at (default 1024, multiple of 64)")
    g.add_argument("--cpu-offload", action="store_true", help="less GPU memory, slower")
    g = p.add_argument_group("Depth Anything V2")
    g.add_argument("--no-align", action="store_true", help="skip the temporal scale/shift alignment")
    g = p.add_argument_group("intrinsics (written to the .npz as 'intrinsics', pixels at the output size)")
    f = g.add_mutually_exclusive_group()
    f.add_argument("--focal-px", type=float, help="focal length in pixels (default: the reference's 500)")
    f.add_argument("--focal-mm", type=float, help="focal length in mm, with --sensor-width")
    g.add_argument("--sensor-width", type=float, default=SENSOR_WIDTH_MM, help="sensor width in mm (default 36)")
    g = p.add_argument_group("cache and outputs")
    g.add_argument("--cache-dir", help="depth cache folder (default: $EX4D_CACHE_DIR/depth or ~/.cache/ex4d/depth)")
    g.add_argument("--no-cache", action="store_true", help="neither read nor write the depth cache")
    g.add_argument("--refresh", action="store_true", help="recompute and overwrite the cached result")
    g.add_argument("--preview", help="also write the disparity as a greyscale .mp4 (white = near)")
    g.add_argument("--json", action="store_true", help="print progress and the result as JSON lines on stdout")
    p.set_defaults(func=run)


def _options(args: argparse.Namespace) -> dict:
    if args.model == "depthcrafter":
        keys = {
            "steps": args.steps,
            "guidance": args.guidance,
            "window": args.window,
            "overlap": args.overlap,
            "seed": args.seed,
            "max_res": args.max_res,
        }
        opts = {k: v for k, v in keys.items() if v is not None}
        if args.cpu_offload:
            opts["cpu_offload"] = True
        return opts
    return {"align": "none"} if args.no_align else {}


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from .. import depth
    from ..atomic import atomic_path
    from ..errors import Ex4dError
    from ..footage import read_footage, write_video

    out = Path(args.output)
    if out.suffix.lower() not in (".npz", ".npy"):
        raise Ex4dError(f"unsupported output '{out.suffix}'", where="--output", hint="use a .npz or .npy path")
    if args.preview and Path(args.preview).suffix.lower() != ".mp4":
        raise Ex4dError("the preview must be an .mp4 path", where="--preview")
    footage = read_footage(args.input, max_frames=args.max_frames, max_side=args.max_side)
    opts = _options(args)
    last = {"pct": -1}

    def progress(stage: str, step: int, total: int, message: str) -> None:
        if args.json:
            print(
                json.dumps({"event": "progress", "stage": stage, "step": step, "total": total, "message": message}),
                flush=True,
            )
            return
        pct = int(100 * step / max(total, 1))
        if pct != last["pct"]:
            last["pct"] = pct
            print(f"{stage}: {pct:3d}%  {message}", file=sys.stderr, flush=True)

    common = {"models_dir": args.models_dir, "device": args.device, "progress": progress, **opts}
    common.update(focal_px=args.focal_px, focal_mm=args.focal_mm, sensor_width_mm=args.sensor_width)
    if args.no_cache:
        result = depth.estimate(footage.frames, args.model, **common)
    else:
        result = depth.estimate_cached(
            footage.path, footage.frames, args.model, args.cache_dir, refresh=args.refresh, **common
        )
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as fh:
            if out.suffix.lower() == ".npy":
                np.save(fh, result.depth)
            else:
                np.savez(
                    fh,
                    depth=result.depth,
                    disparity=result.disparity,
                    intrinsics=result.intrinsics,
                    fps=np.float32(footage.fps),
                )
    if args.preview:
        write_video(args.preview, (np.clip(result.disparity, 0, 1) * 255 + 0.5).astype(np.uint8), footage.fps)
    t, h, w = result.depth.shape
    summary = {
        "event": "done",
        "output": str(out),
        "model": result.model,
        "frames": t,
        "size": [w, h],
        "cached": result.cached,
        "depth_range": [float(result.depth.min()), float(result.depth.max())],
    }
    if args.json:
        print(json.dumps(summary), flush=True)
    else:
        print(f"wrote {out}: {t} frames {w}x{h}, model {result.model}" + (" (cached)" if result.cached else ""))
    return 0
