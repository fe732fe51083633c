"""The ``fast`` profile's arithmetic: FP8 linear layers, 8-bit attention, an optional step cache.

1. **FP8 linear layers** (:class:`Fp8Linear`). Every ``nn.Linear`` inside the DiT's transformer blocks
   (self-attention q/k/v/o, cross-attention q/k/v/o/k_img/v_img, FFN in/out: :data:`FP8_LAYERS`) is
   replaced by a layer whose weight is STORED in ``float8_e4m3fn`` with one float32 scale per output
   channel (row of W), ``s_w[n] = max_k |W[n, k]| / 448`` and ``Wq = e4m3(W / s_w)``. Activations are
   quantised per token (row of X) the same way at run time, and the product is
   ``Y = (Xq * s_x) @ (Wq * s_w)^T + b``, computed by ``torch._scaled_mm`` on the GPU (Hopper / Ada:
   FP8 tensor cores) and emulated by exactly that dequantised float32 matmul on the CPU.
   Kept as they were (precision sensitive or negligible in cost): the patch / text / time embeddings,
   the time projection, the image-embedding MLP, every norm, the modulation tables, the head, the
   camera encoder. The EX-4D LoRA is merged into the bf16 weights BEFORE quantising.
2. **8-bit attention** (:class:`Int8Attention`) for the DiT's self-attention (the only attention with a
   long key sequence): SageAttention 1.0.6 (Triton, INT8 Q K^T with per-block scales, FP16 P V) when the
   ``sageattention`` package imports and the tensors are on the GPU; otherwise PyTorch's SDPA (bf16),
   and :func:`use_8bit_attention` says so.
3. **Step cache** (:class:`StepCache`, off unless asked for): reuses the previous DiT prediction for a
   denoising step when the predicted change of the DiT output since the last evaluation is below a
   threshold (EasyCache-style: the output/input change ratio measured between the last two evaluated
   steps, times the input's relative change since the last evaluation). Its effect on image quality
   cannot be judged without the real weights; ``benchmarks/bench_fast.py`` measures only its speed and
   its deviation on random weights.

``full`` never uses any of this; :func:`exact_attention` keeps diffsynth from switching the other
profiles to SageAttention just because the package is installed.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
AMAX_FLOOR = 1e-12  # an all-zero row gets a tiny scale (and quantises to zeros) instead of 0 / 0
FP8_MIN_CAPABILITY = (8, 9)  # Ada (8.9) and Hopper (9.0) have FP8 tensor cores
ACTIVATION_SCALINGS = ("row", "tensor")
# Hopper's FP8 "fast accumulation" (no periodic promotion of the tensor-core accumulator): faster GEMMs,
# an accumulation error far below the e4m3 rounding of the operands (bench_fast.py measures both).
FP8_FAST_ACCUM = True
# Linear layers converted to FP8, by name inside each ``dit.blocks[i]`` (all others are kept).
FP8_LAYERS = (
    "self_attn.q",
    "self_attn.k",
    "self_attn.v",
    "self_attn.o",
    "cross_attn.q",
    "cross_attn.k",
    "cross_attn.v",
    "cross_attn.o",
    "cross_attn.k_img",
    "cross_attn.v_img",
    "ffn.0",
    "ffn.2",
)


# ---------------------------------------------------------------------------------- FP8 maths
def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> (M, K) float8_e4m3fn and (M, 1) float32 scales with ``x ~= q * s`` per row:
    ``s = max(|x_row|) / 448``, ``q = e4m3(clamp(x / s, -448, 448))`` (round to nearest even)."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp_(min=AMAX_FLOOR)
    scale = amax / FP8_MAX
    q = (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`quantize_rows` with one scale for the whole tensor (a () float32 scale)."""
    scale = x.abs().amax().float().clamp(min=AMAX_FLOOR) / FP8_MAX
    q = (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``q * scale`` (scale broadcast: (M, 1) per row or () per tensor)."""
    return q.float() * scale


def fp8_matmul(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    *,
    fast_accum: bool = False,
) -> torch.Tensor:
    """``(xq * x_scale) @ (wq * w_scale)^T + bias`` in ``out_dtype``.

    ``xq`` (M, K) and ``wq`` (N, K) float8_e4m3fn; ``x_scale`` (M, 1) or (); ``w_scale`` (N, 1). On CUDA:
    ``torch._scaled_mm`` (per-row x per-row scales when ``x_scale`` is (M, 1); with a per-tensor
    ``x_scale`` the product is scaled per tensor by the GPU and per output channel afterwards). On the
    CPU: the same product with dequantised float32 operands (the emulation the tests check)."""
    if xq.device.type != "cuda":
        out = dequantize(xq, x_scale) @ dequantize(wq, w_scale).t()
        if bias is not None:
            out = out + bias.float()
        return out.to(out_dtype)
    if x_scale.dim() == 2:
        return torch._scaled_mm(
            xq,
            wq.t(),
            scale_a=x_scale,
            scale_b=w_scale.t(),
            bias=bias,
            out_dtype=out_dtype,
            use_fast_accum=fast_accum,
        )
    one = torch.ones((), device=xq.device, dtype=torch.float32)
    out = torch._scaled_mm(xq, wq.t(), scale_a=x_scale, scale_b=one, out_dtype=torch.float32, use_fast_accum=fast_accum)
    out = out * w_scale.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


class Fp8Linear(nn.Module):
    """A ``nn.Linear`` whose weight is stored in float8_e4m3fn with per-output-channel scales.

    Buffers: ``weight`` (out, in) float8_e4m3fn, ``weight_scale`` (out, 1) float32, ``bias`` (out,) in the
    original dtype (or None). Input (..., in) in any float dtype; output (..., out) in the input's dtype.
    ``activation_scaling``: ``row`` (one scale per token, default) or ``tensor`` (one per call)."""

    def __init__(self, in_features: int, out_features: int, *, activation_scaling: str = "row", fast_accum=False):
        super().__init__()
        if activation_scaling not in ACTIVATION_SCALINGS:
            raise ValueError(f"activation_scaling must be one of {ACTIVATION_SCALINGS}")
        self.in_features, self.out_features = in_features, out_features
        self.activation_scaling, self.fast_accum = activation_scaling, fast_accum
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8_DTYPE))
        self.register_buffer("weight_scale", torch.empty(out_features, 1, dtype=torch.float32))
        self.bias: torch.Tensor | None
        self.register_buffer("bias", None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, **options) -> Fp8Linear:
        """Quantise ``linear``'s weight (on its device); the bias is kept as it is."""
        layer = cls(linear.in_features, linear.out_features, **options)
        wq, scale = quantize_rows(linear.weight)
        layer.weight, layer.weight_scale = wq, scale
        if linear.bias is not None:
            layer.bias = linear.bias.detach()
        return layer

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize(self.weight, self.weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        xq, sx = quantize_rows(x2) if self.activation_scaling == "row" else quantize_tensor(x2)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        out = fp8_matmul(xq, sx, self.weight, self.weight_scale, bias, x.dtype, fast_accum=self.fast_accum)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weight=float8_e4m3fn per-channel, activations={self.activation_scaling}"
        )


def probe_scaled_mm(device: torch.device) -> str:
    """The activation scaling ``torch._scaled_mm`` supports on ``device``: ``row`` (per-token x
    per-channel, Hopper), else ``tensor``; each checked against the emulation on a small product.
    On the CPU: ``row`` (emulated). Raises RuntimeError when FP8 products do not run at all."""
    if device.type != "cuda":
        return "row"
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(64, 128, device=device, generator=g, dtype=torch.bfloat16)
    w = torch.randn(96, 128, device=device, generator=g, dtype=torch.bfloat16)
    b = torch.randn(96, device=device, generator=g, dtype=torch.bfloat16)
    wq, ws = quantize_rows(w)
    errors = []
    for mode, quant in (("row", quantize_rows), ("tensor", quantize_tensor)):
        xq, xs = quant(x)
        try:
            out = fp8_matmul(xq, xs, wq, ws, b, torch.bfloat16).float()
        except Exception as exc:  # noqa: BLE001 - an unsupported scaling on this GPU / torch build
            errors.append(f"{mode}: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        ref = dequantize(xq, xs) @ dequantize(wq, ws).t() + b.float()
        if float((out - ref).norm() / ref.norm()) < 1e-2:
            return mode
        errors.append(f"{mode}: result differs from the dequantised product")
    raise RuntimeError("FP8 matrix products do not run on this GPU: " + "; ".join(errors))


@dataclass
class Conversion:
    """What :func:`convert_dit` did: module names (as in ``dit.named_modules()``)."""

    converted: list[str] = field(default_factory=list)  # now Fp8Linear
    kept: list[str] = field(default_factory=list)  # nn.Linear / Conv3d left in their dtype
    lora_merged: int = 0  # peft LoRA layers folded into their base weights first
    bytes_before: int = 0  # weight bytes of the converted layers before / after
    bytes_after: int = 0
    activation_scaling: str = "row"  # what the GPU supports (probe_scaled_mm)


@torch.no_grad()
def convert_dit(dit: nn.Module, *, activation_scaling: str = "row", fast_accum: bool = FP8_FAST_ACCUM) -> Conversion:
    """Replace the DiT blocks' :data:`FP8_LAYERS` by :class:`Fp8Linear` (in place, on the weights' device).

    peft LoRA layers still in the DiT are merged into their bf16 base weights first (the quantised
    weight is then that of W + B A alpha / r, as the merged ``full`` profile computes). Idempotent."""
    from .loading import merge_lora

    report = Conversion(lora_merged=merge_lora(dit))
    if activation_scaling == "row":
        activation_scaling = probe_scaled_mm(dit.patch_embedding.weight.device)
    report.activation_scaling = activation_scaling
    targets = {f"blocks.{i}.{name}" for i in range(len(dit.blocks)) for name in FP8_LAYERS}
    for name, module in list(dit.named_modules()):
        if name in targets and isinstance(module, nn.Linear):
            layer = Fp8Linear.from_linear(module, activation_scaling=activation_scaling, fast_accum=fast_accum)
            parent, _, child = name.rpartition(".")
            setattr(dit.get_submodule(parent), child, layer)
            report.converted.append(name)
            report.bytes_before += module.weight.numel() * module.weight.element_size()
            report.bytes_after += layer.weight.numel() + layer.weight_scale.numel() * 4
            del module
        elif isinstance(module, Fp8Linear):
            report.converted.append(name)
        elif isinstance(module, (nn.Linear, nn.Conv3d)):
            report.kept.append(name)
    return report


# ------------------------------------------------------------------------------- attention
def sageattention_version() -> str | None:
    """The installed ``sageattention`` version, or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sageattention")
    except PackageNotFoundError:
        return None


@torch.library.custom_op("ex4d::sage_attention", mutates_args=())
def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SageAttention on (B, S, heads, head_dim) tensors ("NHD"); opaque to torch.compile. K must already
    be smoothed (mean over the keys subtracted: softmax is unchanged by it, INT8 K loses less)."""
    from sageattention import sageattn

    out = sageattn(q.contiguous(), k.contiguous(), v.contiguous(), tensor_layout="NHD", smooth_k=False)
    return out.contiguous()


@sage_attention.register_fake
def _(q, k, v):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


class Int8Attention(nn.Module):
    """Drop-in for diffsynth's ``AttentionModule``: (B, S, heads * d) q, k, v -> (B, S, heads * d).

    ``kernel``: ``sage`` (SageAttention 1.x, INT8 Q K^T) or ``sdpa`` (PyTorch's bf16 attention)."""

    def __init__(self, num_heads: int, kernel: str = "sage"):
        super().__init__()
        self.num_heads, self.kernel = num_heads, kernel

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, s, hd = q.shape
        n = self.num_heads
        if self.kernel == "sage":
            q4, k4, v4 = q.view(b, s, n, -1), k.view(b, k.shape[1], n, -1), v.view(b, v.shape[1], n, -1)
            k4 = k4 - k4.mean(dim=1, keepdim=True)
            return sage_attention(q4, k4, v4).reshape(b, s, hd)
        q4, k4, v4 = (t.unflatten(2, (n, -1)).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q4, k4, v4).transpose(1, 2).reshape(b, s, hd)


def attention_kernel(device: torch.device, requested: str = "auto") -> tuple[str, str]:
    """(kernel, note): ``sage`` where SageAttention can run (CUDA and the package imports), else
    ``sdpa`` with the reason. ``requested``: ``auto``, ``sage`` or ``sdpa``."""
    if requested == "sdpa":
        return "sdpa", "bf16 SDPA (8-bit attention not requested)"
    if device.type != "cuda":
        return "sdpa", "bf16 SDPA: SageAttention needs a CUDA GPU"
    try:
        import sageattention  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a missing or broken package: fall back, say why
        return (
            "sdpa",
            f"bf16 SDPA: sageattention is not installed ({type(exc).__name__}); pip install sageattention==1.0.6",
        )
    return "sage", f"SageAttention {sageattention_version()} (INT8 QK, FP16 PV)"


def use_8bit_attention(dit: nn.Module, device: torch.device, requested: str = "auto") -> str:
    """Route every block's self-attention through :class:`Int8Attention`; returns the note of
    :func:`attention_kernel` (also logged). Cross-attention (512 + 257 keys) keeps diffsynth's SDPA."""
    kernel, note = attention_kernel(device, requested)
    for block in dit.blocks:
        block.self_attn.attn = Int8Attention(block.self_attn.num_heads, kernel)
    (log.info if kernel == "sage" else log.warning)("fast profile attention: %s", note)
    return note


@contextlib.contextmanager
def exact_attention() -> Iterator[None]:
    """While entered, diffsynth's Wan attention does not pick SageAttention even when it is installed
    (diffsynth chooses it at import time, before PyTorch's SDPA): the exact profiles stay exact."""
    from diffsynth.models import wan_video_dit

    before = wan_video_dit.SAGE_ATTN_AVAILABLE
    wan_video_dit.SAGE_ATTN_AVAILABLE = False
    try:
        yield
    finally:
        wan_video_dit.SAGE_ATTN_AVAILABLE = before


# ------------------------------------------------------------------------------ step cache
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (float32)."""
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


class StepCache:
    """Skips DiT evaluations whose output would barely change (EasyCache / TeaCache style).

    Wraps ``predict(latents, timestep, cond) -> prediction``. After two evaluations it knows the DiT's
    transformation rate ``k = rel(v1, v0) / rel(x1, x0)`` (relative output change per relative input
    change between the last two evaluated steps); a later step is skipped (the last prediction is
    returned) while ``k * rel(x, x_last) < threshold``, at most ``max_skip`` steps in a row, never during
    the first ``warmup`` calls and never when ``timestep < final_timestep`` (the last, detail-forming
    steps: with 25 steps and shift 5 that is the final step). A larger timestep than the last one
    starts a new clip (the state is reset; :meth:`reset` does it explicitly)."""

    def __init__(self, threshold: float, *, warmup: int = 2, max_skip: int = 2, final_timestep: float = 200.0):
        if threshold <= 0:
            raise ValueError("the step cache threshold must be > 0")
        self.threshold, self.warmup, self.max_skip, self.final_timestep = threshold, warmup, max_skip, final_timestep
        self.skipped_total = 0
        self.evaluated_total = 0
        self.last_clip: dict = {}
        self.reset()

    def reset(self) -> None:
        """Start a new clip; the finished clip's counts stay in ``last_clip``."""
        if getattr(self, "calls", 0):
            self.last_clip = {"calls": self.calls, "skipped": list(self.skipped), "rate": self.rate}
        self.calls = 0
        self.last_t: float | None = None
        self.x_prev = self.v_prev = None  # input and output of the last evaluation
        self.rate: float | None = None
        self.run = 0  # consecutive skips
        self.skipped: list[int] = []  # call indices skipped in this clip

    def should_skip(self, x: torch.Tensor, t: float) -> bool:
        if self.calls < self.warmup or self.rate is None or self.v_prev is None:
            return False
        if t < self.final_timestep or self.run >= self.max_skip:
            return False
        return self.rate * _rel(x, self.x_prev) < self.threshold

    def __call__(self, predict: Callable, latents: torch.Tensor, timestep: torch.Tensor, cond) -> torch.Tensor:
        t = float(timestep.reshape(-1)[0])
        if self.last_t is not None and t > self.last_t:
            self.reset()
        self.last_t = t
        try:
            if self.should_skip(latents, t):
                self.run += 1
                self.skipped.append(self.calls)
                self.skipped_total += 1
                return self.v_prev
            v = predict(latents, timestep, cond)
            if self.x_prev is not None:
                d_in = _rel(latents, self.x_prev)
                self.rate = _rel(v, self.v_prev) / d_in if d_in > 0 else math.inf
            self.x_prev, self.v_prev, self.run = latents.detach().clone(), v.detach(), 0
            self.evaluated_total += 1
            return v
        finally:
            self.calls += 1

    def wrap(self, predict: Callable) -> Callable:
        def cached(latents, timestep, cond):
            return self(predict, latents, timestep, cond)

        cached.step_cache = self  # type: ignore[attr-defined]
        return cached
