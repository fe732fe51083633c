"""One clip on 1, 2 and 4 GPUs (CFG-parallel, Ulysses sequence parallel) at full 14B size, random weights.

Every rank builds the models as ``benchmarks/bench_generation.py`` does (real sizes, random bf16 weights
from fixed seeds on its own GPU, stand-in tokenizer), through :class:`ex4d_backend.generation.parallel.
ParallelGenerator` (worker processes, NCCL with NCCL_NVLS_ENABLE=0). Per GPU count: the whole 25-step
512 x 512 x 49 clip (CFG 5) and ``--long-steps`` steps at 832 x 480 x 81 with the 25-step clip
EXTRAPOLATED from rank 0's per-step progress times (labelled), the speed-up against 1 GPU and the
cosine / relative L2 of the final latents against 1 GPU (goal: >= 1.8x on 2, >= 3.4x on 4, cosine
>= 0.9999). The first clip of every count is a 1-step warm-up (compile, cuDNN autotuning).

Needs a machine with 2 or 4 GPUs (not lent in the session that wrote it: never run yet):
    python3 benchmarks/bench_parallel.py --gpus 1,2,4 --json benchmarks/results_h200x4_parallel.json
CPU smoke test (toy sizes, gloo):
    .venv/bin/python benchmarks/bench_parallel.py --tiny --device cpu --gpus 1,2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_generation import log, make_guide  # noqa: E402

SHORT = dict(height=512, width=512, num_frames=49)
LONG = dict(height=480, width=832, num_frames=81)
TINY_SHORT = dict(height=32, width=32, num_frames=5)
TINY_LONG = dict(height=32, width=48, num_frames=9)


def build_pipeline(device: torch.device):
    """Factory run on every rank (``WorkerSpec.factory``): the 14B models with random weights, or toy
    sizes when EX4D_BENCH_TINY=1; profile from EX4D_BENCH_PROFILE (full / fast)."""
    from bench_generation import StandInTokenizer, build_models

    from ex4d_backend.generation.pipeline import Ex4dPipeline

    tiny = os.environ.get("EX4D_BENCH_TINY") == "1"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    m = build_models(device, dtype, tiny)
    return Ex4dPipeline(
        dit=m["dit"], vae=m["vae"], text_encoder=m["text_encoder"],
        tokenizer=StandInTokenizer(m["text_encoder"].token_embedding.num_embeddings),
        image_encoder=m["image_encoder"], camera_encoder=m["camera_encoder"], device=device, dtype=dtype,
        vram_profile=os.environ.get("EX4D_BENCH_PROFILE", "full"), compile=device.type == "cuda",
        attention=os.environ.get("EX4D_BENCH_ATTENTION", "auto"),
    )  # fmt: skip


def clip(gen, guide, size: dict, steps: int) -> dict:
    stamps: list[float] = []

    def progress(stage, step, total, msg):
        if stage == "denoise":
            stamps.append(time.perf_counter())

    t0 = time.perf_counter()
    gen(*guide, steps=steps, cfg=5.0, shift=5.0, seed=0, callback=progress, **size)
    total = time.perf_counter() - t0
    per_step = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    step = statistics.median(per_step) if per_step else total / max(steps, 1)
    res = {"size": f"{size['width']}x{size['height']}x{size['num_frames']}", "steps": steps, "total_s": round(total, 2),
           "step_s_median": round(step, 3)}  # fmt: skip
    if steps == 25:
        res["clip_25_steps_s"] = res["total_s"]
    else:
        res["clip_25_steps_s_extrapolated"] = round(total + (25 - steps) * step, 2)
    res["latents"] = gen.last_latents
    return res


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return {"cosine": round(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)), 7),
            "rel_l2": round(float(np.linalg.norm(a - b) / np.linalg.norm(b)), 7)}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", default="1,2,4", help="comma list of GPU counts (1 is the reference)")
    p.add_argument("--profile", choices=("full", "fast"), default="full")
    p.add_argument("--attention", default="auto", help="SDPA kernel: auto, cudnn, flash")
    p.add_argument("--long-steps", type=int, default=4)
    p.add_argument("--skip-long", action="store_true")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    os.environ["EX4D_BENCH_TINY"] = "1" if args.tiny else "0"
    os.environ["EX4D_BENCH_PROFILE"] = args.profile
    os.environ["EX4D_BENCH_ATTENTION"] = args.attention
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    from ex4d_backend.generation.parallel import ParallelGenerator, WorkerSpec

    short, long = (TINY_SHORT, TINY_LONG) if args.tiny else (SHORT, LONG)
    steps = 2 if args.tiny else 25
    long_steps = min(args.long_steps, 2) if args.tiny else args.long_steps
    guides = {"short": make_guide(short["num_frames"], short["height"], short["width"])}
    if not args.skip_long:
        guides["long"] = make_guide(long["num_frames"], long["height"], long["width"])
    counts = [int(c) for c in args.gpus.split(",")]
    meta = {"gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu", "torch": torch.__version__,
            "profile": args.profile, "gpus": counts, "tiny": args.tiny}  # fmt: skip
    results, ref = [], {}
    for n in counts:
        log(f"{n} GPU(s)")
        t0 = time.perf_counter()
        gen = ParallelGenerator(n, WorkerSpec(None, args.device, factory="bench_parallel:build_pipeline"))
        res = {"gpus": n, "startup_s": round(time.perf_counter() - t0, 1)}
        try:
            t0 = time.perf_counter()
            gen(*guides["short"], steps=1, cfg=5.0, seed=0, **short)
            res["warmup_s"] = round(time.perf_counter() - t0, 1)
            res["short"] = clip(gen, guides["short"], short, steps)
            if not args.skip_long:
                res["long"] = clip(gen, guides["long"], long, long_steps)
        finally:
            gen.close()
        for key in ("short", "long"):
            if key not in res:
                continue
            lat = res[key].pop("latents")
            if n == counts[0]:
                ref[key] = (lat, res[key])
            else:
                base_lat, base = ref[key]
                res[key]["final_latents_vs_1"] = compare(lat, base_lat)
                k = "clip_25_steps_s" if "clip_25_steps_s" in base else "clip_25_steps_s_extrapolated"
                res[key]["speedup"] = round(base[k] / res[key][k], 2)
        log(json.dumps(res))
        results.append(res)
    out = {"meta": meta, "results": results}
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
