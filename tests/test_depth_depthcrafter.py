"""DepthCrafter provider: tiny random-weight models in the published layout, real loading and inference.

Ground truths: DepthCrafter's published pipeline (window spans, the re-noising of a window's overlap
from the previous result, the linear blend weights 0..1), diffusers' own SVD UNet forward, and
determinism under a seed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from depth_fixtures import depth_models, gradient_clip  # noqa: F401

from ex4d_backend import depth
from ex4d_backend.depth import depthcrafter as dc
from ex4d_backend.depth_io import disparity_to_depth
from ex4d_backend.errors import Cancelled

FAST = {"steps": 2, "window": 6, "overlap": 2}  # 10 frames -> windows (0, 6) and (4, 10)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def models(depth_models):  # noqa: F811
    return dc.load(depth_models, "cpu")


def test_windows_cover_clip_with_exact_overlap():
    assert dc.windows(49, 110, 25) == [(0, 49)]
    assert dc.windows(110, 110, 25) == [(0, 110)]
    assert dc.windows(111, 110, 25) == [(0, 110), (85, 111)]
    for n in (111, 200, 250, 400):
        spans = dc.windows(n, 110, 25)
        assert spans[0][0] == 0 and spans[-1][1] == n
        for (s0, e0), (s1, e1) in zip(spans, spans[1:], strict=False):
            assert s1 == s0 + 85 and e0 - s1 == 25  # stride 85, overlap 25
            assert e1 - s1 > 25  # a last window always adds new frames


def test_stitch_ramps_linearly_across_the_overlap():
    # Window k outputs the constant k: stitched frames must ramp from k to k+1 over the overlap.
    a = torch.zeros(1, 6, 1, 2, 2)
    b = torch.ones(1, 6, 1, 2, 2)
    out = dc.stitch(a, b, 4)
    values = out[0, :, 0, 0, 0].numpy()
    np.testing.assert_allclose(values, [0, 0, 0, 1 / 3, 2 / 3, 1, 1, 1], atol=1e-6)
    assert np.abs(np.diff(values)).max() <= 1 / 3 + 1e-6  # no seam: a step of 1 becomes 3 steps of 1/3
    np.testing.assert_array_equal(dc.stitch(a, b, 0)[0, :, 0, 0, 0].numpy(), [0] * 6 + [1] * 6)


def test_processing_size_multiples_of_64():
    assert dc.processing_size(1024, 576) == (1024, 576)
    assert dc.processing_size(1920, 1080, 1024) == (1024, 576)
    assert dc.processing_size(100, 70) == (128, 64)


def test_long_clip_windows_are_renoised_and_blended_as_in_depthcrafter(models):
    # 13 frames, window 7, overlap 3: windows (0, 7), (4, 11), (8, 13); blend weights (0, 0.5, 1).
    trace: dict = {}
    dc.infer(gradient_clip(13, 48, 64), models, steps=2, window=7, overlap=3, trace=trace)
    wins = trace["windows"]
    assert [w["span"] for w in wins] == [(0, 7), (4, 11), (8, 13)]
    f0, f1, f2 = (w["final"][0] for w in wins)
    i0, i1, i2 = (w["initial"][0] for w in wins)
    out = trace["latents"][0]
    assert out.shape[0] == 13

    def same(a, b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)  # latents reach ~1e3 (sigma_max 700)

    # Frame by frame, the analytic linear blend of the windows' own outputs (no seam: each overlap
    # starts exactly on the old window and ends exactly on the new one).
    same(out[0:4], f0[0:4])
    same(out[4], f0[4])  # weight 0
    same(out[5], 0.5 * f0[5] + 0.5 * f1[1])
    same(out[6], f1[2])  # weight 1
    same(out[7], f1[3])
    same(out[8], f1[4])  # weight 0 of the next overlap
    same(out[9], 0.5 * f1[5] + 0.5 * f2[1])
    same(out[10:13], f2[2:5])
    assert not torch.allclose(f0[5], f1[1])  # the windows really differ, so the blend is tested

    # DepthCrafter's initial latents: the overlap restarts from the previous result re-noised to the
    # first sigma with the same draws; the rest reuses the first window's draws, rotated.
    sched = models.scheduler
    sched.set_timesteps(2)
    k = float(sched.sigmas[0]) / float(sched.init_noise_sigma)
    same(i1[:3], f0[4:7] + i0[4:7] * k)
    same(i1[3:], i0[0:4])
    same(i2[:3], f1[4:7] + i0[1:4] * k)  # the stitched result there is window 2's alone
    same(i2[3:], i0[4:6])


def test_encoding_does_not_depend_on_the_chunk_size(models):
    frames = gradient_clip(5, 48, 64)
    gens = [torch.Generator().manual_seed(3) for _ in range(2)]
    with torch.inference_mode():
        e1, l1 = dc.encode(frames, models, (64, 64), gens[0], chunk=2)
        e2, l2 = dc.encode(frames, models, (64, 64), gens[1], chunk=8)
        e3, l3 = dc.encode(frames, models, (64, 64), torch.Generator().manual_seed(3), noise_aug=0.0)
    torch.testing.assert_close(e1, e2, rtol=0, atol=1e-4)  # batch size changes float rounding only
    torch.testing.assert_close(l1, l2, rtol=0, atol=1e-4)
    assert e1.shape == (1, 5, models.unet.config.cross_attention_dim) and l1.shape == (1, 5, 4, 8, 8)
    torch.testing.assert_close(e1, e3)  # CLIP sees the clean frames
    assert (l1 - l3).abs().max() > 1e-2  # the VAE sees the noise-augmented ones


def test_seed_makes_inference_deterministic(models):
    frames = gradient_clip(10, 48, 64)
    a = dc.infer(frames, models, **FAST)
    b = dc.infer(frames, models, **FAST)
    c = dc.infer(frames, models, seed=7, **FAST)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_depthcrafter_end_to_end_multi_window(depth_models):  # noqa: F811
    frames = gradient_clip(10, 48, 80)  # not a multiple of 64: resized for the model, back for the result
    calls = []
    res = depth.estimate(
        frames, "depthcrafter", models_dir=depth_models, device="cpu", progress=lambda *a: calls.append(a), **FAST
    )
    assert res.depth.shape == res.disparity.shape == (10, 48, 80)
    assert res.depth.dtype == res.disparity.dtype == np.float32
    assert np.isfinite(res.depth).all()
    assert res.disparity.min() == 0.0 and res.disparity.max() == 1.0  # clip-wise min-max
    np.testing.assert_allclose(res.depth, disparity_to_depth(res.disparity), rtol=1e-6)
    assert res.depth.min() == pytest.approx(10000 / 3900, rel=1e-6)  # the reference's nearest surface
    np.testing.assert_array_equal(res.intrinsics, [[500, 0, 40], [0, 500, 24], [0, 0, 1]])
    # progress: one "depth" stage, steps never decrease, one call per window step, ending at total
    steps = [c for c in calls if c[0] == "depth"]
    assert [c[1] for c in steps] == sorted(c[1] for c in steps) and steps[-1][1] == steps[-1][2] == 2 + 2 * 2
    assert sum("window 2/2" in c[3] for c in steps) == FAST["steps"]


def test_cancel_from_progress_stops_the_run(depth_models):  # noqa: F811
    def cancel(stage, step, total, message):
        if stage == "depth" and step == 2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        depth.estimate(
            gradient_clip(6), "depthcrafter", models_dir=depth_models, device="cpu", progress=cancel, steps=2
        )


def test_unet_matches_diffusers_svd_forward_for_one_embedding(models):
    # With the same embedding on every frame, DepthCrafter's per-frame cross-attention is exactly
    # SVD's (diffusers repeats its single embedding over the frames).
    from diffusers import UNetSpatioTemporalConditionModel

    torch.manual_seed(0)
    dim = models.unet.config.cross_attention_dim
    x = torch.randn(1, 3, 8, 8, 8)
    emb = torch.randn(1, 1, dim)
    ids = torch.tensor([[7.0, 127.0, 0.02]])
    t = torch.tensor(1.5)
    with torch.no_grad():
        ours = models.unet(x, t, encoder_hidden_states=emb.expand(1, 3, dim), added_time_ids=ids, return_dict=False)[0]
        svd = UNetSpatioTemporalConditionModel.forward(models.unet, x, t, emb, ids, return_dict=False)[0]
        swapped = models.unet(
            x, t, encoder_hidden_states=torch.randn(1, 3, dim), added_time_ids=ids, return_dict=False
        )[0]
    assert ours.shape == (1, 3, 4, 8, 8)
    torch.testing.assert_close(ours, svd, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, swapped)  # per-frame embeddings are used


@pytest.mark.cuda
@cuda
def test_fp16_on_cuda_and_cpu_offload(depth_models):  # noqa: F811
    frames = gradient_clip(10, 48, 64)
    m = dc.load(depth_models, "cuda")
    assert m.unet.dtype == torch.float16 and m.vae.dtype == torch.float16
    gpu = dc.infer(frames, m, **FAST)
    del m
    off = dc.load(depth_models, "cuda", cpu_offload=True)
    assert next(off.unet.parameters()).device.type == "cpu"  # on the GPU only while it runs
    torch.cuda.reset_peak_memory_stats()
    offloaded = dc.infer(frames, off, **FAST)
    assert next(off.unet.parameters()).device.type == "cpu"
    np.testing.assert_allclose(gpu, offloaded, atol=2e-3)
    cpu = dc.infer(frames, dc.load(depth_models, "cpu"), **FAST)  # same noise on every device
    assert np.isfinite(gpu).all() and np.corrcoef(gpu.ravel(), cpu.ravel())[0, 1] > 0.95
