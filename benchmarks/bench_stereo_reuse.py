"""Stereo second-eye consistency (issue 18): both eyes generated independently vs the right eye conditioned on
the left eye's result (``stereo.second_eye = reuse_first``), through the service's job path (``run_job``).

    .venv/bin/python benchmarks/bench_stereo_reuse.py [--tiny] [--generator ex4d|preview] [--models-dir DIR]
        [--steps 25] [--out results.json]

Scene: ``ex4d_backend.synthetic`` (wall, card, sphere; exact depth) at 512 x 512 x 49 (``--tiny``: 64 x 48 x 5,
a logic check on the CPU with the preview generator), the novel camera the 30-degree orbit preset, an off-axis
pair (interocular 0.15, convergence 3 scene units). Metric per mode, on the generated frames:
``shared_unseen``: mean |R - warp(L)| (grey levels, RGB) over right-eye pixels the right guide never saw but
the left eye's result lands on (warped by the left eye's Z pass from the DW-mesh); ``seen``: the same over
pixels both guides saw (the model's own left/right agreement where the guide fixes the content); also the
pixel counts and the seconds per mode. Lower ``shared_unseen`` = more consistent eyes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from ex4d_backend import synthetic
from ex4d_backend.footage import write_png_sequence
from ex4d_backend.passes import read_exr_channels
from ex4d_backend.pipeline import guide_files
from ex4d_backend.pipeline.stages import Context
from ex4d_backend.pipeline.stereo_stage import warp_to_eye
from ex4d_backend.service.jobs import run_job
from ex4d_backend.service.jobstore import JobStore


def consistency(r: dict) -> dict:
    """|R - warp(L)| on the right eye's unseen-but-reached pixels and on pixels both guides saw."""
    left = guide_files.read_png_folder(Path(r["left_frames_dir"]), 3).astype(np.float64)
    right = guide_files.read_png_folder(Path(r["right_frames_dir"]), 3).astype(np.float64)
    lz = np.stack([read_exr_channels(f)["Z"] for f in sorted(Path(r["left_exr_dir"]).glob("*.exr"))])
    gl, gr = Path(r["eyes"]["left"]["guide_dir"]), Path(r["eyes"]["right"]["guide_dir"])
    with np.load(gl / "camera.npz") as lc, np.load(gr / "camera.npz") as rc:
        t = len(lc["extrinsics"])
        lk, le, rk, re_ = (np.broadcast_to(a, (t, *a.shape[-2:])) for a in
                           (lc["intrinsics"], lc["extrinsics"], rc["intrinsics"], rc["extrinsics"]))  # fmt: skip
    lmask = guide_files.read_png_folder(gl / "mask", 1)
    rmask = guide_files.read_png_folder(gr / "mask", 1)
    h, w = rmask.shape[1:]
    if left.shape[1:3] != (h, w):
        raise SystemExit("generate at the guide's size (--width/--height = the footage's) for this metric")
    unseen, seen = [], []
    for j, tt in enumerate(r["source_frames"]):
        warped, hit = warp_to_eye(left[j].astype(np.uint8), lz[j], lk[tt], le[tt], rk[tt], re_[tt])
        border = np.zeros((h, w), bool)
        border[4:-4, 4:-4] = True
        diff = np.abs(right[j] - warped).mean(-1)
        unseen.append(diff[hit & border & (rmask[tt] == 0)])
        seen.append(diff[hit & border & (rmask[tt] == 255) & (lmask[tt] == 255)])
    u, s = np.concatenate(unseen), np.concatenate(seen)
    return {"shared_unseen": round(float(u.mean()), 3) if u.size else None, "shared_unseen_px": int(u.size),
            "seen": round(float(s.mean()), 3) if s.size else None, "seen_px": int(s.size)}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="64 x 48 x 5 frames (a CPU logic check)")
    ap.add_argument("--generator", default="ex4d", choices=["ex4d", "preview"])
    ap.add_argument("--models-dir", default=None)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--renderer", default="auto")
    ap.add_argument("--out", default="bench_stereo_reuse.json")
    args = ap.parse_args()
    w, h, t = (64, 48, 5) if args.tiny else (512, 512, 49)
    frames, depth, k = synthetic.make_scene(w, h, t)
    root = Path(tempfile.mkdtemp(prefix="ex4d_stereo_bench_"))
    write_png_sequence(root / "clip", frames)
    np.save(root / "depth.npy", depth)
    store = JobStore(root / "store", allowed=[root])
    ctx = Context(store, models_dir=args.models_dir)
    base = {
        "footage": str(root / "clip"),
        "depth": {"model": "file", "path": str(root / "depth.npy")},
        "focal_px": float(k[0, 0]),
        "camera": {"preset": "30"},
        "renderer": args.renderer,
        "generator": args.generator,
        "steps": args.steps,
        "width": w,
        "height": h,
        "num_frames": t,
        "exr": True,
    }
    results = {"width": w, "height": h, "frames": t, "generator": args.generator, "steps": args.steps, "modes": {}}
    for mode in ("independent", "reuse_first"):
        params = {**base, "stereo": {"interocular": 0.15, "convergence": 3.0, "second_eye": mode}}
        t0 = time.perf_counter()
        r = run_job("generate", params, ctx)
        secs = time.perf_counter() - t0
        results["modes"][mode] = {**consistency(r), "seconds": round(secs, 1)}
        print(mode, results["modes"][mode], flush=True)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
