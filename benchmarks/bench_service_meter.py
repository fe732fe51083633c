"""The ``meter`` request's latency through a real ``ex4d serve`` (issue 18): what the add-on waits after a
camera change, on the synthetic scene at 512 x 512 x 49 frames (file depth, so no depth model is needed).

    .venv/bin/python benchmarks/bench_service_meter.py [--tiny] [--renderer cpu|cuda|auto] [--out FILE.json]

Steps: 1. the clip is written as a PNG sequence + depth.npy in a temporary folder; 2. a first ``meter``
request computes frames and depth (reported, not the figure that matters); 3. each camera move
(presets 30, 180, zoom_out, then a Blender-camera spelling of the 30 path) is metered once (a camera change:
frames/depth from the store) and once again (a cache hit); the round-trip wall time of each request is the
figure the add-on sees. Prints one line per request and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import service_fixtures as sf  # noqa: E402  (the tests' clip writer and client starter)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="64 x 64 x 5 frames (a logic check)")
    ap.add_argument("--renderer", default="auto")
    ap.add_argument("--out", default="bench_service_meter.json")
    args = ap.parse_args()
    w, h, t = (64, 64, 5) if args.tiny else (512, 512, 49)
    results: dict = {"width": w, "height": h, "frames": t, "renderer": args.renderer, "requests": []}
    with tempfile.TemporaryDirectory() as tmp:
        clip = sf.make_clip(Path(tmp) / "data", w, h, t, focal_px=0.9 * w)
        client = sf.start_client(Path(tmp) / "store", [clip.root])
        try:

            def timed(label: str, camera: dict) -> dict:
                t0 = time.perf_counter()
                r = client.request("meter", clip.params(camera=camera, renderer=args.renderer), timeout=600)
                row = {
                    "request": label,
                    "wall_s": round(time.perf_counter() - t0, 3),
                    "cached": r["cached"],
                    "worst_frame": r["worst_frame"],
                    "worst_share": r["worst_share"],
                    "renderer": r["renderer"],
                }
                results["requests"].append(row)
                print(json.dumps(row), flush=True)
                return r

            client.request("hello", timeout=300)
            timed("first (frames + depth + meter)", {"preset": "60"})
            for preset in ("30", "180", "zoom_out"):
                timed(f"camera change: preset {preset}", {"preset": preset})
                timed(f"repeat: preset {preset}", {"preset": preset})
            cam = client.request("camera_preset", clip.params(preset="90"), timeout=300)
            blender = {
                "matrix_world": cam["matrix_world"],
                "lens": cam["lens"],
                **{f: cam[f] for f in ("sensor_width", "sensor_height", "sensor_fit", "shift_x", "shift_y")},
            }
            timed("camera change: keyed Blender camera (preset 90)", {"blender": blender})
            blender["matrix_world"] = [[[*r[:3], r[3] + (0.01 if i == 0 else 0)] for i, r in enumerate(m)] for m in
                                       blender["matrix_world"]]  # fmt: skip
            timed("camera change: the keyed camera nudged 1 cm", {"blender": blender})
        finally:
            client.close()
    changes = [r["wall_s"] for r in results["requests"] if r["request"].startswith("camera change")]
    results["camera_change_max_s"] = max(changes)
    results["repeat_max_s"] = max(r["wall_s"] for r in results["requests"] if r["request"].startswith("repeat"))
    print("camera change: max", results["camera_change_max_s"], "s; repeat: max", results["repeat_max_s"], "s")
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
