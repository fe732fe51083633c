"""The ``fast`` profile's plumbing on the CPU (tiny random-weight models of the real classes).

What is checked against ground truth: the FP8 e4m3 rounding against the format's definition (every
code point built from its bits), the quantise / dequantise maths of :class:`Fp8Linear` against the
formula written out here, which DiT layers are converted and which are kept (by module name), the LoRA
merged before quantising, the step cache's decisions against its rule computed by hand, and that
``full`` is untouched (same modules, same output, also with sageattention "installed"). On the CPU
``torch._scaled_mm`` is emulated by the dequantised float32 matmul; the GPU figures come from
``benchmarks/bench_fast.py``.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from ex4d_backend.generation import fast
from ex4d_backend.generation.vram import PROFILES, resolve_profile

pytest.importorskip("diffsynth")
import generation_fixtures as gf  # noqa: E402

SIZE = dict(height=32, width=32, num_frames=5, steps=2)
# Linear layers of the tiny DiT that must stay as they are (embeddings, time projection, head, image MLP)
KEPT_LINEARS = {
    "text_embedding.0",
    "text_embedding.2",
    "time_embedding.0",
    "time_embedding.2",
    "time_projection.1",
    "head.head",
    "img_emb.proj.1",
    "img_emb.proj.3",
}


def e4m3_values() -> torch.Tensor:
    """All finite float8_e4m3fn values from the format's definition (1 sign, 4 exponent bits with bias
    7, 3 mantissa bits, subnormals at exponent 0, only S.1111.111 is NaN), ordered by code 0..126."""
    vals = []
    for code in range(127):  # positive codes; 127 = 0x7F is NaN
        e, m = code >> 3, code & 7
        vals.append(2.0**-6 * m / 8 if e == 0 else 2.0 ** (e - 7) * (1 + m / 8))
    return torch.tensor(vals, dtype=torch.float64)


def e4m3_round(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest e4m3 value, ties to the even code (values already within +-448)."""
    table = e4m3_values()
    a = x.double().abs().reshape(-1)
    idx = torch.searchsorted(table, a).clamp(1, len(table) - 1)
    lo, hi = table[idx - 1], table[idx]
    pick_hi = (hi - a < a - lo) | ((hi - a == a - lo) & (idx % 2 == 0))
    out = torch.where(pick_hi, hi, lo)
    out = torch.where(a >= table[-1], table[-1], out)
    return (out * x.double().sign().reshape(-1)).reshape(x.shape)


def literal_fp8_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """Y = (e4m3(X / s_x) s_x) (e4m3(W / s_w) s_w)^T + b, s_x = max|X_row| / 448, s_w = max|W_row| / 448."""
    sx = x.double().abs().amax(dim=1, keepdim=True) / 448
    sw = w.double().abs().amax(dim=1, keepdim=True) / 448
    y = (e4m3_round(x.double() / sx) * sx) @ (e4m3_round(w.double() / sw) * sw).T
    return y + b.double() if b is not None else y


