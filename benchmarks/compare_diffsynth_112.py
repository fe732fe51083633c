"""How far is EX-4D's conditioned DiT on diffsynth 2.x (ours) from the reference's on diffsynth 1.1.2?

The published EX-4D code vendors diffsynth 1.1.2 and adds the camera tokens to the DiT's tokens right
after patchify. This script builds both DiTs with IDENTICAL random weights (the two models share the
very same tensors; the LoRA is injected into both with peft as the reference does) and runs both on
identical inputs, then prints cosine similarity and max error of the flow predictions as JSON.

- ours: ``ex4d_backend.generation.pipeline.conditioned_dit`` (diffsynth 2.x ``model_fn_wan_video`` +
  our ``CameraTokenHook``), bf16 weights, float32 timestep, exactly what ``Ex4dPipeline`` runs.
- reference: diffsynth 1.1.2 ``WanModel.forward`` called as its ``WanVideoPipeline`` calls it
  (bf16 weights under ``torch.autocast(bfloat16)``, float32 latents and timestep, the prompt
  embedding trimmed to its length and zero-padded to 512 by the model), with the camera tokens
  added to the patch-embedding output (= to the tokens right after patchify).

diffsynth 1.1.2 and 2.x are both called ``diffsynth``: 1.1.2 is imported under the package name
``diffsynth_112`` straight from its files (the package ``__init__`` is never run, so none of its
optional dependencies are needed); it is found in ``--d112 DIR`` (a ``pip install --no-deps --target
DIR diffsynth==1.1.2``), ``$EX4D_DIFFSYNTH_112``, the dev install's side environment ``.venv-ref112``,
``/tmp/d112``, or extracted from the wheel in ``<repo>/.whl112/``. On the CPU 1.1.2's ``flash_attention`` (it asserts CUDA) is replaced by the same
computation with ``F.scaled_dot_product_attention``; on the GPU its own code runs unchanged (its SDPA
fallback when the flash-attn package is absent).

GPU (the lead; ~1-2 min, ~60 GB): ``PYTHONPATH=. python3 benchmarks/compare_diffsynth_112.py``
(defaults: 14B config, 512 x 512 x 49 = 13,312 tokens, bf16, cuda).
Issue 13's precision figure (both of our precisions against the reference DiT, times per forward; ~3 min,
~70 GB): ``PYTHONPATH=. python3 benchmarks/compare_diffsynth_112.py --precisions --json results.json``.
CPU smoke: ``python3 benchmarks/compare_diffsynth_112.py --config tiny --device cpu --dtype float32`` and
``... --precisions --config tiny --device cpu --frames 5 --height 64 --width 64 --repeats 1``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import time
import types
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
WHEEL_DIR = REPO / ".whl112"
PKG = "diffsynth_112"

CONFIGS = {
    "14b": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, text_dim=4096, freq_dim=256, in_dim=36),
    "tiny": dict(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=64, freq_dim=256, in_dim=36),
}
ENCODER_HIDDEN = {"14b": 1024, "tiny": 32}


# ------------------------------------------------------------------------- import 1.1.2 beside 2.x
def find_d112(path: str | os.PathLike | None = None) -> Path:
    """A folder holding ``diffsynth/`` of release 1.1.2 (installed with --target, or the wheel unpacked)."""
    side = sorted(REPO.glob(".venv-ref112/lib/python3*/site-packages"))  # scripts/install_deps.py --dev
    candidates = [path, os.environ.get("EX4D_DIFFSYNTH_112"), *side, "/tmp/d112"]
    for c in candidates:
        if c and (Path(c) / "diffsynth" / "models" / "wan_video_dit.py").is_file():
            return Path(c)
    wheels = sorted(WHEEL_DIR.glob("diffsynth-1.1.2-*.whl"))
    if not wheels:
        raise FileNotFoundError(
            "diffsynth 1.1.2 not found: pip download diffsynth==1.1.2 --no-deps -d .whl112 "
            "(or pip install --no-deps --target /tmp/d112 diffsynth==1.1.2)"
        )
    dest = Path(os.environ.get("TMPDIR", "/tmp")) / "ex4d-diffsynth-1.1.2"
    need = (
        "diffsynth/models/wan_video_dit.py",
        "diffsynth/models/utils.py",
        "diffsynth/schedulers/flow_match.py",
    )
    if not all((dest / n).is_file() for n in need):
        with zipfile.ZipFile(wheels[0]) as z:
            for n in need:
                z.extract(n, dest)
    return dest


def import_d112(path: str | os.PathLike | None = None) -> types.SimpleNamespace:
    """diffsynth 1.1.2's ``models.wan_video_dit`` and ``schedulers.flow_match`` as ``diffsynth_112.*``."""
    root = find_d112(path) / "diffsynth"
    if f"{PKG}.models.wan_video_dit" not in sys.modules:
        for sub in ("", ".models", ".schedulers"):  # bare packages: their __init__ is never run
            mod = types.ModuleType(PKG + sub)
            mod.__path__ = [str(root / sub.lstrip("."))]
            sys.modules[PKG + sub] = mod
        for name in ("models.utils", "models.wan_video_dit", "schedulers.flow_match"):
            spec = importlib.util.spec_from_file_location(f"{PKG}.{name}", root / (name.replace(".", "/") + ".py"))
            mod = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mod
            spec.loader.exec_module(mod)
    return types.SimpleNamespace(
        dit=sys.modules[f"{PKG}.models.wan_video_dit"], flow_match=sys.modules[f"{PKG}.schedulers.flow_match"]
    )


