"""Benchmark the recon after depth (DW-mesh + filter + render + read-back) for 49 frames.

    python benchmarks/bench_recon.py [--renderer cuda|cpu] [--sizes 512x512,832x480,1920x1080] [--frames 49]

Prints one JSON line per size: median seconds over ``--repeat`` runs after a warm-up, peak GPU memory.
Inputs start as numpy arrays in host memory (upload included); outputs end as numpy uint8 (read-back included).
Also, with --agreement, compares the cuda and cpu renderers (mask IoU, colour PSNR on pixels both cover).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ex4d_backend.recon import run_recon  # noqa: E402
from ex4d_backend.synthetic import make_scene  # noqa: E402


def agreement(a_color, a_mask, b_color, b_mask) -> dict:
    """Mask IoU over frames 1.. (frame 0 is the source) and colour PSNR on pixels seen by both."""
    ma, mb = a_mask[1:] > 127, b_mask[1:] > 127
    iou = float((ma & mb).sum() / max(1, (ma | mb).sum()))
    both = ma & mb
    diff = a_color[1:].astype(np.float64) - b_color[1:].astype(np.float64)
    mse = float((diff[both] ** 2).mean()) if both.any() else 0.0
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
    return {"mask_iou": iou, "color_psnr_db": psnr, "pixels_compared": int(both.sum())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--renderer", default="cuda")
    ap.add_argument("--sizes", default="512x512,832x480,1920x1080")
    ap.add_argument("--frames", type=int, default=49)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--cam", default="90")
    ap.add_argument("--agreement", action="store_true", help="compare cuda and cpu renderers at each size")
    args = ap.parse_args()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    for size in args.sizes.split(","):
        w, h = (int(x) for x in size.split("x"))
        frames, depth, k = make_scene(w, h, args.frames)
        run_recon(frames, depth, args.cam, k=k, renderer=args.renderer)  # warm-up (plugin load, numba compile)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            guide = run_recon(frames, depth, args.cam, k=k, renderer=args.renderer)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        row = {
            "bench": "recon",
            "renderer": args.renderer,
            "size": size,
            "frames": args.frames,
            "cam": args.cam,
            "median_s": round(statistics.median(times), 4),
            "min_s": round(min(times), 4),
            "gpu": gpu,
            "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None,
            "torch_threads": torch.get_num_threads(),
        }
        if args.agreement:
            other = "cpu" if args.renderer == "cuda" else "cuda"
            ref = run_recon(frames, depth, args.cam, k=k, renderer=other)
            row["agreement_vs_" + other] = agreement(guide.color, guide.mask, ref.color, ref.mask)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
