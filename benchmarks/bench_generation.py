"""Speed and memory of the EX-4D generator at full size (Wan2.1-I2V-14B + EX-4D) on one GPU.

Every model is built at its REAL size with random bf16 weights made directly on the GPU (meta init,
``to_empty``, fill; nothing downloaded): the 14B DiT (40 layers, width 5120) with the EX-4D LoRA
(800 tensors, merged into the weights unless ``--no-merge-lora``) and camera encoder (23.1 M), the
umT5-xxl text encoder (5.7 B), the open-clip ViT-H/14 image tower and the Wan2.1 VAE. Only the
tokenizer is a stand-in (random token ids of realistic prompt lengths, padded to 512 as umT5's is).

The whole pipeline runs as ``ex4d generate`` does (``Ex4dPipeline.__call__``): prompt + negative
prompt encoded once as a batch of 2, CLIP on the first frame, the 3 VAE encodes as one batch of 3,
``--steps`` denoising steps with both CFG branches as one batch of 2, VAE decode. Per profile it
prints: per-step (= one batch-2 DiT forward = both CFG branches) and per-branch time, text / image
encoder time, VAE encode and decode time, total clip time, the clip time extrapolated to 25 steps
(``total - steps x step + 25 x step``), and peak GPU memory (``torch.cuda.max_memory_allocated``).
Profile ``24gb`` / ``12gb`` run under ``torch.cuda.set_per_process_memory_fraction(budget / total)``.

Before the clips it times one DiT forward with each SDPA kernel (``auto``, ``cudnn``, ``flash``)
and keeps the fastest, then (``--compile``, default on) compiles the DiT blocks and reports the
compile time separately (paid once per process; the service keeps the pipeline loaded).

Run on the GPU (repo on PYTHONPATH; wheels: diffsynth 2.1.12, peft, einops, safetensors, ftfy):
    python3 benchmarks/bench_generation.py --profiles full,24gb --steps 6      # ~4-5 min
    python3 benchmarks/bench_generation.py --profiles full,24gb,12gb --steps 25 # full clips
Prints a JSON summary and a markdown table (also written with ``--json PATH``).
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

DIT_14B = dict(
    dim=5120, in_dim=36, ffn_dim=13824, out_dim=16, text_dim=4096, freq_dim=256, eps=1e-6,
    patch_size=(1, 2, 2), num_heads=40, num_layers=40, has_image_input=True,
)  # fmt: skip
BUDGET_GIB = {"full": None, "24gb": 24, "12gb": 12}
# --tiny: the same code path with toy sizes (a CPU smoke test of this script, no figures)
TINY = dict(
    dit=dict(DIT_14B, dim=256, ffn_dim=512, text_dim=4096, num_heads=2, num_layers=2),
    t5=dict(vocab=1000, dim=4096, dim_attn=64, dim_ffn=128, num_heads=2, num_layers=1, num_buckets=32),
    vae_dim=8,
    clip=dict(vision_layers=1, vision_mlp_ratio=1),
    encoder_hidden=32,
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class StandInTokenizer:
    """umT5-shaped token ids (random, realistic lengths) padded to 512, with the attention mask."""

    def __init__(self, vocab: int = 256384, seq_len: int = 512):
        self.vocab, self.seq_len = vocab, seq_len

    def __call__(self, prompts, return_mask=True, add_special_tokens=True):
        ids = torch.zeros(len(prompts), self.seq_len, dtype=torch.long)
        mask = torch.zeros_like(ids)
        g = torch.Generator().manual_seed(0)
        for i, p in enumerate(prompts):
            n = min(self.seq_len, int(len(p.split()) * 1.6) + 1)
            ids[i, :n] = torch.randint(3, self.vocab, (n,), generator=g)
            mask[i, :n] = 1
        return (ids, mask) if return_mask else ids


def _materialise(module: torch.nn.Module, device: torch.device, seed: int) -> torch.nn.Module:
    from compare_diffsynth_112 import _fill_random_

    module = module.to_empty(device=device)
    _fill_random_(module, seed)
    return module


def build_models(device: torch.device, dtype: torch.dtype, tiny: bool = False) -> dict:
    """All models at real size, random weights, on ``device`` in ``dtype`` (no fp32 detour)."""
    from diffsynth.models.wan_video_dit import WanModel, precompute_freqs_cis_3d
    from diffsynth.models.wan_video_image_encoder import WanImageEncoder, clip_xlm_roberta_vit_h_14
    from diffsynth.models.wan_video_text_encoder import WanTextEncoder
    from diffsynth.models.wan_video_vae import VideoVAE_, WanVideoVAE

    from ex4d_backend.generation.camera_encoder import CamVidEncoder
    from ex4d_backend.generation.loading import inject_lora

    t0 = time.perf_counter()
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # meta tensors in bf16: to_empty allocates bf16 directly
    try:
        with torch.device("meta"):
            dit = WanModel(**(TINY["dit"] if tiny else DIT_14B))
            inject_lora(dit)
            t5 = WanTextEncoder(**TINY["t5"]) if tiny else WanTextEncoder()  # umT5-xxl
            cam = CamVidEncoder(16, TINY["encoder_hidden"], dit.dim) if tiny else CamVidEncoder()
            vae_model = VideoVAE_(dim=TINY["vae_dim"] if tiny else 96, z_dim=16)  # the Wan2.1 VAE
            clip_model, transforms = clip_xlm_roberta_vit_h_14(
                pretrained=False,
                return_transforms=True,
                return_tokenizer=False,
                device="meta",
                **(TINY["clip"] if tiny else {}),
            )
    finally:
        torch.set_default_dtype(default)
    dit = _materialise(dit, device, 0).eval().requires_grad_(False)
    dit.freqs = precompute_freqs_cis_3d(dit.dim // dit.blocks[0].num_heads)
    t5 = _materialise(t5, device, 1).eval().requires_grad_(False)
    cam = _materialise(cam, device, 2).eval().requires_grad_(False)
    vae = WanVideoVAE(z_dim=16)  # latent mean/std constants (+ a default model built on the CPU ...)
    vae.model = _materialise(vae_model, device, 3).eval().requires_grad_(False)  # ... replaced here
    image_encoder = WanImageEncoder.__new__(WanImageEncoder)
    torch.nn.Module.__init__(image_encoder)
    image_encoder.model = _materialise(clip_model, device, 4).eval().requires_grad_(False)
    image_encoder.transforms = transforms
    sync(device)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    sizes = {
        "dit_params": n(dit),
        "text_encoder_params": n(t5),
        "image_encoder_params": n(image_encoder),
        "vae_params": n(vae),
        "camera_encoder_params": n(cam),
    }
    log(f"models built in {time.perf_counter() - t0:.1f} s: {sizes}")
    return dict(dit=dit, text_encoder=t5, camera_encoder=cam, vae=vae, image_encoder=image_encoder, sizes=sizes)


def _timed(obj, name: str, store: list, device: torch.device):
    """Wrap ``obj.name`` so every call's wall time (GPU synchronised) is appended to ``store``."""
    fn = getattr(obj, name)

    def wrapper(*a, **k):
        sync(device)
        t = time.perf_counter()
        out = fn(*a, **k)
        sync(device)
        store.append(time.perf_counter() - t)
        return out

    setattr(obj, name, wrapper)
    return fn


