"""Speed, memory and fidelity of the ``fast`` profile against ``full`` at full 14B size (random weights).

The models are built as ``benchmarks/bench_generation.py`` builds them (real sizes, random bf16 weights
made on the GPU, stand-in tokenizer; nothing downloaded). One model set serves every profile: ``full``
runs first, then the same DiT is converted in place to the ``fast`` profile (FP8 block linears with the
LoRA merged first, SageAttention self-attention when the wheel is installed, torch.compile), so fidelity
is measured on the same weights and inputs. Steps:

0. micro-benchmarks at the real shapes: one block linear (bf16 vs FP8 rowwise, with and without fast
   accumulation) and the self-attention (SDPA cudnn / flash vs SageAttention; cosine against SDPA).
   The faster 8-bit or bf16 attention is used for ``fast`` (``--fast-attention`` forces one).
1. ``full`` at 512 x 512 x 49: DiT forward (both CFG branches, batch 2) median of 3, per branch = / 2;
   the whole 25-step clip (CFG 5) timed; peak memory. Then 832 x 480 x 81: ``--long-steps`` steps timed,
   the 25-step clip EXTRAPOLATED (conditioning + decode + 25 x median step; labelled ``extrapolated``).
2. ``fast``: the same figures, plus fidelity against ``full``: cosine and relative L2 of one DiT forward
   (same latents, timestep, conditioning) and of the final latents after 25 steps (same seed), and
   the mean absolute difference of the decoded frames (0-255 levels).
3. ``fast`` + step cache (``--step-cache`` threshold): the 512 clip with skipped steps counted, fidelity
   against ``full`` and against ``fast``. Its 832 x 480 x 81 figure is an ESTIMATE (the 512 clip's skip
   count applied to the measured 832 step time). Random weights say nothing about the cache's visual
   quality: only its speed and its deviation are measured.
4. (default on) a torch.profiler table of the top CUDA kernels of one DiT forward per profile.

Run on one H200 (repo on PYTHONPATH; wheels: diffsynth 2.1.12, peft, einops, safetensors, ftfy, and for
8-bit attention sageattention 1.0.6, py3-none-any, needs Triton, which torch 2.11 brings):
    python3 benchmarks/bench_fast.py --json benchmarks/results_h200_fast.json      # ~5-6 min
CPU smoke test of this script (toy sizes, no figures):
    .venv/bin/python benchmarks/bench_fast.py --tiny --device cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_generation import StandInTokenizer, _timed, build_models, log, make_guide, sync  # noqa: E402

SHORT = dict(height=512, width=512, frames=49)
LONG = dict(height=480, width=832, frames=81)
TINY_SHORT = dict(height=32, width=32, frames=5)
TINY_LONG = dict(height=32, width=48, frames=9)
PROMPTS = ["a prompt " * 20, "a negative prompt " * 40]


def tokens(size: dict) -> int:
    return ((size["frames"] - 1) // 4 + 1) * (size["height"] // 16) * (size["width"] // 16)


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    """cosine and relative L2 of ``a`` against the reference ``b`` (float64)."""
    a, b = a.double().flatten(), b.double().flatten()
    return {
        "cosine": round(float(a @ b / (a.norm() * b.norm())), 6),
        "rel_l2": round(float((a - b).norm() / b.norm()), 6),
    }


def timeit(fn, device: torch.device, n: int = 3) -> float:
    times = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ------------------------------------------------------------------------------ micro-benchmarks
def micro_linear(device: torch.device, m: int, k: int, n: int) -> dict:
    """One block linear at the real shape: bf16 vs FP8 rowwise (per-token x per-channel)."""
    from ex4d_backend.generation import fast

    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16, generator=g)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16, generator=g) / k**0.5
    b = torch.randn(n, device=device, dtype=torch.bfloat16, generator=g) * 0.02
    ref = torch.nn.functional.linear(x, w, b)
    res = {"shape": [m, k, n], "bf16_ms": round(1e3 * timeit(lambda: torch.nn.functional.linear(x, w, b), device), 3)}
    wq, ws = fast.quantize_rows(w)
    xq, xs = fast.quantize_rows(x)
    for accum in (False, True):
        key = "fp8_fast_accum" if accum else "fp8"
        try:
            out = fast.fp8_matmul(xq, xs, wq, ws, b, torch.bfloat16, fast_accum=accum)
            res[f"{key}_ms"] = round(1e3 * timeit(lambda a=accum: fast.fp8_matmul(xq, xs, wq, ws, b, torch.bfloat16, fast_accum=a), device), 3)  # fmt: skip
            res[f"{key}_vs_bf16"] = compare(out, ref)
        except Exception as exc:  # noqa: BLE001
            res[f"{key}_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    res["quantize_activations_ms"] = round(1e3 * timeit(lambda: fast.quantize_rows(x), device), 3)
    return res


def micro_attention(device: torch.device, batch: int, seq: int, heads: int, head_dim: int) -> dict:
    """Self-attention at the real shape: SDPA kernels (bf16) and SageAttention (INT8 QK)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ex4d_backend.generation import fast

    g = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(batch, seq, heads * head_dim, device=device, dtype=torch.bfloat16, generator=g) for _ in range(3))  # fmt: skip
    res: dict = {"shape": [batch, seq, heads, head_dim]}
    ref = fast.Int8Attention(heads, "sdpa")(q, k, v)
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
    for name, backend in backends.items():
        try:
            with sdpa_kernel([backend]):
                res[f"sdpa_{name}_ms"] = round(1e3 * timeit(lambda: fast.Int8Attention(heads, "sdpa")(q, k, v), device), 2)  # fmt: skip
        except Exception as exc:  # noqa: BLE001
            res[f"sdpa_{name}_error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
    kernel, note = fast.attention_kernel(device)
    res["sage_note"] = note
    if kernel == "sage":
        try:
            att = fast.Int8Attention(heads, "sage")
            out = att(q, k, v)
            res["sage_ms"] = round(1e3 * timeit(lambda: att(q, k, v), device), 2)
            res["sage_vs_sdpa"] = compare(out, ref)
        except Exception as exc:  # noqa: BLE001
            res["sage_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    sdpa = {n: res[f"sdpa_{n}_ms"] for n in backends if f"sdpa_{n}_ms" in res}
    res["best_sdpa"] = min(sdpa, key=sdpa.get) if sdpa else "auto"
    best = min(sdpa.values()) if sdpa else float("inf")
    res["fast_attention"] = "sage" if "sage_ms" in res and res["sage_ms"] < best else "sdpa"
    return res


def kernel_table(pipe, lat, t, cond, top: int = 15) -> list[dict]:
    """Top CUDA kernels (self CUDA time) of one DiT forward."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        pipe.predict_noise(lat, t, cond)
        sync(pipe.device)
    rows = []
    events = sorted(prof.key_averages(), key=lambda e: -getattr(e, "self_device_time_total", 0))
    total = sum(getattr(e, "self_device_time_total", 0) for e in events) or 1
    for e in events[:top]:
        us = getattr(e, "self_device_time_total", 0)
        rows.append({"kernel": e.key[:110], "ms": round(us / 1e3, 2), "share": round(us / total, 3), "calls": e.count})
    return rows


# ------------------------------------------------------------------------------------ one profile
class Run:
    """One pipeline (one profile) with its timers and a capture of the final latents."""

    def __init__(self, pipe, device: torch.device):
        self.pipe, self.device = pipe, device
        self.t: dict[str, list] = {k: [] for k in ("step", "condition", "vae_decode")}
        _timed(pipe, "predict_noise", self.t["step"], device)
        _timed(pipe, "condition", self.t["condition"], device)
        decode = _timed(pipe, "vae_decode", self.t["vae_decode"], device)
        self.latents: torch.Tensor | None = None

        timed_decode = pipe.vae_decode

        def capture(latents):
            self.latents = latents.detach().float().cpu()
            return timed_decode(latents)

        pipe.vae_decode = capture
        self._decode = decode

    def clip(self, color, mask, size: dict, steps: int, label: str) -> dict:
        for v in self.t.values():
            v.clear()
        dev = self.device
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        sync(dev)
        t0 = time.perf_counter()
        frames = self.pipe(color, mask, height=size["height"], width=size["width"], num_frames=size["frames"],
                           steps=steps, cfg=5.0, shift=5.0, seed=0)  # fmt: skip
        sync(dev)
        total = time.perf_counter() - t0
        steps_t = self.t["step"]
        # DiT evaluations only (a step cache wraps the timer: skipped steps are not in the list); the
        # first one may include a recompile for a new shape
        med = statistics.median(steps_t[1:] if len(steps_t) > 2 else steps_t)
        res = {
            "label": label,
            "size": f"{size['width']}x{size['height']}x{size['frames']}",
            "tokens": tokens(size),
            "steps": steps,
            "total_s": round(total, 2),
            "step_s_median": round(med, 3),
            "per_cfg_branch_s": round(med / 2, 3),
            "step_s_all": [round(s, 3) for s in steps_t],
            "condition_s": round(sum(self.t["condition"]), 2),
            "vae_decode_s": round(sum(self.t["vae_decode"]), 2),
            "peak_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None,
        }
        if steps != 25:
            other = total - sum(steps_t)
            res["clip_25_steps_s_extrapolated"] = round(other + 25 * med, 2)
        else:
            res["clip_25_steps_s"] = res["total_s"]
        self.frames = frames
        log(json.dumps({k: v for k, v in res.items() if k != "step_s_all"}))
        return res

    def close(self) -> None:
        self.pipe.camera_hook.remove()
        self.pipe.placement.close()
        self.pipe.uncompile_blocks()
        torch._dynamo.reset()  # the next profile compiles its own graphs


def make_pipe(models: dict, profile, args, attention: str):
    from ex4d_backend.generation.pipeline import Ex4dPipeline

    return Ex4dPipeline(
        dit=models["dit"], vae=models["vae"], text_encoder=models["text_encoder"],
        tokenizer=StandInTokenizer(models["text_encoder"].token_embedding.num_embeddings),
        image_encoder=models["image_encoder"], camera_encoder=models["camera_encoder"], device=args.device,
        dtype=args.dtype, vram_profile=profile, merge_lora=True, compile=args.compile, attention=attention,
    )  # fmt: skip


def dit_inputs(pipe, color, mask, size: dict):
    from ex4d_backend.generation.conditioning import prepare_guide

    c, m = prepare_guide(color, mask, height=size["height"], width=size["width"], num_frames=size["frames"], seed=0)
    cond = pipe.condition(c, m, PROMPTS)
    g = torch.Generator("cpu").manual_seed(1)
    lat = torch.randn(1, 16, (size["frames"] - 1) // 4 + 1, size["height"] // 8, size["width"] // 8, generator=g)
    return cond, lat.to(pipe.device), torch.tensor([937.5], device=pipe.device)


def profile_phase(run: Run, name: str, guides: dict, args, ref: dict | None) -> dict:
    """Warm-up (compile), DiT forward timing + output, the 512 clip, the long clip's steps."""
    pipe, dev = run.pipe, run.device
    out: dict = {"profile": name, "compiled": pipe.compiled, "fast_info": dict(pipe.placement.fast_info)}
    color, mask = guides["short"]
    t0 = time.perf_counter()
    pipe(color, mask, height=args.short["height"], width=args.short["width"], num_frames=args.short["frames"],
         steps=1, cfg=5.0, shift=5.0, seed=0)  # fmt: skip
    out["warmup_1_step_s"] = round(time.perf_counter() - t0, 1)  # includes torch.compile
    # the same DiT inputs for every profile (full's conditioning, latents and timestep)
    cond, lat, t = ref["dit_inputs"] if ref is not None else dit_inputs(pipe, color, mask, args.short)
    out["dit_inputs"] = (cond, lat, t)
    pred = pipe.predict_noise(lat, t, cond)
    out["dit_forward_s"] = round(timeit(lambda: pipe.predict_noise(lat, t, cond), dev), 3)
    out["dit_forward_per_branch_s"] = round(out["dit_forward_s"] / 2, 3)
    out["dit_forward_output"] = pred.detach().float().cpu()
    if ref is not None:
        out["dit_forward_vs_full"] = compare(out["dit_forward_output"], ref["dit_forward_output"])
    if args.kernel_profile and dev.type == "cuda":
        out["kernels"] = kernel_table(pipe, lat, t, cond)
    del pred
    out["short"] = run.clip(color, mask, args.short, args.steps, f"{name} {args.short}")
    out["final_latents"] = run.latents
    out["frames"] = run.frames
    if ref is not None:
        out["final_latents_vs_full"] = compare(run.latents, ref["final_latents"])
        out["frames_mean_abs_diff_vs_full"] = round(float(np.abs(run.frames.astype(np.float32) - ref["frames"]).mean()), 3)  # fmt: skip
    if not args.skip_long:
        color, mask = guides["long"]
        out["long"] = run.clip(color, mask, args.long, args.long_steps, f"{name} {args.long}")
    return out


def step_cache_phase(run: Run, guides: dict, args, ref_full: dict, ref_fast: dict) -> dict:
    from ex4d_backend.generation.fast import StepCache

    pipe = run.pipe
    cache = StepCache(args.step_cache)
    timed = pipe.predict_noise
    pipe.predict_noise = cache.wrap(timed)
    run.pipe.placement.step_cache = cache  # reset after each clip, as the profile does
    try:
        color, mask = guides["short"]
        res = run.clip(color, mask, args.short, args.steps, f"fast + step cache {args.step_cache}")
        res["skipped_steps"] = cache.last_clip.get("skipped", [])
        res["final_latents_vs_full"] = compare(run.latents, ref_full["final_latents"])
        res["final_latents_vs_fast"] = compare(run.latents, ref_fast["final_latents"])
        res["frames_mean_abs_diff_vs_full"] = round(float(np.abs(run.frames.astype(np.float32) - ref_full["frames"]).mean()), 3)  # fmt: skip
        long = ref_fast.get("long")
        if long:
            n_eval = args.steps - len(res["skipped_steps"])
            other = long["condition_s"] + long["vae_decode_s"]
            res["long_clip_25_steps_s_estimated"] = round(other + n_eval * long["step_s_median"], 2)
            res["long_estimate_note"] = (
                f"estimate: {n_eval} of {args.steps} DiT evaluations (the 512 clip's skip pattern) x the measured "
                f"{args.long} fast step time + conditioning + decode"
            )
    finally:
        pipe.predict_noise = timed
        run.pipe.placement.step_cache = None
    return res


def summary_table(results: dict) -> str:
    full, fastr, cache = results.get("full"), results.get("fast"), results.get("fast_step_cache")
    lines = [
        "| profile | DiT fwd / branch s | 512x512x49 clip s | 832x480x81 clip s | peak GiB | fwd cosine | fwd rel L2 | latents cosine | latents rel L2 |",  # noqa: E501
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def long_of(r):
        lg = r.get("long") or {}
        v = lg.get("clip_25_steps_s_extrapolated", lg.get("clip_25_steps_s"))
        return f"{v} (extrapolated from {lg.get('steps')} steps)" if v is not None else "-"

    for name, r in (("full", full), ("fast", fastr)):
        if not r:
            continue
        fv, lv = r.get("dit_forward_vs_full", {}), r.get("final_latents_vs_full", {})
        lines.append(
            f"| {name} | {r['dit_forward_per_branch_s']} | {r['short'].get('clip_25_steps_s', r['short'].get('clip_25_steps_s_extrapolated'))} | "  # noqa: E501
            f"{long_of(r)} | {r['short']['peak_gib']} | {fv.get('cosine', 1.0)} | {fv.get('rel_l2', 0.0)} | "
            f"{lv.get('cosine', 1.0)} | {lv.get('rel_l2', 0.0)} |"
        )
    if cache:
        lv = cache["final_latents_vs_full"]
        lines.append(
            f"| fast + step cache ({len(cache['skipped_steps'])} of {cache['steps']} steps skipped) | - | "
            f"{cache.get('clip_25_steps_s', cache.get('clip_25_steps_s_extrapolated'))} | "
            f"{cache.get('long_clip_25_steps_s_estimated', '-')} (estimate) | {cache['peak_gib']} | - | - | "
            f"{lv['cosine']} | {lv['rel_l2']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--long-steps", type=int, default=4, help="steps timed at 832x480x81 (the clip is extrapolated)")
    p.add_argument("--skip-long", action="store_true", help="no 832x480x81 runs")
    p.add_argument("--step-cache", type=float, default=0.1, help="step cache threshold (0: no step-cache run)")
    p.add_argument("--fast-attention", choices=("measure", "sage", "sdpa"), default="measure")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--fast-accum",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="FP8 fast accumulation (default: the profile's)",
    )
    p.add_argument("--kernel-profile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="toy model sizes: a smoke test of this script (CPU)")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --tiny --device cpu for a smoke test)", file=sys.stderr)
        return 1
    args.device, args.dtype = dev, (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    args.compile = args.compile and dev.type == "cuda"
    args.short, args.long = (TINY_SHORT, TINY_LONG) if args.tiny else (SHORT, LONG)
    if args.tiny:
        args.steps = min(args.steps, 4)
        args.long_steps = min(args.long_steps, 2)
    from importlib.metadata import PackageNotFoundError, version

    from ex4d_backend.generation import fast
    from ex4d_backend.generation.vram import PROFILES

    def ver(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    meta = {
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "capability": ".".join(map(str, torch.cuda.get_device_capability(dev))) if dev.type == "cuda" else None,
        "tiny": args.tiny, "torch": torch.__version__, "diffsynth": ver("diffsynth"), "triton": ver("triton"),
        "sageattention": ver("sageattention"), "steps": args.steps, "cfg": 5.0, "short": args.short,
        "long": args.long, "long_steps": args.long_steps, "compile": args.compile,
    }  # fmt: skip
    t_start = time.perf_counter()
    models = build_models(dev, args.dtype, args.tiny)
    meta["model_sizes"] = models.pop("sizes")
    guides = {"short": make_guide(args.short["frames"], args.short["height"], args.short["width"])}
    if not args.skip_long:
        guides["long"] = make_guide(args.long["frames"], args.long["height"], args.long["width"])
    results: dict = {"meta": meta}

    # 0. micro-benchmarks (real shapes on the GPU; toy ones with --tiny)
    dim, ffn, heads = models["dit"].dim, models["dit"].blocks[0].ffn[0].out_features, models["dit"].blocks[0].num_heads
    m = 2 * tokens(args.short)
    results["micro"] = {
        "scaled_mm_mode": fast.probe_scaled_mm(dev),
        "linear_qkvo": micro_linear(dev, m, dim, dim),
        "linear_ffn_in": micro_linear(dev, m, dim, ffn),
        "attention": micro_attention(dev, 2, tokens(args.short), heads, dim // heads),
    }
    log(json.dumps(results["micro"]))
    best_sdpa = results["micro"]["attention"]["best_sdpa"]
    fast_attention = results["micro"]["attention"]["fast_attention"]
    if args.fast_attention != "measure":
        fast_attention = args.fast_attention
    meta["sdpa_kernel"], meta["fast_attention"] = best_sdpa, fast_attention

    # 1. full
    log("profile full")
    run = Run(make_pipe(models, PROFILES["full"], args, best_sdpa), dev)
    ref = profile_phase(run, "full", guides, args, None)
    run.close()
    del run
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    # 2. fast (the same DiT, converted in place: full's bf16 weights are gone after this)
    log(f"profile fast (attention {fast_attention})")
    t0 = time.perf_counter()
    profile = dataclasses.replace(PROFILES["fast"], attention=fast_attention, compile=args.compile)
    if args.fast_accum is not None:
        fast.FP8_FAST_ACCUM = args.fast_accum
        convert = fast.convert_dit
        fast.convert_dit = lambda dit, **kw: convert(dit, fast_accum=args.fast_accum, **kw)
    meta["fp8_fast_accum"] = fast.FP8_FAST_ACCUM if args.fast_accum is None else args.fast_accum
    run = Run(make_pipe(models, profile, args, best_sdpa), dev)
    conversion_s = round(time.perf_counter() - t0, 1)
    if dev.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
    fst = profile_phase(run, "fast", guides, args, ref)
    fst["conversion_s"] = conversion_s

    # 3. fast + step cache
    if args.step_cache > 0:
        log(f"fast + step cache {args.step_cache}")
        results["fast_step_cache"] = step_cache_phase(run, guides, args, ref, fst)
    run.close()

    for r in (ref, fst):
        for k in ("dit_forward_output", "final_latents", "frames", "dit_inputs"):
            r.pop(k, None)
    results["full"], results["fast"] = ref, fst
    meta["wall_s"] = round(time.perf_counter() - t_start, 1)
    goals = {
        "dit_forward_cosine>=0.999": fst["dit_forward_vs_full"]["cosine"] >= 0.999,
        "512x512x49<=25s": fst["short"].get("clip_25_steps_s", 1e9) <= 25,
    }
    if "long" in fst:
        goals["832x480x81<=90s (extrapolated)"] = fst["long"]["clip_25_steps_s_extrapolated"] <= 90
    results["goals_fast"] = goals
    text = json.dumps(results, indent=1)
    print(text)
    print()
    print(summary_table(results))
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
