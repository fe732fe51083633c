"""The service's guide job against ``run_recon`` (the CLI's in-memory fast path), in-process and warm.

    python benchmarks/bench_service_guide.py --footage shared/data/flower/input.mp4 --out results.json
    python benchmarks/bench_service_guide.py --synthetic --frames 49 --size 512
    python benchmarks/bench_service_guide.py --synthetic --cpu --frames 9 --size 128     # CPU smoke test
    python benchmarks/bench_service_guide.py --cpu-tiny                                  # the same, 2 repeats
    python benchmarks/bench_service_guide.py --footage F --cpu --io-only                 # CPU stages only

Measures, each the median of ``--repeats`` runs after one warm-up (plugin build, numba compile, CUDA context):

- ``recon_s``: ``recon.run_recon(frames, depth, preset)`` on arrays already in memory (what the README's
  recon figure measures: DW-mesh + render, no reads or writes);
- ``new_shot_s``: the ``render_guide`` job on a new shot (an empty job store): footage hash + decode, depth
  file load, camera, DW-mesh + render, every write (frames, depth, guide PNGs + videos, manifests);
- ``new_camera_s``: the ``render_guide`` job for a camera never seen before, frames and depth cached;
- ``videos_of_a_stored_guide_s``: the same job with ``"videos": true`` on a guide already stored: the guide
  videos stage (two H.264 videos, what ``ex4d recon`` exports; the add-on reads only the PNG frames);
- per-stage medians of both jobs (from the progress events: time from a stage's first event to the next's).

``--io-only`` times only the CPU work of a new shot, each in a fresh store: ``frames_s`` (footage hash,
decode, ``frames.npy`` + its hash), ``depth_s`` (depth file hash, read, checks, ``depth.npy`` + its hash) and
``write_s`` (the guide's files and manifest, for a guide rendered once beforehand), so a before/after
comparison on a busy CPU machine is not drowned by the renderer's time.

The depth is a file: ``--depth PATH`` (.npy/.npz (T, H, W), depth in scene units), else a smooth synthetic
depth (a tilted plane plus a bump, 2-6 units) written as an uncompressed .npz at the processing size. Results as JSON on
stdout and in ``--out``. Goals on an H200 (issue 12): new shot <= 0.5 s, new camera <= 0.15 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GOALS = {"new_shot_s": 0.5, "new_camera_s": 0.15}


def smooth_depth(t: int, h: int, w: int) -> np.ndarray:
    """(T, H, W) float32 depth: a plane tilted left-right (2..5 units) with a bump that moves over time."""
    v, u = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    out = np.empty((t, h, w), np.float32)
    for i in range(t):
        cx = -0.5 + i / max(1, t - 1)
        bump = 1.5 * np.exp(-((u - cx) ** 2 + v**2) / 0.08)
        out[i] = 3.5 + 1.5 * u - bump
    return out


class StageClock:
    """A progress callback recording when each stage first reported."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float]] = []

    def __call__(self, stage: str, step: int, total: int, message: str = "") -> None:
        if not self.marks or self.marks[-1][0] != stage:
            self.marks.append((stage, time.perf_counter()))

    def durations(self, end: float) -> dict[str, float]:
        out: dict[str, float] = {}
        for (stage, t0), (_, t1) in zip(self.marks, self.marks[1:] + [("end", end)], strict=True):
            out[stage] = out.get(stage, 0.0) + (t1 - t0)
        return out


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--footage", help="video file or image-sequence folder (e.g. the flower clip)")
    src.add_argument("--synthetic", action="store_true", help="the procedural scene (ex4d_backend.synthetic)")
    ap.add_argument("--depth", help="depth file (.npy/.npz) at the processing size; default: a smooth synthetic one")
    ap.add_argument("--frames", type=int, default=49)
    ap.add_argument("--size", type=int, default=512, help="--synthetic: width = height; --footage: max side")
    ap.add_argument("--preset", default="90")
    ap.add_argument("--cpu", action="store_true", help="CPU renderer (smoke test)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", help="write the JSON here too")
    ap.add_argument(
        "--cpu-tiny", action="store_true", help="smoke test: --synthetic --cpu --frames 9 --size 128 --repeats 2"
    )
    ap.add_argument("--io-only", action="store_true", help="time only frames, depth and the guide write (see above)")
    args = ap.parse_args()
    if args.cpu_tiny:
        args.synthetic, args.cpu, args.frames, args.size, args.repeats = True, True, 9, 128, 2
    if not (args.footage or args.synthetic):
        ap.error("one of --footage, --synthetic or --cpu-tiny is required")

    import torch

    from ex4d_backend import cameras, footage, recon
    from ex4d_backend.service import jobs
    from ex4d_backend.service.jobstore import JobStore

    renderer = "cpu" if args.cpu else "cuda"
    work = Path(tempfile.mkdtemp(prefix="ex4d-bench-"))
    if args.synthetic:
        from ex4d_backend.synthetic import make_scene

        frames, _, _ = make_scene(args.size, args.size, args.frames)
        clip_path = work / "input.mp4"
        footage.write_video(clip_path, frames, 24.0)
    else:
        clip_path = Path(args.footage).resolve()
    clip = footage.read_footage(clip_path, max_frames=args.frames, max_side=args.size)
    frames = clip.frames
    t, h, w = frames.shape[:3]
    if args.depth:
        depth_path = Path(args.depth).resolve()
        from ex4d_backend.depth_io import load_depth

        depth = load_depth(depth_path, size=(w, h), n_frames=t)
    else:
        depth = smooth_depth(t, h, w)
        depth_path = work / "depth.npz"
        np.savez(depth_path, depth=depth)  # an uncompressed .npz: loads at memory speed
    k = cameras.reference_intrinsics(w, h)
    params = {
        "footage": str(clip_path),
        "depth": {"model": "file", "path": str(depth_path)},
        "max_frames": args.frames,
        "max_side": args.size,
        "renderer": renderer,
    }
    allowed = [clip_path.parent, depth_path.parent, work]

    if args.io_only:
        return io_only(args, clip_path, depth_path, frames, depth, k, params, allowed, work, renderer)

    # 1. run_recon, in memory.
    recon.run_recon(frames, depth, args.preset, k=k, renderer=renderer)  # warm-up
    recon_times = []
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        recon.run_recon(frames, depth, args.preset, k=k, renderer=renderer)
        sync()
        recon_times.append(time.perf_counter() - t0)

    def job(store: JobStore, camera: dict, **extra) -> tuple[float, dict, dict]:
        clock = StageClock()
        ctx = jobs.Context(store, clock)
        sync()
        t0 = time.perf_counter()
        result = jobs.run_job("render_guide", {**params, "camera": camera, **extra}, ctx)
        sync()
        end = time.perf_counter()
        return end - t0, clock.durations(end), result

    def new_camera(i: int) -> dict:  # the preset path, shifted by i mm: a camera never rendered before
        path = cameras.preset_path(args.preset, t, k, depth[0], w, h)
        ext = path.extrinsics.copy()
        ext[:, 0, 3] += 1e-3 * (i + 1)
        return {"opencv": {"extrinsics": ext.tolist()}, "name": f"bench{i}"}

    # 2. New shot: an empty store every time (warm-up first).
    job(JobStore(work / "store-warm", allowed), {"preset": args.preset})
    shot_times, shot_stages = [], []
    for i in range(args.repeats):
        dt, stages, result = job(JobStore(work / f"store-shot{i}", allowed), {"preset": args.preset})
        shot_times.append(dt)
        shot_stages.append(stages)
    assert result["cached"] == {"frames": False, "depth": False, "guide": False}, result["cached"]

    # 3. New camera, frames and depth cached.
    store = JobStore(work / "store-shot0", allowed)
    cam_times, cam_stages = [], []
    for i in range(args.repeats):
        dt, stages, result = job(store, new_camera(i))
        cam_times.append(dt)
        cam_stages.append(stages)
    assert result["cached"] == {"frames": True, "depth": True, "guide": False}, result["cached"]
    new_camera_result = result

    # 4. The guide videos (``"videos": true``) of a guide already stored: the H.264 encoding alone.
    video_times = []
    for i in range(args.repeats):
        dt, _, r = job(store, new_camera(i), videos=True)
        video_times.append(dt)
    assert r["cached"] == {"frames": True, "depth": True, "guide": True, "guide_videos": False}, r["cached"]
    result = new_camera_result

    def med_stages(rows: list[dict]) -> dict:
        names = {n for r in rows for n in r}
        return {n: round(statistics.median(r.get(n, 0.0) for r in rows), 4) for n in sorted(names)}

    guide_dir = Path(result["color_dir"]).parent
    out = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "renderer": renderer,
        "torch": torch.__version__,
        "footage": str(clip_path),
        "depth": str(depth_path),
        "frames": t,
        "width": w,
        "height": h,
        "preset": args.preset,
        "repeats": args.repeats,
        "recon_s": round(statistics.median(recon_times), 4),
        "new_shot_s": round(statistics.median(shot_times), 4),
        "new_camera_s": round(statistics.median(cam_times), 4),
        "new_shot_stages_s": med_stages(shot_stages),
        "new_camera_stages_s": med_stages(cam_stages),
        "videos_of_a_stored_guide_s": round(statistics.median(video_times), 4),
        "all_s": {"recon": recon_times, "new_shot": shot_times, "new_camera": cam_times, "videos": video_times},
        "guide_bytes": sum(p.stat().st_size for p in guide_dir.rglob("*") if p.is_file()),
        "store_bytes_one_shot": sum(
            p.stat().st_size for p in (work / "store-shot1" / "cache").rglob("*") if p.is_file()
        )
        if args.repeats > 1
        else None,
        "goals_s": GOALS,
        "cpu_count": os.cpu_count(),
    }
    if not args.cpu:
        out["meets_goals"] = {name: out[name] <= goal for name, goal in GOALS.items()}
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def io_only(args, clip_path, depth_path, frames, depth, k, params, allowed, work, renderer) -> int:
    """``--io-only``: the new shot's CPU stages, each the median of ``--repeats`` runs in a fresh store."""
    from ex4d_backend import recon
    from ex4d_backend.pipeline import stages
    from ex4d_backend.pipeline.settings import DepthSettings, FrameSettings
    from ex4d_backend.service.jobstore import JobStore

    guide = recon.run_recon(frames, depth, args.preset, k=k, renderer=renderer)
    rows: dict[str, list[float]] = {"frames_s": [], "depth_s": [], "write_s": []}
    cpu: dict[str, list[float]] = {"frames_cpu_s": [], "depth_cpu_s": [], "write_cpu_s": []}  # all threads
    for i in range(args.repeats + 1):  # the first is a warm-up
        store = JobStore(work / f"io{i}", allowed)
        ctx = stages.Context(store)
        t0, c0 = time.perf_counter(), time.process_time()
        clip = stages.frames_stage(ctx, clip_path, FrameSettings.from_params(params))
        t1, c1 = time.perf_counter(), time.process_time()
        stages.depth_stage(ctx, clip, DepthSettings.from_params(params["depth"]))
        t2, c2 = time.perf_counter(), time.process_time()
        with store.write_stage("guide", f"bench{i}", {"bench": True}) as tmp:
            stages.write_guide_files(tmp, guide.color, guide.mask, guide.camera)
        t3, c3 = time.perf_counter(), time.process_time()
        if i:
            for name, dt in zip(rows, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                rows[name].append(dt)
            for name, dt in zip(cpu, (c1 - c0, c2 - c1, c3 - c2), strict=True):
                cpu[name].append(dt)
    out = {name: round(statistics.median(v), 4) for name, v in {**rows, **cpu}.items()}
    out.update({"all_s": rows, "frames": len(frames), "width": frames.shape[2], "height": frames.shape[1]})
    out.update({"cpu_count": os.cpu_count(), "footage": str(clip_path), "depth": str(depth_path)})
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
