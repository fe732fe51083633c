"""DepthCrafter provider: tiny random-weight models in the published layout, real loading and inference."""

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


def test_windows_cover_clip_with_exact_overlap():
    assert dc.windows(49, 110, 25) == [(0, 49)]
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


def test_depthcrafter_end_to_end_multi_window(depth_models):
    frames = gradient_clip(10, 48, 80)  # not a multiple of 64: resized for the model, back for the result
    calls = []
    res = depth.estimate(frames, "depthcrafter", models_dir=depth_models, device="cpu", progress=lambda *a: calls.append(a), **FAST)
    assert res.depth.shape == res.disparity.shape == (10, 48, 80)
    assert res.depth.dtype == res.disparity.dtype == np.float32
    assert np.isfinite(res.depth).all()
    assert res.disparity.min() == 0.0 and res.disparity.max() == 1.0  # clip-wise min-max
    np.testing.assert_allclose(res.depth, disparity_to_depth(res.disparity), rtol=1e-6)
    assert res.depth.min() == pytest.approx(10000 / 3900, rel=1e-6)  # the reference's nearest surface
    # progress: one call per window step, in order, ending at total
    steps = [c for c in calls if c[0] == "depth"]
    assert [c[1] for c in steps] == sorted(c[1] for c in steps) and steps[-1][1] == steps[-1][2]
    assert sum("window 2/2" in c[3] for c in steps) == FAST["steps"]
    # determinism with a seed, and the seed matters
    again = depth.estimate(frames, "depthcrafter", models_dir=depth_models, device="cpu", **FAST)
    np.testing.assert_array_equal(res.disparity, again.disparity)
    other = depth.estimate(frames, "depthcrafter", models_dir=depth_models, device="cpu", seed=7, **FAST)
    assert not np.array_equal(res.disparity, other.disparity)


def test_cancel_from_progress_stops_the_run(depth_models):
    def cancel(stage, step, total, message):
        if stage == "depth" and step == 1:
            raise Cancelled()

    with pytest.raises(Cancelled):
        depth.estimate(gradient_clip(6), "depthcrafter", models_dir=depth_models, device="cpu", progress=cancel, steps=2)


def test_unet_uses_per_frame_embeddings(depth_models):
    # DepthCrafter's UNet attends to each frame's own CLIP embedding: changing frame 2's embedding must
    # change the prediction of frame 2 (and, through temporal layers, maybe others) but a swap of two
    # frames' embeddings must differ from the original (the per-frame pairing is used, not a pooled one).
    m = dc.load(depth_models)
    torch.manual_seed(0)
    dim = m.unet.config.cross_attention_dim
    x = torch.randn(1, 3, 8, 8, 8)
    emb = torch.randn(1, 3, dim)
    ids = torch.tensor([[7.0, 127.0, 0.0]])
    with torch.no_grad():
        base = m.unet(x, 1.0, encoder_hidden_states=emb, added_time_ids=ids, return_dict=False)[0]
        swapped = m.unet(x, 1.0, encoder_hidden_states=emb[:, [1, 0, 2]], added_time_ids=ids, return_dict=False)[0]
    assert base.shape == (1, 3, 4, 8, 8)
    assert not torch.allclose(base, swapped)