def _cpu_flash_attention(q, k, v, q_lens=None, k_lens=None, **_):
    """1.1.2's ``flash_attention`` (q, k, v: [B, L, N, D]; full-length sequences) on the CPU: the same
    softmax(q k^T / sqrt(D)) v, through SDPA (the original asserts CUDA)."""
    out_dtype = q.dtype
    q, k = q.to(v.dtype), k.to(v.dtype)
    x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return x.transpose(1, 2).contiguous().to(out_dtype)


class _LayerNormFloat32(torch.overrides.TorchFunctionMode):
    """CUDA autocast's float32 policy for ``layer_norm`` on the CPU (CPU autocast leaves it mixed)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.layer_norm:
            args = tuple(a.float() if isinstance(a, torch.Tensor) else a for a in args)
            kwargs = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            with torch.autocast(device_type="cpu", enabled=False):
                return func(*args, **kwargs)
        return func(*args, **kwargs)


class _Float32Linear(torch.overrides.TorchFunctionMode):
    """CUDA's ``autocast(dtype=float32)`` for the linear layers inside it, on the CPU (which has no float32
    autocast): ``F.linear`` on float32 copies of its arguments, autocast off."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            args = tuple(a.float() if isinstance(a, torch.Tensor) else a for a in args)
            kwargs = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            with torch.autocast(device_type="cpu", enabled=False):
                return func(*args, **kwargs)
        return func(*args, **kwargs)


def _cpu_autocast(dtype=None, device_type="cuda", **kwargs):
    """1.1.2's ``amp.autocast`` calls on the CPU: its ``(dtype=float32, device_type="cuda")`` islands as
    :class:`_Float32Linear` (what they do on the GPU), anything else as a CPU autocast."""
    if dtype == torch.float32:
        return _Float32Linear()
    return torch.autocast(device_type="cpu", dtype=dtype, **kwargs)


# ------------------------------------------------------------------------------------ the models
def _fill_random_(module: nn.Module, seed: int) -> None:
    """Deterministic, well-scaled random weights (the output must not vanish or explode in 40 layers)."""
    gen = torch.Generator(next(module.parameters()).device).manual_seed(seed)
    for name, p in sorted(module.named_parameters()):
        with torch.no_grad():
            if name.endswith("modulation"):
                p.copy_(torch.randn(p.shape, generator=gen, device=p.device) / p.shape[-1] ** 0.5)
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, device=p.device) * 0.05)
            elif p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen, device=p.device) / fan_in**0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen, device=p.device))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen, device=p.device))


