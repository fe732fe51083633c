"""A long shot on one GPU: 241 frames at 832 x 480 as chained windows (``generation/windows.py``).

The EX-4D pipeline is built at its REAL size with random bf16 weights on the GPU, exactly as
``benchmarks/bench_generation.py`` does (14B DiT + merged LoRA, umT5-xxl, CLIP ViT-H/14, Wan VAE,
camera encoder; a stand-in tokenizer), with the ``full`` VRAM profile. A synthetic 241-frame guide
(832 x 480 mp4, a moving texture with a growing disocclusion) is written to a temporary folder, then:

1. warm-up: one 1-step window (cuDNN autotuning, allocator), not timed;
2. ONE window as a bare generator call (49 frames, ``--steps``): the reference time and peak GPU memory;
3. per ``--variants`` (e.g. ``given,i2v``): the whole shot through ``generate_shot`` (lazy guide
   reading, chaining, cross-fade, per-window cache in a fresh job store, mp4 + PNG output written on
   the background writer): total time, time per window, the non-generator overhead, peak GPU memory
   (``torch.cuda.max_memory_allocated``), peak host RSS during the run (sampled every 20 ms from
   /proc/self/status) and the process's RSS before it; the goal checks
   ``total <= windows x one window x 1.05`` and ``peak GPU <= one window's peak x 1.02``, also
   extrapolated to 25 steps (``(total - steps x step + 25 x step)`` per window);
4. seam continuity: the mean absolute frame-to-frame difference across each window seam vs inside the
   windows (with random weights the frames are noise, so this only checks the plumbing; with real
   weights, ``--models-dir``, it compares the variants' seams).

Run on one H200 (repo on PYTHONPATH; wheels: diffsynth 2.1.12, peft, einops, safetensors, ftfy, av,
opencv-python-headless):
    python3 benchmarks/bench_long_shot.py --steps 3 --variants given,i2v --json results_long_shot.json
(about 4-6 min: 11 windows + 1 reference window at 3 steps; each step at 832x480x49 is ~2.5 s.)
CPU smoke test of this script: python benchmarks/bench_long_shot.py --tiny --device cpu
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    """Samples the process RSS every ``period`` s while entered; ``peak`` in bytes."""

    def __init__(self, period: float = 0.02):
        self.period, self.peak, self._stop = period, 0, threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.period)

    def __enter__(self):
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_guide(folder: Path, frames: int, width: int, height: int, fps: float) -> tuple[Path, Path]:
    """A moving texture with a disocclusion growing from the right edge, written frame by frame."""
    import cv2

    from ex4d_backend.generation.frame_streams import ResultWriter

    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (max(2, height // 8), max(2, width // 4), 3), dtype=np.uint8)
    tex = cv2.resize(small, (2 * width, height), interpolation=cv2.INTER_CUBIC)  # smooth: quick to encode
    with ResultWriter(folder / "color.mp4", fps=fps) as c, ResultWriter(folder / "mask.mp4", fps=fps) as m:
        for i in range(frames):
            x = (i * 3) % width
            c.write(tex[:, x : x + width])
            mask = np.full((height, width, 3), 255, np.uint8)
            mask[:, width - 1 - (width // 3) * i // max(1, frames - 1) :] = 0
            m.write(mask)
    return folder / "color.mp4", folder / "mask.mp4"


def build_pipeline(args, device, dtype):
    from bench_generation import StandInTokenizer, build_models

    from ex4d_backend.generation.pipeline import Ex4dPipeline

    if args.models_dir:
        from ex4d_backend.generation import load_generator

        return load_generator("ex4d", models_dir=args.models_dir, device=str(device), vram_profile=args.profile)
    models = build_models(device, dtype, args.tiny)
    models.pop("sizes")
    tok = StandInTokenizer(models["text_encoder"].token_embedding.num_embeddings)
    return Ex4dPipeline(
        dit=models["dit"], vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=tok,
        image_encoder=models["image_encoder"], camera_encoder=models["camera_encoder"], device=device,
        dtype=dtype, vram_profile=args.profile, attention=args.attention, compile=args.compile,
    )  # fmt: skip


def one_window(pipe, color_path, mask_path, args, steps: int) -> dict:
    """The bare generator on the first window of the guide (already at the generation size)."""
    from ex4d_backend.generation.frame_streams import FrameReader

    dev = pipe.device
    with FrameReader(color_path) as c, FrameReader(mask_path, channel0=True) as m:
        color, mask = c.frames(0, args.window), m.frames(0, args.window)
    step_times: list[float] = []
    last = [time.perf_counter()]

    def cb(stage, step, total, msg):
        if stage == "denoise":
            sync(dev)
            now = time.perf_counter()
            step_times.append(now - last[0])
        last[0] = time.perf_counter()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    sync(dev)
    t0 = time.perf_counter()
    out = pipe(color, mask, height=args.height, width=args.width, num_frames=args.window, steps=steps, seed=0,
               callback=cb)  # fmt: skip
    sync(dev)
    total = time.perf_counter() - t0
    return {
        "steps": steps,
        "total_s": round(total, 3),
        "step_s_median": round(statistics.median(step_times[1:] or step_times), 3) if step_times else None,
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None,
        "output": list(out.shape),
    }


def seam_metrics(frames_dir: Path, plan: dict) -> dict:
    """Mean |frame[t+1] - frame[t]| at the windows' first new frames vs elsewhere (uint8 levels)."""
    from ex4d_backend.generation.frame_streams import FrameReader

    seams = {w[0] for w in plan["windows"][1:]} | {w[0] + w[2] for w in plan["windows"][1:]}
    at, inside = [], []
    with FrameReader(frames_dir) as r:
        prev = r.frame(0).astype(np.int16)
        for t in range(1, r.n_frames):
            cur = r.frame(t).astype(np.int16)
            (at if t in seams else inside).append(float(np.abs(cur - prev).mean()))
            r.release(t)
            prev = cur
    return {"seam_diff": round(float(np.mean(at)), 3) if at else None, "inside_diff": round(float(np.mean(inside)), 3)}