def test_e4m3_cast_is_round_to_nearest_even_of_the_format():
    """Catches a quantiser that truncates, uses e5m2, or lets values past 448 through."""
    x = torch.randn(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 100
    x = x.clamp(-448, 448)
    x = torch.cat([x, e4m3_values(), -e4m3_values(), (e4m3_values()[1:] + e4m3_values()[:-1]) / 2])  # + ties
    q, s = fast.quantize_tensor(torch.tensor([448.0]))
    assert q.dtype == torch.float8_e4m3fn and float(s) == pytest.approx(1.0)
    ours = x.float().to(torch.float8_e4m3fn).double()
    assert torch.equal(ours, e4m3_round(x.float().double()))


@pytest.mark.parametrize("bias", [True, False])
def test_fp8_linear_is_the_quantise_dequantise_formula(bias):
    """Per-output-channel weight scales, per-token activation scales, FP8 storage; output = the literal
    formula (catches a scale taken over the wrong axis, a missing dequantisation, a dropped bias)."""
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(64, 48, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=g) * torch.logspace(-2, 1, 48)[:, None])  # rows differ
    x = torch.randn(3, 7, 64, generator=g) * torch.logspace(-1, 2, 7)[None, :, None]  # tokens differ in scale
    layer = fast.Fp8Linear.from_linear(lin)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight.shape == (48, 64)
    assert layer.weight_scale.dtype == torch.float32 and layer.weight_scale.shape == (48, 1)
    assert layer.state_dict()["weight"].dtype == torch.float8_e4m3fn  # stored in FP8, not re-expanded
    sw = lin.weight.detach().double().abs().amax(dim=1, keepdim=True) / 448
    np.testing.assert_allclose(layer.weight_scale.double(), sw, rtol=1e-6)
    assert torch.equal(layer.weight.double(), e4m3_round(lin.weight.detach().double() / layer.weight_scale.double()))
    y = layer(x)
    assert y.shape == (3, 7, 48) and y.dtype == x.dtype
    expected = literal_fp8_linear(x.reshape(-1, 64), lin.weight.detach(), lin.bias.detach() if bias else None)
    np.testing.assert_allclose(y.reshape(-1, 48).double(), expected, rtol=2e-5, atol=2e-5 * float(expected.abs().max()))
    exact = lin(x).detach().double()
    err = float((y.double() - exact).norm() / exact.norm())
    assert 1e-4 < err < 0.05  # really quantised (not a bf16 layer in disguise), and FP8-accurate


def test_per_tensor_activation_scaling():
    g = torch.Generator().manual_seed(2)
    lin = nn.Linear(32, 16)
    x = torch.randn(5, 32, generator=g)
    layer = fast.Fp8Linear.from_linear(lin, activation_scaling="tensor")
    sx = x.double().abs().max() / 448
    sw = lin.weight.detach().double().abs().amax(dim=1, keepdim=True) / 448
    expected = (e4m3_round(x.double() / sx) * sx) @ (e4m3_round(lin.weight.detach().double() / sw) * sw).T
    np.testing.assert_allclose(layer(x).double(), expected + lin.bias.detach().double(), rtol=2e-5, atol=1e-6)


def _tiny_dit_with_lora():
    from ex4d_backend.generation.loading import inject_lora

    dit = inject_lora(gf.build_dit())
    state = gf.ex4d_state()
    dit.load_state_dict({k: v for k, v in state.items() if ".lora_" in k}, strict=False)
    return dit.eval().requires_grad_(False)


def test_convert_dit_converts_exactly_the_block_linears_and_merges_the_lora_first():
    """Block linears (q/k/v/o of both attentions, k_img/v_img, FFN) become FP8; embeddings, time
    projection, head, image MLP, patch embedding, norms and modulation keep their dtype. The quantised
    weight is that of the MERGED LoRA weight (quantising the base weight and dropping the LoRA fails)."""
    dit = _tiny_dit_with_lora()
    base = {n: m.get_base_layer().weight.detach().clone() for n, m in dit.named_modules() if hasattr(m, "lora_A")}
    merged = {}
    for n, m in dit.named_modules():
        if hasattr(m, "lora_A"):
            a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
            merged[n] = base[n] + (b @ a) * m.scaling["default"]
    norms = {n: p.detach().clone() for n, p in dit.named_parameters() if "norm" in n or "modulation" in n}
    report = fast.convert_dit(dit)
    expected = {f"blocks.{i}.{name}" for i in range(len(dit.blocks)) for name in fast.FP8_LAYERS}
    assert set(report.converted) == expected and len(report.converted) == 12 * gf.DIT_CFG["num_layers"]
    assert report.lora_merged == 10 * gf.DIT_CFG["num_layers"]  # q, k, v, o of both attentions, ffn.0, ffn.2
    assert set(report.kept) == KEPT_LINEARS | {"patch_embedding"}
    for name, module in dit.named_modules():
        if name in expected:
            assert isinstance(module, fast.Fp8Linear) and module.weight.dtype == torch.float8_e4m3fn
        elif isinstance(module, nn.Linear):
            assert name in KEPT_LINEARS and module.weight.dtype == torch.float32
    for n, p in dit.named_parameters():
        if n in norms:
            assert torch.equal(p, norms[n])
    for n, w in merged.items():
        layer = dit.get_submodule(n.replace(".base_layer", ""))
        deq = layer.dequantized_weight()
        err_merged = float((deq - w).norm() / w.norm())
        err_base = float((deq - base[n]).norm() / base[n].norm())
        assert err_merged < 0.04 and err_base > 3 * err_merged, n
    assert fast.convert_dit(dit).converted == report.converted  # idempotent
    assert report.bytes_after < 0.3 * report.bytes_before  # float32 -> 1 byte + a scale per row