def build_ours(cfg: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """diffsynth 2.x WanModel (I2V) + EX-4D LoRA, random weights made directly on ``device``."""
    from diffsynth.models.wan_video_dit import WanModel, precompute_freqs_cis_3d

    from ex4d_backend.generation.camera_encoder import CameraTokenHook
    from ex4d_backend.generation.loading import inject_lora

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # meta tensors in the target dtype: to_empty allocates it directly
    try:
        with torch.device("meta"):
            dit = WanModel(**cfg, out_dim=16, eps=1e-6, patch_size=(1, 2, 2), has_image_input=True)
            inject_lora(dit)
    finally:
        torch.set_default_dtype(default)
    dit = dit.to_empty(device=device)
    _fill_random_(dit, seed)
    dit.freqs = precompute_freqs_cis_3d(cfg["dim"] // cfg["num_heads"])
    dit.eval().requires_grad_(False)
    return dit, CameraTokenHook(dit)


class _AddCameraTokens(nn.Module):
    """The reference's change to 1.1.2: camera tokens added to the tokens right after patchify."""

    def __init__(self, conv: nn.Conv3d):
        super().__init__()
        self.conv = conv
        self.tokens: torch.Tensor | None = None

    def forward(self, x):
        x = self.conv(x)
        return x if self.tokens is None else x + self.tokens.to(x.dtype)


def build_reference(d112, ours: nn.Module, cfg: dict, device: torch.device):
    """diffsynth 1.1.2 WanModel (i2v) + the same peft LoRA, sharing every tensor with ``ours``."""
    from ex4d_backend.generation.loading import inject_lora

    with torch.device("meta"):
        ref = d112.dit.WanModel(
            model_type="i2v",
            patch_size=(1, 2, 2),
            text_len=512,
            in_dim=cfg["in_dim"],
            dim=cfg["dim"],
            ffn_dim=cfg["ffn_dim"],
            freq_dim=cfg["freq_dim"],
            text_dim=cfg["text_dim"],
            out_dim=16,
            num_heads=cfg["num_heads"],
            num_layers=cfg["num_layers"],
            qk_norm=True,
            cross_attn_norm=True,
            eps=1e-6,
        )
        inject_lora(ref)
    ref.load_state_dict(ours.state_dict(), strict=True, assign=True)
    d = cfg["dim"] // cfg["num_heads"]
    rp = d112.dit.rope_params
    ref.freqs = torch.cat([rp(1024, d - 4 * (d // 6)), rp(1024, 2 * (d // 6)), rp(1024, 2 * (d // 6))], dim=1)
    ref.patch_embedding = _AddCameraTokens(ref.patch_embedding)
    if device.type != "cuda":
        d112.dit.flash_attention = _cpu_flash_attention
        d112.dit.amp = types.SimpleNamespace(autocast=_cpu_autocast)
    return ref.eval().requires_grad_(False)


def run_reference(ref, d112_dtype, latents, timestep, context, ctx_len, clip_feature, y, camera_tokens):
    """1.1.2 ``WanModel.forward`` as 1.1.2's ``WanVideoPipeline.__call__`` calls it."""
    ref.patch_embedding.tokens = camera_tokens
    f, h, w = latents.shape[2], latents.shape[3] // 2, latents.shape[4] // 2
    dev = latents.device
    cpu_bf16 = dev.type == "cpu" and d112_dtype == torch.bfloat16
    with (
        torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=d112_dtype == torch.bfloat16),
        _LayerNormFloat32() if cpu_bf16 else contextlib.nullcontext(),
    ):
        out = ref(
            latents.float(),
            timestep=timestep.float(),
            context=[context[0, :ctx_len]],
            seq_len=f * h * w,
            clip_fea=clip_feature,
            y=[y[0]],
        )
    ref.patch_embedding.tokens = None
    return out


def make_inputs(cfg: dict, frames: int, height: int, width: int, device, dtype, seed: int = 1, hidden: int = 1024):
    """Random but realistic DiT inputs (float32 noise, I2V mask + latent, padded prompt, camera tokens
    from a random non-zero CamVidEncoder on random guide latents)."""
    from ex4d_backend.generation.camera_encoder import CamVidEncoder

    g = torch.Generator(device).manual_seed(seed)
    f, h, w = (frames - 1) // 4 + 1, height // 8, width // 8

    def rnd(*shape):
        return torch.randn(shape, generator=g, device=device)

    ctx_len = 40
    context = torch.zeros(1, 512, cfg["text_dim"], device=device)
    context[:, :ctx_len] = rnd(1, ctx_len, cfg["text_dim"]) * 0.3
    msk = torch.zeros(1, 4, f, h, w, device=device)
    msk[:, :, 0] = 1
    y = torch.cat([msk, rnd(1, 16, f, h, w)], dim=1)
    enc = CamVidEncoder(16, hidden, cfg["dim"]).to(device)
    _fill_random_(enc, seed + 7)
    with torch.no_grad():
        cam = enc(rnd(1, 16, f, h, w), rnd(1, 16, f, h, w))
    return dict(
        latents=rnd(1, 16, f, h, w),
        timestep=torch.tensor([937.5], device=device),  # not representable in bf16 (-> 936)
        context=context.to(dtype),
        ctx_len=ctx_len,
        clip_feature=(rnd(1, 257, 1280)).to(dtype),
        y=y.to(dtype),
        camera_tokens=cam.to(dtype),
    )


def metrics(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.double().flatten(), b.double().flatten()
    err = (a - b).abs()
    return {
        "cosine": float(F.cosine_similarity(a, b, dim=0)),
        "max_abs_err": float(err.max()),
        "mean_abs_err": float(err.mean()),
        "max_abs_ref": float(b.abs().max()),
        "rel_l2_err": float((a - b).norm() / b.norm()),
    }


def compare(
    config: str = "14b",
    device: str = "cuda",
    dtype: str = "bfloat16",
    frames: int = 49,
    height: int = 512,
    width: int = 512,
    d112_path: str | None = None,
    seed: int = 0,
    rope: str = "float32",
    precision: str = "bf16",
) -> dict:
    """Build both DiTs on identical weights, run them on identical inputs; return the figures.
    ``precision="reference"`` runs ours with :func:`enable_reference_precision` (float64 rope)."""
    from ex4d_backend.generation.loading import lora_to_float32
    from ex4d_backend.generation.pipeline import conditioned_dit, enable_reference_precision

    dev, dt = torch.device(device), getattr(torch, dtype)
    cfg = CONFIGS[config]
    d112 = import_d112(d112_path)
    t0 = time.perf_counter()
    ours, hook = build_ours(cfg, dev, dt, seed)
    ref = build_reference(d112, ours, cfg, dev)
    lora_to_float32(ref)  # the reference's add_lora_to_model
    if precision == "reference":
        enable_reference_precision(ours, hook)
        rope = "float64"
    inp = make_inputs(cfg, frames, height, width, dev, dt, seed + 1, ENCODER_HIDDEN[config])
    build_s = time.perf_counter() - t0

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    args = (inp["latents"], inp["timestep"], inp["context"], inp["clip_feature"], inp["y"])
    with torch.no_grad():
        sync()
        t0 = time.perf_counter()
        out_ours = conditioned_dit(ours, hook, *args, inp["camera_tokens"], dt, rope, precision).float()
        sync()
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        out_ref = run_reference(
            ref,
            dt,
            inp["latents"],
            inp["timestep"],
            inp["context"],
            inp["ctx_len"],
            inp["clip_feature"],
            inp["y"],
            inp["camera_tokens"],
        ).float()
        sync()
        t_ref = time.perf_counter() - t0
        ref_nocam = run_reference(
            ref,
            dt,
            inp["latents"],
            inp["timestep"],
            inp["context"],
            inp["ctx_len"],
            inp["clip_feature"],
            inp["y"],
            None,
        ).float()
    result = {
        "config": config,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": dtype,
        "rope": rope,
        "precision": precision,
        "tokens": int(inp["latents"][0, 0].numel() // 4),
        "shape": list(out_ours.shape),
        "ours_vs_1.1.2": metrics(out_ours, out_ref),
        # how much the camera tokens move the reference's output: the agreement must be far tighter
        "camera_effect_rel_l2": float((out_ref - ref_nocam).double().norm() / out_ref.double().norm()),
        "seconds": {"build": round(build_s, 2), "forward_ours": round(t_ours, 3), "forward_1.1.2": round(t_ref, 3)},
    }
    if dev.type == "cuda":
        result["peak_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 1)
    return result


def _timed(fn, device: torch.device, repeats: int):
    """(output of the last call, mean seconds per call over ``repeats`` calls after one warm-up call)."""
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, (time.perf_counter() - t0) / max(repeats, 1)


def compare_precisions(
    config: str = "14b",
    device: str = "cuda",
    frames: int = 49,
    height: int = 512,
    width: int = 512,
    repeats: int = 3,
    d112_path: str | None = None,
    seed: int = 0,
) -> dict:
    """Issue 13's GPU figure: our DiT in both precisions against the reference DiT (diffsynth 1.1.2's WanModel
    under bf16 autocast, LoRA in float32, camera tokens after patchify), identical bf16 weights and inputs.

    - ``reference``: :func:`enable_reference_precision` (unmerged float32 LoRA, float32 timestep embedding /
      projection / head, bf16 autocast, float64 rope).
    - ``bf16`` (the default pipeline): every tensor in bf16, LoRA merged into the weights, float32 rope.
    Reports cosine and relative L2 against the reference and the mean time per forward (after a warm-up)."""
    from ex4d_backend.generation.loading import lora_to_float32, merge_lora
    from ex4d_backend.generation.pipeline import (
        conditioned_dit,
        disable_reference_precision,
        enable_reference_precision,
    )

    dev, dt = torch.device(device), torch.bfloat16
    cfg = CONFIGS[config]
    d112 = import_d112(d112_path)
    ours, hook = build_ours(cfg, dev, dt, seed)
    ref = build_reference(d112, ours, cfg, dev)
    lora_to_float32(ref)  # the reference's add_lora_to_model
    inp = make_inputs(cfg, frames, height, width, dev, dt, seed + 1, ENCODER_HIDDEN[config])
    args = (inp["latents"], inp["timestep"], inp["context"], inp["clip_feature"], inp["y"])
    res = {"config": config, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "tokens": int(inp["latents"][0, 0].numel() // 4), "repeats": repeats}  # fmt: skip
    with torch.no_grad():
        ref_args = (inp["latents"], inp["timestep"], inp["context"], inp["ctx_len"], inp["clip_feature"], inp["y"])
        out_ref, t_ref = _timed(lambda: run_reference(ref, dt, *ref_args, inp["camera_tokens"]).float(), dev, repeats)
        res["reference_dit_1.1.2"] = {"seconds_per_forward": round(t_ref, 4)}
        enable_reference_precision(ours, hook)

        def run_ours(rope, precision):
            return conditioned_dit(ours, hook, *args, inp["camera_tokens"], dt, rope, precision).float()

        out, t = _timed(lambda: run_ours("float64", "reference"), dev, repeats)
        res["reference"] = {**metrics(out, out_ref), "seconds_per_forward": round(t, 4)}
        disable_reference_precision(ours, hook)
        merge_lora(ours)  # in place into the base weights the reference shares: it has run already
        out, t = _timed(lambda: run_ours("float32", "bf16"), dev, repeats)
        res["bf16"] = {**metrics(out, out_ref), "seconds_per_forward": round(t, 4)}
    if dev.type == "cuda":
        res["peak_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 1)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="14b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--frames", type=int, default=49)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--d112", default=None, help="folder with diffsynth 1.1.2 (pip install --target DIR)")
    p.add_argument("--rope", choices=("float32", "float64"), default="float32", help="our DiT's rope precision")
    p.add_argument(
        "--precisions",
        action="store_true",
        help="issue 13's figure: both of our precisions (bf16, reference) against the reference DiT, with timings",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per variant (--precisions)")
    p.add_argument("--json", default=None, help="also write the result to this file")
    a = p.parse_args(argv)
    if a.precisions:
        res = compare_precisions(a.config, a.device, a.frames, a.height, a.width, a.repeats, a.d112)
    else:
        res = compare(a.config, a.device, a.dtype, a.frames, a.height, a.width, a.d112, rope=a.rope)
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