def run_variant(pipe, color_path, mask_path, args, variant: str, work: Path, reference: dict) -> dict:
    from ex4d_backend.generation.windows import ShotOutputs, ShotSettings, generate_shot

    dev = pipe.device
    store = work / f"store-{variant}"
    out = work / f"out-{variant}"
    settings = ShotSettings(window=args.window, variant=variant, overlap=args.overlap if variant != "i2v" else None,
                            size=f"{args.width}x{args.height}", steps=args.steps)  # fmt: skip
    outputs = ShotOutputs(video=out / "shot.mp4", frames=out / "frames")
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    rss_before = rss_bytes()
    sync(dev)
    with PeakRss() as rss:
        t0 = time.perf_counter()
        rep = generate_shot(pipe, color_path, mask_path, settings, outputs, store=store,
                            generator_key={"bench": "random"})  # fmt: skip
        sync(dev)
        total = time.perf_counter() - t0
    n = len(rep.windows)
    per_window = [w["seconds"] for w in rep.windows]
    one = reference["total_s"]
    step = reference["step_s_median"] or 0.0
    per_window_25 = one - args.steps * step + 25 * step
    overhead = total - n * one
    res = {
        "variant": variant,
        "overlap": rep.plan["overlap"],
        "windows": n,
        "frames": rep.plan["n_out"],
        "total_s": round(total, 2),
        "window_s": per_window,
        "overhead_s": round(overhead, 2),
        "ratio_to_windows_x_one": round(total / (n * one), 4),
        "ratio_extrapolated_25_steps": round((n * per_window_25 + overhead) / (n * per_window_25), 4),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None,
        "peak_rss_gib": round(rss.peak / 2**30, 2),
        "rss_before_gib": round(rss_before / 2**30, 2),
        "output_bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
        "cache_bytes": sum(p.stat().st_size for p in store.rglob("*") if p.is_file()),
    }
    res["goal_time"] = res["ratio_to_windows_x_one"] <= 1.05
    if res["peak_gpu_gib"] is not None and reference["peak_gpu_gib"]:
        res["goal_gpu"] = res["peak_gpu_gib"] <= reference["peak_gpu_gib"] * 1.02
    res.update(seam_metrics(out / "frames", rep.plan))
    log(json.dumps(res))
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=241)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--window", type=int, default=49)
    p.add_argument("--overlap", type=int, default=None, help="overlap of the given/guide variants (default 9)")
    p.add_argument("--steps", type=int, default=3, help="denoising steps per window (25 = the reference)")
    p.add_argument("--variants", default="given,i2v", help="comma list of given, i2v, guide")
    p.add_argument("--profile", default="full", choices=("full", "24gb", "12gb"))
    p.add_argument("--attention", default="auto", choices=("auto", "cudnn", "flash"))
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks (adds ~1 min once)")
    p.add_argument("--models-dir", default=None, help="real weights instead of random ones (if you have them)")
    p.add_argument("--fps", type=float, default=24.0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", default=None)
    p.add_argument("--tiny", action="store_true", help="toy models, 21 frames at 64x48, window 9 (CPU smoke test)")
    args = p.parse_args(argv)
    if args.tiny:
        args.frames, args.width, args.height, args.window = min(args.frames, 21), 64, 48, 9
        args.overlap = args.overlap or 3
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --tiny --device cpu)", file=sys.stderr)
        return 1
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    meta = {
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "tiny": args.tiny,
        "frames": args.frames,
        "size": [args.width, args.height],
        "window": args.window,
        "steps": args.steps,
        "profile": args.profile,
        "weights": "real" if args.models_dir else "random",
    }
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ex4d-long-shot-") as tmp:
        work = Path(tmp)
        color, mask = write_guide(work, args.frames, args.width, args.height, args.fps)
        log(f"guide written: {args.frames} frames {args.width}x{args.height}")
        pipe = build_pipeline(args, dev, dtype)
        meta["rss_after_models_gib"] = round(rss_bytes() / 2**30, 2)
        one_window(pipe, color, mask, args, steps=1)  # warm-up
        reference = one_window(pipe, color, mask, args, steps=args.steps)
        log(f"one window: {json.dumps(reference)}")
        results = [run_variant(pipe, color, mask, args, v.strip(), work, reference) for v in args.variants.split(",")]
        pipe.close()
    meta["wall_s"] = round(time.perf_counter() - t_start, 1)
    summary = {"meta": meta, "one_window": reference, "variants": results}
    text = json.dumps(summary, indent=1)
    print(text)
    print()
    print(markdown(summary))
    if args.json:
        Path(args.json).write_text(text)
    return 0


def markdown(s: dict) -> str:
    m, one = s["meta"], s["one_window"]
    lines = [
        f"GPU: {m['gpu']}, {m['frames']} frames at {m['size'][0]}x{m['size'][1]}, window {m['window']}, "
        f"{m['steps']} steps, profile {m['profile']}, {m['weights']} weights; one window: {one['total_s']} s, "
        f"peak GPU {one['peak_gpu_gib']} GiB",
        "",
        "| variant | windows | total s | per window s (median) | total / (windows x one) | same @25 steps | "
        "peak GPU GiB | peak host RSS GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in s["variants"]:
        lines.append(
            f"| {r['variant']} (overlap {r['overlap']}) | {r['windows']} | {r['total_s']} | "
            f"{statistics.median(r['window_s']):.2f} | {r['ratio_to_windows_x_one']} | "
            f"{r['ratio_extrapolated_25_steps']} | {r['peak_gpu_gib']} | {r['peak_rss_gib']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
