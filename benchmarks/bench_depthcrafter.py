"""DepthCrafter at full size with random fp16 weights: time and peak GPU memory of our inference code.

Builds DepthCrafter's real architecture from the published configs, written out below (nothing is
downloaded): the spatio-temporal UNet of tencent/DepthCrafter (= SVD-xt's UNet config) and the VAE
(AutoencoderKLTemporalDecoder), CLIP ViT-H/14 image encoder and Euler scheduler of
stabilityai/stable-video-diffusion-img2vid-xt. Modules are constructed directly on the GPU
(PyTorch's default init, cast to fp16), then ``ex4d_backend.depth.depthcrafter.infer`` runs the clip
exactly as ``ex4d depth --model depthcrafter`` would (5 steps, guidance 1.0, window 110, overlap 25).

    PYTHONPATH=. python3 benchmarks/bench_depthcrafter.py                  # 512 x 512 x 49, H100: < 2 min
    PYTHONPATH=. python3 benchmarks/bench_depthcrafter.py --frames 110 --width 1024 --height 576
    PYTHONPATH=. python3 benchmarks/bench_depthcrafter.py --tiny --device cpu  # smoke test of this script

Prints one JSON object: per run (cold, warm, cpu-offload) the wall time, the time per stage and
``torch.cuda.max_memory_allocated`` during the run (weights included).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# tencent/DepthCrafter config.json (identical to SVD-xt's unet/config.json apart from the class name).
UNET_CONFIG = {
    "addition_time_embed_dim": 256,
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 1024,
    "down_block_types": [
        "CrossAttnDownBlockSpatioTemporal",
        "CrossAttnDownBlockSpatioTemporal",
        "CrossAttnDownBlockSpatioTemporal",
        "DownBlockSpatioTemporal",
    ],
    "in_channels": 8,
    "layers_per_block": 2,
    "num_attention_heads": [5, 10, 20, 20],
    "num_frames": 25,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 768,
    "sample_size": 96,
    "transformer_layers_per_block": 1,
    "up_block_types": [
        "UpBlockSpatioTemporal",
        "CrossAttnUpBlockSpatioTemporal",
        "CrossAttnUpBlockSpatioTemporal",
        "CrossAttnUpBlockSpatioTemporal",
    ],
}
# stable-video-diffusion-img2vid-xt/vae/config.json
VAE_CONFIG = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "out_channels": 3,
    "sample_size": 768,
    "scaling_factor": 0.18215,
}
# stable-video-diffusion-img2vid-xt/image_encoder/config.json (CLIP ViT-H/14 vision tower)
CLIP_CONFIG = {
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "image_size": 224,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "num_attention_heads": 16,
    "num_channels": 3,
    "num_hidden_layers": 32,
    "patch_size": 14,
    "projection_dim": 1024,
}
# stable-video-diffusion-img2vid-xt/scheduler/scheduler_config.json
SCHEDULER_CONFIG = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "sigma_max": 700.0,
    "sigma_min": 0.002,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "timestep_type": "continuous",
    "use_karras_sigmas": True,
}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TINY = {  # --tiny: same classes, a few MB, for checking this script on a CPU
    "unet": {
        **UNET_CONFIG,
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"],
        "up_block_types": ["UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"],
        "num_attention_heads": [2, 4],
        "layers_per_block": 1,
        "cross_attention_dim": 32,
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 24,
    },
    "vae": {**VAE_CONFIG, "block_out_channels": [32, 32, 32, 32], "layers_per_block": 1},
    "clip": {
        **CLIP_CONFIG,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "projection_dim": 32,
    },
}


def build(device: str, tiny: bool):
    """DepthCrafterModels with random weights (PyTorch default init) in fp16 on CUDA / fp32 on the CPU."""
    import torch
    from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from ex4d_backend.depth import depthcrafter as dc

    dev = torch.device(device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    cfg = TINY if tiny else {"unet": UNET_CONFIG, "vae": VAE_CONFIG, "clip": CLIP_CONFIG}
    torch.manual_seed(0)
    with dev:  # construct (and initialise) directly on the device: seconds, not minutes (then .to(dev) for the
        # few tensors made with legacy constructors, e.g. diffusers' AlphaBlender.mix_factor, which stay on the CPU)
        unet = dc._unet_class()(**cfg["unet"]).to(dev, dtype).eval()
        vae = AutoencoderKLTemporalDecoder(**cfg["vae"]).to(dev, dtype).eval()
        enc = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg["clip"])).to(dev, dtype).eval()
    sched = EulerDiscreteScheduler(**SCHEDULER_CONFIG)
    models = dc.DepthCrafterModels(unet, vae, enc, sched, CLIP_MEAN, CLIP_STD, dev, dtype)
    params = {
        "unet": sum(p.numel() for p in unet.parameters()),
        "vae": sum(p.numel() for p in vae.parameters()),
        "image_encoder": sum(p.numel() for p in enc.parameters()),
    }
    return models, params


def clip(n: int, h: int, w: int) -> np.ndarray:
    """uint8 (n, h, w, 3): a textured gradient drifting one pixel per frame (any content will do)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    base += rng.normal(0, 8, base.shape)
    return np.stack([np.roll(base, t, axis=1) for t in range(n)]).clip(0, 255).astype(np.uint8)