@pytest.fixture(scope="module")
def tiny_models_dir(tmp_path_factory):
    return gf.shared_models_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def guide():
    return gf.guide()


def _dit_inputs(pipe, guide):
    from ex4d_backend.generation.conditioning import prepare_guide

    c, m = prepare_guide(*guide, height=32, width=32, num_frames=5, seed=0)
    cond = pipe.condition(c, m, ["a prompt", "a negative prompt"])
    lat = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    return cond, lat, torch.tensor([937.5])


def test_fast_profile_selected_by_name_runs_and_stays_close_to_full(tiny_models_dir, guide):
    """``vram_profile="fast"`` (load_generator, as the CLI and the service call it) gives an FP8 DiT
    with 8-bit attention modules (SDPA on the CPU, with the note), leaves the camera encoder and the
    other models alone, and its DiT output is close to ``full``'s but not equal (really converted)."""
    from ex4d_backend.generation import load_generator

    full = load_generator("ex4d", models_dir=tiny_models_dir, device="cpu")
    fastp = load_generator("ex4d", models_dir=tiny_models_dir, device="cpu", vram_profile="fast")
    try:
        info = fastp.placement.fast_info
        assert info["fp8_layers"] == 12 * gf.DIT_CFG["num_layers"] and "SDPA" in info["attention"]
        assert all(isinstance(b.self_attn.attn, fast.Int8Attention) for b in fastp.dit.blocks)
        assert fastp.lora_merged == 10 * gf.DIT_CFG["num_layers"] and not fastp.compiled  # no compile on the CPU
        for m in (fastp.camera_encoder, fastp.vae, fastp.text_encoder, fastp.image_encoder):
            assert {p.dtype for p in m.parameters()} == {torch.float32}
        cond, lat, t = _dit_inputs(full, guide)
        ref = full.predict_noise(lat, t, cond).double()
        out = fastp.predict_noise(lat, t, cond).double()
        cos = float((ref * out).sum() / (ref.norm() * out.norm()))
        rel = float((out - ref).norm() / ref.norm())
        assert cos > 0.999 and 1e-5 < rel < 0.05, (cos, rel)
        frames = fastp(*guide, seed=0, **SIZE)
        assert frames.shape == (5, 32, 32, 3) and frames.dtype == np.uint8
    finally:
        full.close()
        fastp.close()


