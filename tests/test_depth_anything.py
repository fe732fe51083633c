"""Depth Anything V2 provider and its temporal alignment (ground truth: synthetic affine flicker)."""

from __future__ import annotations

import numpy as np
import pytest
from depth_fixtures import DPT_PREPROCESSOR, depth_models, gradient_clip  # noqa: F401

from ex4d_backend import depth
from ex4d_backend.depth import depth_anything as da


def _scene(h=48, w=64) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    disp = 0.2 + 0.5 * xx / w
    disp[10:30, 20:40] = 0.9  # a near box
    return disp.astype(np.float32)


def test_alignment_removes_affine_flicker_of_a_static_scene():
    rng = np.random.default_rng(1)
    scene = _scene()
    flicker = np.stack([scene * rng.uniform(0.5, 2.0) + rng.uniform(-0.3, 0.3) for _ in range(12)])
    aligned = da.align_to_previous(flicker)
    norm = (aligned - aligned.min()) / (aligned.max() - aligned.min())
    ref = (scene - scene.min()) / (scene.max() - scene.min())
    assert np.abs(norm - ref[None]).max() < 1e-4  # every frame is the same normalised scene again
    raw = (flicker - flicker.min()) / (flicker.max() - flicker.min())
    assert np.abs(np.diff(raw, axis=0)).mean() > 0.05  # the input really flickered


def test_alignment_is_robust_to_outliers():
    rng = np.random.default_rng(2)
    scene = _scene()
    a = scene.copy()
    b = scene * 1.7 - 0.2
    mask = rng.random(b.shape) < 0.1
    b[mask] = rng.uniform(0, 3, mask.sum())  # 10 % garbage (a moving object, say)
    s, t = da.fit_scale_shift(b, a)
    assert s == pytest.approx(1 / 1.7, rel=1e-3) and t == pytest.approx(0.2 / 1.7, abs=1e-3)


def test_input_size_matches_the_published_processor():
    from transformers import DPTImageProcessor

    proc = DPTImageProcessor(**{k: v for k, v in DPT_PREPROCESSOR.items() if k != "image_processor_type"})
    for w, h in [(640, 360), (512, 512), (96, 64), (1024, 436), (300, 900)]:
        img = np.zeros((h, w, 3), np.uint8)
        out = proc(images=img, return_tensors="np")["pixel_values"][0]
        assert da.input_size(w, h) == (out.shape[-1], out.shape[-2])


def test_depth_anything_end_to_end(depth_models):
    frames = gradient_clip(6, 48, 80)
    calls = []
    res = depth.estimate(frames, "depth-anything-v2", models_dir=depth_models, device="cpu", progress=lambda *a: calls.append(a))
    assert res.model == "depth-anything-v2-small"
    assert res.depth.shape == res.disparity.shape == (6, 48, 80)
    assert res.depth.dtype == np.float32 and np.isfinite(res.depth).all()
    assert res.disparity.min() == 0.0 and res.disparity.max() == 1.0
    assert res.depth.min() == pytest.approx(10000 / 3900, rel=1e-6)
    assert any(c[0] == "depth" for c in calls)
    again = depth.estimate(frames, "depth-anything-v2-small", models_dir=depth_models, device="cpu", batch=2)
    np.testing.assert_allclose(res.disparity, again.disparity, atol=1e-5)  # batching does not change results
