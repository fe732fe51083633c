"""Disocclusion meter speed and accuracy (issue 18): the meter's CPU time vs the full guide's on the synthetic
scene at 512 x 512 x 49 frames (three camera moves), and the largest per-frame difference in masked share.

    .venv/bin/python benchmarks/bench_meter.py [--tiny] [--renderer cpu|cuda] [--out results.json]

The meter runs on ``--meter-renderer`` (default cpu, numba), the full guide on ``--renderer`` (default cpu). The first meter
call compiles nothing new (the rasteriser's numba cache is shared with the guide), but a warm-up run is made
anyway so the timings are steady-state.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from ex4d_backend import cameras, meter, synthetic
from ex4d_backend.recon import run_recon


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="64 x 64 x 5 frames (a logic check)")
    ap.add_argument("--renderer", default="cpu", help="the full guide's renderer")
    ap.add_argument("--meter-renderer", default="cpu", help="the meter's renderer (cpu or cuda)")
    ap.add_argument("--out", default="bench_meter.json")
    args = ap.parse_args()
    w, h, t = (64, 64, 5) if args.tiny else (512, 512, 49)
    frames, depth, k = synthetic.make_scene(w, h, t)
    warm = cameras.preset_path("30", 2, k, depth[0], w, h)
    meter.masked_share(depth[:2], k, warm, renderer=args.meter_renderer)  # warm-up (numba cache, CUDA context)
    run_recon(frames[:2], depth[:2], warm, k=k, renderer=args.renderer)
    results = {"width": w, "height": h, "frames": t, "meter_step": meter.meter_step(w, h), "moves": {}}
    for preset in ("30", "180", "zoom_out"):
        cam = cameras.preset_path(preset, t, k, depth[0], w, h)
        t0 = time.perf_counter()
        share = meter.masked_share(depth, k, cam, renderer=args.meter_renderer)
        t_meter = time.perf_counter() - t0
        t0 = time.perf_counter()
        full = meter.guide_masked_share(run_recon(frames, depth, cam, k=k, renderer=args.renderer).mask)
        t_full = time.perf_counter() - t0
        results["moves"][preset] = {
            "meter_s": round(t_meter, 3),
            "full_guide_s": round(t_full, 3),
            "max_diff_pp": round(float(np.abs(share - full).max() * 100), 3),
            "mean_diff_pp": round(float((share - full).mean() * 100), 3),
            "full_max_share": round(float(full.max()), 4),
        }
        print(preset, results["moves"][preset], flush=True)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