def make_guide(frames: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    color = rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    mask = np.full((frames, height, width), 255, np.uint8)
    for i in range(frames):
        mask[i, :, width - width * i // (2 * frames) - 1 :] = 0  # a growing disocclusion
    return color, mask


def probe_attention(pipe, color, mask, args) -> dict:
    """One batch-2 DiT forward per SDPA kernel (after one untimed call each); keeps the fastest."""
    from ex4d_backend.generation.conditioning import prepare_guide

    c, m = prepare_guide(color, mask, height=args.height, width=args.width, num_frames=args.frames, seed=0)
    cond = pipe.condition(c, m, ["a prompt " * 20, "a negative prompt " * 40])
    lat = torch.randn(1, 16, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8, device=pipe.device)
    t = torch.tensor([937.5], device=pipe.device)
    times = {}
    for name in ("auto", "cudnn", "flash"):
        pipe.attention = name
        try:
            pipe.predict_noise(lat, t, cond)
            sync(pipe.device)
            t0 = time.perf_counter()
            pipe.predict_noise(lat, t, cond)
            sync(pipe.device)
            times[name] = round(time.perf_counter() - t0, 3)
        except Exception as exc:  # noqa: BLE001 - a kernel the GPU/torch build lacks
            times[name] = f"failed: {type(exc).__name__}: {str(exc)[:100]}"
        log(f"attention {name}: {times[name]}")
    ok = {k: v for k, v in times.items() if isinstance(v, float)}
    pipe.attention = min(ok, key=ok.get)
    del cond, lat
    return {"step_s_by_kernel": times, "chosen": pipe.attention}


def run_profile(models: dict, profile: str, args, color, mask, attention: str | None) -> dict:
    from ex4d_backend.generation.pipeline import Ex4dPipeline
    from ex4d_backend.generation.vram import PROFILES

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    prof = PROFILES[profile]
    if args.resident_blocks is not None and not prof.resident:
        prof = dataclasses.replace(prof, resident_blocks=args.resident_blocks)
    if not prof.resident:  # offloading profiles start from CPU memory, as when loaded from disk
        for k in ("dit", "text_encoder", "vae", "image_encoder", "camera_encoder"):
            models[k].to("cpu")
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    t0 = time.perf_counter()
    pipe = Ex4dPipeline(
        dit=models["dit"], vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=StandInTokenizer(models["text_encoder"].token_embedding.num_embeddings),
        image_encoder=models["image_encoder"], camera_encoder=models["camera_encoder"], device=dev,
        dtype=args.dtype, vram_profile=prof, merge_lora=not args.no_merge_lora,
        attention=attention or "auto", rope=args.rope,
    )  # fmt: skip
    res: dict = {"profile": profile, "placement_s": round(time.perf_counter() - t0, 1), "lora_merged": pipe.lora_merged}
    if not prof.resident:
        res["resident_blocks"] = prof.resident_blocks
    gc.collect()
    budget = BUDGET_GIB[profile]
    res["budget_gib"] = budget
    if cuda:
        torch.cuda.empty_cache()
        total_gib = torch.cuda.get_device_properties(dev).total_memory / 2**30
        if budget:
            torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total_gib), torch.cuda.current_device())
        res["resident_gib_after_placement"] = round(torch.cuda.memory_allocated(dev) / 2**30, 2)
    kw = dict(height=args.height, width=args.width, num_frames=args.frames, cfg=5.0, shift=5.0, seed=0)
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        pipe(color, mask, steps=1, **kw)  # warm-up: cuDNN autotuning, allocator
        res["warmup_1_step_s"] = round(time.perf_counter() - t0, 1)
        if attention is None:
            res["attention"] = probe_attention(pipe, color, mask, args)
        if args.compile:
            pipe.compile_blocks()
            t0 = time.perf_counter()
            try:
                pipe(color, mask, steps=1, **kw)
                res["compile_warmup_s"] = round(time.perf_counter() - t0, 1)
            except Exception as exc:  # noqa: BLE001 - report and go on without compile
                pipe.uncompile_blocks()
                res["compile_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                log(f"compile failed, running eager: {res['compile_error']}")
            try:
                from torch._dynamo.utils import counters

                res["compiled_graphs"] = int(counters["stats"].get("unique_graphs", 0))
            except Exception:  # noqa: BLE001
                pass
        res["compiled"] = pipe.compiled
        res["attention_kernel"] = pipe.attention
        timings: dict[str, list] = {k: [] for k in ("step", "text", "image", "vae_encode", "vae_decode", "condition")}
        _timed(pipe, "predict_noise", timings["step"], dev)
        _timed(pipe, "encode_prompts", timings["text"], dev)
        _timed(pipe.image_encoder, "encode_image", timings["image"], dev)
        _timed(pipe, "vae_encode", timings["vae_encode"], dev)
        _timed(pipe, "vae_decode", timings["vae_decode"], dev)
        _timed(pipe, "condition", timings["condition"], dev)
        sync(dev)
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        out = pipe(color, mask, steps=args.steps, **kw)
        sync(dev)
        total = time.perf_counter() - t0
        steps = timings["step"]
        med = statistics.median(steps)
        res.update(
            {
                "steps": args.steps,
                "step_s_median": round(med, 3),
                "step_s_all": [round(s, 3) for s in steps],
                "per_cfg_branch_s": round(med / 2, 3),
                "text_encoder_s": round(sum(timings["text"]), 3),
                "image_encoder_s": round(sum(timings["image"]), 3),
                "vae_encode_s": round(sum(timings["vae_encode"]), 3),
                "vae_decode_s": round(sum(timings["vae_decode"]), 3),
                "conditioning_s": round(sum(timings["condition"]), 3),
                "total_s": round(total, 2),
                "clip_25_steps_s": round(total - sum(steps) + 25 * med, 2),
                "peak_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if cuda else None,
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved(dev) / 2**30, 2) if cuda else None,
                "output": list(out.shape),
                "output_finite": bool(np.isfinite(out.astype(np.float32)).all()),
            }
        )
    except torch.OutOfMemoryError as exc:
        res["error"] = f"out of memory within {budget} GiB: {str(exc)[:200]}"
    finally:
        pipe.camera_hook.remove()
        pipe.placement.close()
        pipe.uncompile_blocks()
        del pipe
        gc.collect()
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0, torch.cuda.current_device())
            torch.cuda.empty_cache()
    log(json.dumps(res))
    return res


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        f"GPU: {meta['gpu']}, torch {meta['torch']}, diffsynth {meta['diffsynth']}, "
        f"{meta['width']}x{meta['height']}x{meta['frames']}, bf16, CFG 5 (branches batched)",
        "",
        "| profile | step (2 branches) s | per branch s | VAE enc+dec s | text+image s | total s "
        f"({meta['steps']} steps) | clip @25 steps s | peak GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['profile']} | {r['error'][:60]} | | | | | | |")
            continue
        lines.append(
            f"| {r['profile']} | {r['step_s_median']} | {r['per_cfg_branch_s']} | "
            f"{r['vae_encode_s'] + r['vae_decode_s']:.2f} | {r['text_encoder_s'] + r['image_encoder_s']:.2f} | "
            f"{r['total_s']} | {r['clip_25_steps_s']} | {r['peak_gib']} |"
        )
    full = next((r for r in results if r["profile"] == "full" and "error" not in r), None)
    for r in results:
        if full and r is not full and "error" not in r:
            lines.append(
                f"\n{r['profile']} / full (clip @25 steps): {r['clip_25_steps_s'] / full['clip_25_steps_s']:.2f}x"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profiles", default="full,24gb", help="comma list of full, 24gb, 12gb")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--frames", type=int, default=49)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--attention", choices=("probe", "auto", "cudnn", "flash"), default="probe")
    p.add_argument("--no-merge-lora", action="store_true", help="keep peft's LoRA layers (reference arithmetic)")
    p.add_argument("--rope", choices=("float32", "float64"), default="float32", help="float64: diffsynth's own rope")
    p.add_argument(
        "--resident-blocks", type=int, default=None, help="override the offload profiles' resident DiT blocks"
    )
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="toy model sizes: a smoke test of this script (CPU)")
    args = p.parse_args(argv)
    args.dtype = torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --tiny --device cpu for a smoke test)", file=sys.stderr)
        return 1
    from importlib.metadata import version

    import diffsynth  # noqa: F401

    dev = torch.device(args.device)
    meta = {
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "tiny": args.tiny,
        "torch": torch.__version__,
        "diffsynth": version("diffsynth"),
        "height": args.height,
        "width": args.width,
        "frames": args.frames,
        "steps": args.steps,
        "rope": args.rope,
        "merge_lora": not args.no_merge_lora,
        "tokens": ((args.frames - 1) // 4 + 1) * (args.height // 16) * (args.width // 16),
    }
    t_start = time.perf_counter()
    models = build_models(dev, args.dtype, args.tiny)
    meta["model_sizes"] = models.pop("sizes")
    color, mask = make_guide(args.frames, args.height, args.width)
    attention = None if args.attention == "probe" else args.attention
    results = []
    for profile in [s.strip() for s in args.profiles.split(",") if s.strip()]:
        log(f"profile {profile}")
        if results and BUDGET_GIB[profile] is None:  # back on the GPU after an offloading profile
            for k in ("dit", "text_encoder", "vae", "image_encoder", "camera_encoder"):
                models[k].to(dev)
        res = run_profile(models, profile, args, color, mask, attention)
        if attention is None and "attention_kernel" in res:
            attention = res["attention_kernel"]  # the probe runs once, on the first profile
        results.append(res)
    meta["wall_s"] = round(time.perf_counter() - t_start, 1)
    summary = {"meta": meta, "results": results}
    text = json.dumps(summary, indent=1)
    print(text)
    print()
    print(markdown(results, meta))
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
