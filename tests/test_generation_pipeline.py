"""EX-4D generator parts on tiny random-weight models of the real classes (CPU, no downloads): the camera
tokens, the LoRA, the mask erosion, aspect handling, rope, progress and cancel, each against ground truth
(formulas, the plain diffsynth DiT, the base model). The generated video itself is checked against the
reference pipeline (diffsynth 1.1.2 + EX-4D) in test_generation_compare112.py, for every VRAM profile.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

from ex4d_backend.errors import CANCELLED, Cancelled

pytest.importorskip("diffsynth")
import generation_fixtures as gf  # noqa: E402

SIZE = dict(height=32, width=32, num_frames=5, steps=2)


@pytest.fixture(scope="module")
def tiny_models_dir(tmp_path_factory):
    return gf.shared_models_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def pipe(tiny_models_dir):
    """The reference's arithmetic: peft LoRA layers kept (not merged)."""
    from ex4d_backend.generation import load_generator

    return load_generator("ex4d", models_dir=tiny_models_dir, device="cpu", merge_lora=False)


@pytest.fixture(scope="module")
def guide():
    return gf.guide()


@pytest.fixture(scope="module")
def result(pipe, guide):
    calls = []
    out = pipe(*guide, seed=0, callback=lambda *a: calls.append(a), **SIZE)
    return out, calls


def _dit_inputs(pipe, guide, seed=0):
    """Conditioning and noisy latents for one DiT evaluation."""
    from ex4d_backend.generation.conditioning import prepare_guide

    c, m = prepare_guide(*guide, height=32, width=48, num_frames=5, seed=seed)
    cond = pipe.condition(c, m, ["a prompt", "a negative prompt"])
    lat = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(seed))
    return cond, lat, torch.tensor([937.5])


def _plain_dit(dit, cond, lat, t, rope="float32"):
    """The DiT with no EX-4D hook at all: diffsynth's own model function (same rope precision, and the
    pipeline's guard against diffsynth picking SageAttention where it is installed: these are CPU tensors)."""
    from diffsynth.pipelines.wan_video import model_fn_wan_video

    from ex4d_backend.generation.fast import exact_attention
    from ex4d_backend.generation.pipeline import rope_precision

    with rope_precision(rope), exact_attention():
        return model_fn_wan_video(
            dit, latents=lat, timestep=t, context=cond.context, clip_feature=cond.clip_feature, y=cond.y
        )


# ------------------------------------------------------------------------------------ end to end
def test_progress_reports_every_step(result):
    """One ``denoise`` callback after each step, in order (the frames' values are checked against the
    reference pipeline in test_generation_compare112.py)."""
    out, calls = result
    assert out.dtype == np.uint8 and out.shape == (5, 32, 32, 3)
    denoise = [(s, i, n) for s, i, n, _ in calls if s == "denoise"]
    assert denoise == [("denoise", 1, 2), ("denoise", 2, 2)]
    stages = [s for s, *_ in calls]
    assert stages.index("condition") < stages.index("denoise") < stages.index("decode")


def test_mask_erosion_is_seeded_like_the_reference():
    """Frame j's mask is eroded with a k x k kernel, k = random.Random(seed).randint(2, 8) drawn per
    frame in order (the reference draws it unseeded), then binarised at 0.5."""
    import random

    import cv2

    from ex4d_backend.generation.conditioning import prepare_guide

    color, mask = gf.guide(t=5)
    mask[:, 20:40, 10:30] = 0  # holes with edges in every frame
    for seed in (0, 7):
        _, m = prepare_guide(color, mask, height=64, width=64, num_frames=5, seed=seed)
        rng = random.Random(seed)
        for j in range(5):
            k = rng.randint(2, 8)
            expected = cv2.erode(mask[j], np.ones((k, k), np.uint8)) > 127
            np.testing.assert_array_equal(m[j] > 0.5, expected)
    a = prepare_guide(color, mask, height=64, width=64, num_frames=5, seed=0)[1]
    b = prepare_guide(color, mask, height=64, width=64, num_frames=5, seed=7)[1]
    assert (a != b).any()  # different seeds, different kernels


# --------------------------------------------------------------------------------- camera tokens
def test_camera_tokens_reach_dit_patch_tokens(pipe, guide):
    """The patch embedding output seen by the DiT is patch_embedding(x) + encoder(latents), exactly."""
    cond, lat, t = _dit_inputs(pipe, guide)
    seen = {}
    h = pipe.dit.patch_embedding.register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0], out=out))
    try:
        pipe.predict_noise(lat, t, cond)
    finally:
        h.remove()
    pe = pipe.dit.patch_embedding
    expected = torch.nn.functional.conv3d(seen["x"], pe.weight, pe.bias, stride=(1, 2, 2)) + cond.camera_tokens
    assert cond.camera_tokens.abs().max() > 0
    assert seen["out"].shape[0] == 2  # both CFG branches in one batch, the same tokens added to each
    torch.testing.assert_close(seen["out"], expected)