def run_once(frames, models, opts: dict) -> dict:
    import torch

    from ex4d_backend.depth import depthcrafter as dc
    from ex4d_backend.errors import Ex4dError

    cuda = models.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    marks: dict[str, float] = {}

    def progress(stage, step, total, message):
        # infer reports step 1 after encoding, total - 1 after the last denoising step, total at the end
        sync()
        if step == 1:
            marks["encoded"] = time.perf_counter()
        elif step == total - 1:
            marks["denoised"] = time.perf_counter()

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    try:
        disp = dc.infer(frames, models, progress=progress, **opts)
        finite, shape = bool(np.isfinite(disp).all()), list(disp.shape)
    except Ex4dError as exc:  # random weights may overflow fp16; the timing still stands
        finite, shape = False, str(exc)
    sync()
    t1 = time.perf_counter()
    out = {
        "seconds": round(t1 - t0, 3),
        "encode_s": round(marks.get("encoded", t0) - t0, 3),
        "denoise_s": round(marks.get("denoised", t1) - marks.get("encoded", t0), 3),
        "decode_s": round(t1 - marks.get("denoised", t1), 3),
        "finite": finite,
        "output_shape": shape,
    }
    if cuda:
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=49)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny configs (checks the script, e.g. on a CPU)")
    ap.add_argument("--no-offload", action="store_true", help="skip the cpu-offload run")
    args = ap.parse_args(argv)

    import diffusers
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(json.dumps({"error": "CUDA is not available (use --tiny --device cpu for a smoke test)"}))
        return 2
    t = time.perf_counter()
    models, params = build(args.device, args.tiny)
    cuda = models.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t
    frames = clip(args.frames, args.height, args.width)
    opts = {"steps": args.steps, "guidance": 1.0, "window": 110, "overlap": 25, "max_res": 1024, "seed": 42}
    result = {
        "benchmark": "depthcrafter",
        "device": torch.cuda.get_device_name(models.device) if cuda else "cpu",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "dtype": str(models.dtype).replace("torch.", ""),
        "frames": args.frames,
        "size": [args.width, args.height],
        "options": opts,
        "tiny": args.tiny,
        "params": params,
        "build_s": round(build_s, 2),
        "weights_gib": round(torch.cuda.memory_allocated() / 2**30, 2) if cuda else None,
        "runs": {},
    }
    result["runs"]["cold"] = run_once(frames, models, opts)
    result["runs"]["warm"] = run_once(frames, models, opts)
    if cuda and not args.no_offload:
        models.to("cpu")
        models.cpu_offload = True
        torch.cuda.empty_cache()
        result["runs"]["cpu_offload"] = run_once(frames, models, opts)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