def test_full_is_untouched_even_with_sageattention_installed(tiny_models_dir, guide, monkeypatch):
    """``full`` has no FP8 layer and no 8-bit attention, and stays on SDPA although diffsynth would pick
    SageAttention once the package imports (here a stand-in whose every call fails the test); its DiT
    output is bit-identical before and after a ``fast`` pipeline was built in the same process."""
    from diffsynth.models import wan_video_dit

    from ex4d_backend.generation import load_generator

    full = load_generator("ex4d", models_dir=tiny_models_dir, device="cpu")
    assert not any(isinstance(m, (fast.Fp8Linear, fast.Int8Attention)) for m in full.dit.modules())
    assert PROFILES["full"].attention == "exact" and not PROFILES["full"].fp8 and not PROFILES["full"].compile
    cond, lat, t = _dit_inputs(full, guide)
    before = full.predict_noise(lat, t, cond)
    other = load_generator("ex4d", models_dir=tiny_models_dir, device="cpu", vram_profile="fast")
    other.close()

    def no_sage(*a, **k):
        raise AssertionError("the full profile called sageattention")

    monkeypatch.setattr(wan_video_dit, "SAGE_ATTN_AVAILABLE", True)
    monkeypatch.setattr(wan_video_dit, "sageattn", no_sage, raising=False)
    after = full.predict_noise(lat, t, cond)
    assert torch.equal(before, after)
    assert wan_video_dit.SAGE_ATTN_AVAILABLE is True  # restored after the forward (scoped)
    full.close()


def test_int8_attention_layout_and_key_smoothing(monkeypatch):
    """The SageAttention path hands the kernel (B, S, heads, d) tensors and keys with their mean over
    the sequence removed (softmax-invariant): with an exact stand-in kernel the result equals diffsynth's
    attention (a wrong head split or smoothing over the wrong axis changes it)."""
    from diffsynth.models.wan_video_dit import AttentionModule

    calls = []

    def sageattn(q, k, v, tensor_layout="HND", smooth_k=True, **kw):
        calls.append((tensor_layout, smooth_k, tuple(q.shape)))
        assert tensor_layout == "NHD" and not smooth_k
        qh, kh, vh = (x.transpose(1, 2).float() for x in (q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).to(q.dtype)

    monkeypatch.setitem(sys.modules, "sageattention", types.SimpleNamespace(sageattn=sageattn))
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 9, 4 * 16, generator=g) for _ in range(3))
    k = k + 5.0  # a large common offset that smoothing removes
    ref = AttentionModule(4)(q, k, v)
    for kernel in ("sage", "sdpa"):
        out = fast.Int8Attention(4, kernel)(q, k, v)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert calls == [("NHD", False, (2, 9, 4, 16))]
    assert fast.attention_kernel(torch.device("cpu"))[0] == "sdpa"
    assert fast.attention_kernel(torch.device("cuda"), "sdpa")[0] == "sdpa"


class _Linear:
    """A stand-in DiT with a known transformation rate: v = c * x (rate 1 for any c)."""

    def __init__(self, c: float = 2.0):
        self.c, self.calls = c, 0

    def __call__(self, x, t, cond):
        self.calls += 1
        return self.c * x


def test_step_cache_follows_its_rule():
    """With v = c x the rate is exactly 1, so step i is skipped iff rel(x_i, x_last_evaluated) <
    threshold, after 2 warm-up calls, at most max_skip in a row, never below final_timestep; the
    skipped step returns the last prediction. A rising timestep starts a new clip."""
    model = _Linear()
    cache = fast.StepCache(0.1, warmup=2, max_skip=2, final_timestep=200.0)
    f = cache.wrap(model)
    x0 = torch.ones(4)
    xs = [x0 * s for s in (1.0, 1.5, 1.55, 1.6, 1.62, 1.64, 2.5, 2.52, 2.53)]
    ts = [999.0, 900, 800, 700, 600, 500, 400, 300, 100]
    outs = [f(x, torch.tensor([t]), None) for x, t in zip(xs, ts, strict=True)]
    # by hand: x1 evaluated (warm-up); x2: rel(1.55, 1.5) = 0.033 -> skip; x3: 0.067 -> skip; x4: max_skip
    # reached -> evaluate; x5: rel(1.64, 1.62) = 0.012 -> skip; x6: 0.54 -> evaluate; x7: 0.008 -> skip;
    # x8: below final_timestep -> evaluate
    assert cache.skipped == [2, 3, 5, 7]
    assert model.calls == 5 and cache.rate == pytest.approx(1.0)
    for skipped, last in ((2, 1), (3, 1), (5, 4), (7, 6)):
        assert torch.equal(outs[skipped], outs[last])
    torch.testing.assert_close(outs[8], 2.0 * xs[8])
    f(x0, torch.tensor([999.0]), None)  # a new clip
    assert cache.last_clip["skipped"] == [2, 3, 5, 7] and cache.calls == 1 and cache.skipped == []
    with pytest.raises(ValueError):
        fast.StepCache(0)