def test_zero_encoder_changes_nothing_nonzero_changes_result(pipe, guide):
    from ex4d_backend.generation.camera_encoder import CameraTokenHook

    cond, lat, t = _dit_inputs(pipe, guide)
    with_cam = pipe.predict_noise(lat, t, cond)
    zero = pipe.predict_noise(
        lat, t, type(cond)(**{**cond.__dict__, "camera_tokens": torch.zeros_like(cond.camera_tokens)})
    )
    pipe.camera_hook.remove()  # the DiT without any camera hook
    try:
        plain = _plain_dit(pipe.dit, cond, lat, t)
    finally:
        pipe.camera_hook = CameraTokenHook(pipe.dit)
    torch.testing.assert_close(zero, plain, rtol=0, atol=0)
    assert (with_cam - plain).abs().max() > 1e-3


def test_zero_encoder_checkpoint_equals_no_camera(tmp_path, tiny_models_dir, guide):
    """A checkpoint whose zero-initialised encoder output layer was never trained == no camera tokens."""
    from ex4d_backend.generation import load_generator

    root = gf.variant(tiny_models_dir, tmp_path / "m", write={gf.CKPT: gf.ex4d_state(zero_encoder=True)})
    p = load_generator("ex4d", models_dir=root, device="cpu", merge_lora=False)
    cond, lat, t = _dit_inputs(p, guide)
    assert cond.camera_tokens.abs().max() == 0
    with_zero = p.predict_noise(lat, t, cond)
    p.camera_hook.remove()
    torch.testing.assert_close(with_zero, _plain_dit(p.dit, cond, lat, t), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ LoRA
def test_lora_loaded_and_active(pipe, tiny_models_dir):
    """Every LoRA tensor equals the checkpoint's, and a LoRA layer computes base(x) + B(A(x)) * alpha / r."""
    state = torch.load(tiny_models_dir / gf.CKPT, weights_only=True)
    dit_state = pipe.dit.state_dict()
    lora_keys = [k for k in dit_state if ".lora_" in k]
    assert len(lora_keys) == 2 * 10 * gf.DIT_CFG["num_layers"]  # 10 layers per block, A and B
    for k in lora_keys:
        torch.testing.assert_close(dit_state[k], state[k].to(dit_state[k].dtype))
    layer = pipe.dit.blocks[1].cross_attn.q
    x = torch.randn(3, gf.DIT_CFG["dim"])
    a = state["blocks.1.cross_attn.q.lora_A.default.weight"]
    b = state["blocks.1.cross_attn.q.lora_B.default.weight"]
    base = x @ layer.base_layer.weight.T + layer.base_layer.bias
    expected = base + (x @ a.T @ b.T) * (16 / 16)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_zero_lora_b_restores_base_dit(pipe, guide, tiny_models_dir):
    """With every lora_B zeroed the DiT equals the base Wan DiT loaded without LoRA; with the
    checkpoint's lora_B it differs."""
    from ex4d_backend.generation.loading import load_dit

    base = load_dit(tiny_models_dir / gf.WAN_REPO, torch.device("cpu"), torch.float32)
    cond, lat, t = _dit_inputs(pipe, guide)
    cond = type(cond)(**{**cond.__dict__, "camera_tokens": None})
    want = _plain_dit(base, cond, lat, t)
    with_lora = pipe.predict_noise(lat, t, cond)
    saved = {n: p.detach().clone() for n, p in pipe.dit.named_parameters() if "lora_B" in n}
    assert len(saved) == 10 * gf.DIT_CFG["num_layers"]
    try:
        for n, p in pipe.dit.named_parameters():
            if "lora_B" in n:
                p.data.zero_()
        zeroed = pipe.predict_noise(lat, t, cond)
    finally:
        for n, p in pipe.dit.named_parameters():
            if n in saved:
                p.data.copy_(saved[n])
    torch.testing.assert_close(zeroed, want, rtol=1e-6, atol=1e-6)
    assert (with_lora - want).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------- cancel
def test_cancel_stops_between_steps_and_frees(pipe, guide):
    steps_seen = []
    held = {}
    original = pipe.condition

    def spy(*a, **k):
        cond = original(*a, **k)
        held["cond"] = weakref.ref(cond)
        held["tokens"] = weakref.ref(cond.camera_tokens)
        return cond

    def cancel(stage, step, total, msg):
        steps_seen.append((stage, step))
        if stage == "denoise" and step == 1:
            raise Cancelled()

    original_predict = pipe.predict_noise

    def spy_predict(*a, **k):
        out = original_predict(*a, **k)
        held["pred"] = weakref.ref(out)
        return out

    pipe.condition, pipe.predict_noise = spy, spy_predict
    try:
        with pytest.raises(Cancelled) as info:
            pipe(*guide, seed=0, callback=cancel, **SIZE)
    finally:
        del pipe.condition, pipe.predict_noise
    assert info.value.code == CANCELLED
    assert ("denoise", 2) not in steps_seen and ("decode", 0) not in steps_seen
    gc.collect()
    # the run's tensors are released although the exception (and its traceback) is still alive
    assert held["cond"]() is None and held["tokens"]() is None and held["pred"]() is None


# --------------------------------------------------------------------------------- sizes, aspect
def _disc_extent(img: np.ndarray) -> tuple[int, int]:
    ys, xs = np.nonzero(img > 0.5)
    return xs.max() - xs.min() + 1, ys.max() - ys.min() + 1


@pytest.mark.parametrize("out_hw", [(240, 416), (416, 240), (64, 64)])
def test_crop_keeps_aspect_stretch_squashes(out_hw):
    """A disc in 16:9 footage stays a disc at any output aspect with ``crop`` (the default); the
    reference's ``stretch`` turns it into an ellipse by the ratio of the two aspects."""
    import cv2

    from ex4d_backend.generation.conditioning import prepare_guide

    src_h, src_w = 360, 640
    color = np.zeros((1, src_h, src_w, 3), np.uint8)
    cv2.circle(color[0], (src_w // 2, src_h // 2), 60, (255, 255, 255), -1)
    mask = np.full((1, src_h, src_w), 255, np.uint8)
    h, w = out_hw
    c, _ = prepare_guide(color, mask, height=h, width=w, num_frames=1, seed=0, erode=False)
    dx, dy = _disc_extent(c[0, ..., 0])
    assert abs(dx / dy - 1) < 0.05
    c, _ = prepare_guide(color, mask, height=h, width=w, num_frames=1, seed=0, erode=False, resize="stretch")
    dx, dy = _disc_extent(c[0, ..., 0])
    expected = (w / src_w) / (h / src_h)
    assert abs(dx / dy - expected) < 0.05 * expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float32_rope_equals_diffsynth_rope(dtype):
    """The float32 rotary embedding equals diffsynth's complex-float64 one (ground truth) to float32
    rounding; in bf16 both round to the same values almost everywhere (at most 1 ulp apart)."""
    from diffsynth.models.wan_video_dit import precompute_freqs_cis_3d, rope_apply

    from ex4d_backend.generation.pipeline import rope_apply_float32, rope_precision

    f, h, w, heads, d = 3, 4, 6, 4, 128
    fr = precompute_freqs_cis_3d(d)
    freqs = torch.cat(
        [
            fr[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
            fr[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
            fr[2][:w].view(1, 1, w, -1).expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, 1, -1)
    x = (torch.randn(2, f * h * w, heads * d) * 3).to(dtype)
    want, got = rope_apply(x, freqs, heads), rope_apply_float32(x, freqs, heads)
    assert got.dtype == want.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    else:
        ulp = torch.finfo(torch.bfloat16).eps * want.float().abs().clamp_min(1e-2)
        assert ((got.float() - want.float()).abs() <= ulp).all()
        assert (got != want).float().mean() < 0.01
    from diffsynth.models import wan_video_dit

    with rope_precision("float32"):
        assert wan_video_dit.rope_apply is rope_apply_float32
    assert wan_video_dit.rope_apply is rope_apply  # restored


def test_reference_sizes_on_meta():
    """The 14B DiT with the reference LoRA has 800 LoRA tensors / 76,677,120 parameters and the camera
    encoder 8 tensors / 23,109,632 parameters (built on the meta device: no memory)."""
    from diffsynth.models.wan_video_dit import WanModel

    from ex4d_backend.generation.camera_encoder import CamVidEncoder
    from ex4d_backend.generation.loading import inject_lora

    with torch.device("meta"):
        dit = WanModel(
            dim=5120, in_dim=36, ffn_dim=13824, out_dim=16, text_dim=4096, freq_dim=256, eps=1e-6,
            patch_size=(1, 2, 2), num_heads=40, num_layers=40, has_image_input=True,
        )  # fmt: skip
        inject_lora(dit)
        enc = CamVidEncoder()
    lora = {k: v for k, v in dit.state_dict().items() if ".lora_" in k}
    assert len(lora) == 800 and sum(v.numel() for v in lora.values()) == 76_677_120
    assert not any("k_img" in k or "v_img" in k for k in lora)
    sd = enc.state_dict()
    assert len(sd) == 8 and sum(v.numel() for v in sd.values()) == 23_109_632
    assert set(sd) == {f"latent_encoder.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")} | {
        "latent_patch_embedding.weight",
        "latent_patch_embedding.bias",
    }


@pytest.mark.cuda
def test_cancel_frees_gpu_memory(tiny_models_dir, guide):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from ex4d_backend.generation import load_generator

    p = load_generator("ex4d", models_dir=tiny_models_dir, device="cuda")

    def cancel(stage, step, total, msg):
        if stage == "denoise":
            raise Cancelled()

    def cancelled_run() -> int:
        with pytest.raises(Cancelled):
            p(*guide, callback=cancel, **SIZE)
        gc.collect()
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    torch.cuda.synchronize()
    loaded = torch.cuda.memory_allocated()
    # The first run makes one-off allocations that persist by design (cuBLAS workspace, rotary tables):
    # measured 1.4 MiB on an H100. Cancelled runs after it must not leave anything behind.
    first = cancelled_run()
    assert first - loaded < 16 * 2**20
    assert cancelled_run() == first
    assert cancelled_run() == first
