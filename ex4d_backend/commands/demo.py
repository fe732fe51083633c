"""``ex4d demo``: the whole path on procedural footage with exact depth; no weights, no GPU needed.

Runs the same stages as ``ex4d recon`` and the service (through the job store). Writes into ``outputs/demo/``: the synthetic ``input.mp4`` and ``depth.npz``, the 90-degree orbit guide
(``color_90.mp4``, ``mask_90.mp4``, ``camera_90.npz``, ``DW-Mesh.ply``), the weight-free PREVIEW result
(``preview_90.mp4`` + ``preview_90/`` PNGs) and ``preview.png``: source | guide colour | guide mask | preview
for the first, middle and last frames.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from ..constants import NUM_FRAMES, RENDERER
from . import add_store_argument


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on a synthetic scene (no weights, no GPU)")
    p.add_argument("--output-dir", default="outputs/demo")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=288)
    p.add_argument("--frames", type=int, default=NUM_FRAMES)
    p.add_argument("--cam", default="90", help="camera preset (default: the 90-degree orbit)")
    p.add_argument("--renderer", choices=("auto", "cuda", "cpu"), default=RENDERER)
    p.add_argument("--fps", type=float, default=24.0)
    p.add_argument("--no-preview", action="store_true", help="stop after the guide (skip the preview generator)")
    add_store_argument(p)
    p.set_defaults(func=run)


def side_by_side(rows: list[list[np.ndarray]], labels: list[str]) -> np.ndarray:
    """A grid image (uint8 RGB) of equally sized tiles, with a caption bar over each column."""
    import cv2

    h, w = rows[0][0].shape[:2]
    bar = 22
    header = np.full((bar, w * len(labels), 3), 30, np.uint8)
    for i, text in enumerate(labels):
        cv2.putText(header, text, (i * w + 6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (235, 235, 235), 1, cv2.LINE_AA)
    tiles = [np.concatenate([t if t.ndim == 3 else np.repeat(t[..., None], 3, 2) for t in row], 1) for row in rows]
    return np.concatenate([header, *tiles], 0)


def run(args: argparse.Namespace) -> int:
    import cv2

    from ..atomic import atomic_path
    from ..footage import write_video
    from ..pipeline import stages
    from ..pipeline.settings import (
        DepthSettings,
        FrameSettings,
        GenerateSettings,
        IntrinsicsSettings,
        MeshSettings,
        RenderSettings,
    )
    from ..recon import copy_atomic, export_guide
    from ..synthetic import make_scene
    from .recon import StageBars, open_store

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # 1. The footage and its exact depth, as files: the demo then runs what `ex4d recon` runs on them.
    frames, depth, k = make_scene(args.width, args.height, args.frames)
    write_video(out / "input.mp4", frames, args.fps)
    with atomic_path(out / "depth.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, depth=depth)
    print(f"synthetic footage: {args.width}x{args.height}, {args.frames} frames -> {out / 'input.mp4'}")
    # 2. frames -> depth -> camera -> guide, in the job store.
    bars = StageBars()
    ctx = stages.Context(open_store(args.store), bars, input_check=stages.local_input)
    try:
        shot = stages.guide_for_shot(
            ctx,
            out / "input.mp4",
            FrameSettings(args.frames, None, args.fps),
            DepthSettings("file", str(out / "depth.npz")),
            IntrinsicsSettings(focal_px=float(k[0, 0]), fy=float(k[1, 1]), cx=float(k[0, 2]), cy=float(k[1, 2])),
            {"preset": str(args.cam).strip().lower()},
            MeshSettings(),
            RenderSettings(args.renderer),
            where="--cam",
        )
        cam = shot.guide.meta["camera"]
        videos = stages.guide_videos_stage(ctx, shot.guide).dir
        paths = export_guide(shot.guide.dir, videos, out, cam, mesh_of=(shot.clip, shot.depth, shot.k, shot.mesh))
        for key, path in paths.items():
            print(f"{key}: {path}")
        color, mask = shot.guide.arrays()
        source = np.asarray(shot.clip.frames)
        columns = [source, color, mask]
        labels = ["source", f"guide colour ({cam})", "guide mask"]
        # 3. The weight-free PREVIEW generator, as a generate stage.
        if not args.no_preview:
            gs = GenerateSettings(generator="preview", height=args.height, width=args.width)  # every frame (windows)
            result = stages.generate_stage(ctx, shot.clip, shot.guide, gs)
            for key, name in (("video", f"preview_{cam}.mp4"), ("frames", f"preview_{cam}")):
                src = result.dir / ("video.mp4" if key == "video" else "frames")
                print(f"preview {key}: {copy_atomic(src, out / name)}")
            columns.append(stages.read_png_folder(result.dir / "frames", 3))
            labels.append("PREVIEW result")
    finally:
        bars.close()
    picks = sorted({0, args.frames // 2, args.frames - 1})
    grid = side_by_side([[c[i] for c in columns] for i in picks], labels)
    with atomic_path(out / "preview.png") as tmp:
        cv2.imwrite(str(tmp), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    print(f"side-by-side: {out / 'preview.png'}  ({time.perf_counter() - start:.1f} s)")
    return 0