def test_step_cache_in_the_pipeline_skips_and_is_reset_per_clip(tiny_models_dir, guide):
    """Through the profile (``resolve_profile(..., step_cache=)``): the DiT is evaluated fewer times than
    there are steps, the cache is reset after each clip, and the same clip twice gives the same frames."""
    from ex4d_backend.generation import load_generator

    p = load_generator(
        "ex4d", models_dir=tiny_models_dir, device="cpu", vram_profile=resolve_profile("full", step_cache=10.0)
    )
    try:
        a = p(*guide, seed=0, height=32, width=32, num_frames=5, steps=6)
        clip = p.placement.step_cache.last_clip
        assert clip["calls"] == 6 and len(clip["skipped"]) >= 1 and 0 not in clip["skipped"]
        b = p(*guide, seed=0, height=32, width=32, num_frames=5, steps=6)
        assert np.array_equal(a, b) and p.placement.step_cache.last_clip["skipped"] == clip["skipped"]
    finally:
        p.close()


def test_profile_entry_points():
    """``fast`` is a profile like full / 24gb / 12gb: by name in vram.PROFILES, on the CLI, in the
    service protocol; bad names and thresholds give one clear error."""
    from ex4d_backend.cli import build_parser
    from ex4d_backend.errors import Ex4dError
    from ex4d_backend.service import protocol

    assert set(PROFILES) >= {"full", "24gb", "12gb", "fast"}
    assert PROFILES["fast"].fp8 and PROFILES["fast"].compile and PROFILES["fast"].step_cache == 0
    assert resolve_profile("fast", step_cache=0.2).step_cache == 0.2 and resolve_profile("fast").step_cache == 0
    args = build_parser().parse_args(
        ["generate", "--color-video", "c", "--mask-video", "m", "--output-video", "o.mp4", "--vram-profile", "fast"]
    )
    assert args.vram_profile == "fast" and args.step_cache is None and args.gpus == 1
    args = build_parser().parse_args(
        ["generate", "--color-video", "c", "--mask-video", "m", "--output-video", "o.mp4", "--step-cache", "0.1", "--gpus", "2"]
    )  # fmt: skip
    assert args.step_cache == 0.1 and args.gpus == 2
    protocol.validate_params("generate", {"footage": "f", "depth": {"model": "file", "path": "d"}, "camera": {"preset": "30"}, "vram_profile": "fast"})  # fmt: skip
    with pytest.raises(Ex4dError, match="unknown VRAM profile 'fastest'"):
        resolve_profile("fastest")
    with pytest.raises(Ex4dError, match="step cache"):
        resolve_profile("fast", step_cache=-1)


def test_doctor_fast_profile_support():
    from ex4d_backend import doctor

    assert doctor.fast_profile_support((9, 0), "1.0.6")["supported"] is True
    assert "SageAttention 1.0.6" in doctor.fast_profile_support((9, 0), "1.0.6")["attention"]
    assert doctor.fast_profile_support((8, 9), None)["supported"] is True
    ampere = doctor.fast_profile_support((8, 6), None)
    assert ampere["supported"] is False and "8.6 < 8.9" in ampere["reason"] and "SDPA" in ampere["attention"]
    assert doctor.fast_profile_support(None, None)["supported"] is False
