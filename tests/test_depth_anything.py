"""Depth Anything V2 provider and its temporal alignment (ground truth: synthetic affine flicker)."""

from __future__ import annotations

import numpy as np
import pytest
from depth_fixtures import DPT_PREPROCESSOR, depth_models, fast_depth_models, gradient_clip  # noqa: F401

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


def _flicker(disp: np.ndarray) -> float:
    """Mean absolute frame-to-frame change of a clip-normalised disparity (0 for a steady clip)."""
    d = (disp - disp.min()) / (disp.max() - disp.min())
    return float(np.abs(np.diff(d, axis=0)).mean())


class _AffineFlicker:
    """The real model, with each frame's output put through its own scale and shift: the unknown
    per-frame affine ambiguity of a relative-depth network, made explicit."""

    def __init__(self, model, scales, shifts):
        self.model, self.scales, self.shifts, self.i = model, scales, shifts, 0

    def __call__(self, pixel_values):
        out = self.model(pixel_values=pixel_values)
        assert len(pixel_values) == 1  # one frame per call (batch=1)
        out.predicted_depth = out.predicted_depth * self.scales[self.i] + self.shifts[self.i]
        self.i += 1
        return out


def test_static_clip_does_not_flicker_after_alignment(fast_depth_models):  # noqa: F811
    rng = np.random.default_rng(3)
    still = gradient_clip(1, 48, 64)[0]
    frames = np.repeat(still[None], 8, axis=0)  # a static shot
    m = da.load("depth-anything-v2-small", fast_depth_models, "cpu")
    steady = da.infer(frames[:1].repeat(2, 0), m, align="none")[0]  # the model's own answer, no flicker
    scales, shifts = rng.uniform(0.5, 2.0, 8), rng.uniform(-0.5, 0.5, 8)
    runs = {}
    for align in ("none", "previous"):
        m.model, real = _AffineFlicker(m.model, scales, shifts), m.model
        runs[align] = da.infer(frames, m, batch=1, align=align)
        m.model = real
    assert _flicker(runs["none"]) > 0.05  # the per-frame ambiguity really flickers
    assert _flicker(runs["previous"]) < 1e-4 * _flicker(runs["none"]) + 1e-6
    ref = (steady - steady.min()) / (steady.max() - steady.min())
    np.testing.assert_allclose(runs["previous"], np.repeat(ref[None], 8, 0), atol=1e-4)  # and is the scene


def test_alignment_reduces_exposure_flicker_through_the_model(fast_depth_models):  # noqa: F811
    # A static shot with exposure changing from frame to frame, through the unmodified model.
    rng = np.random.default_rng(0)
    base = gradient_clip(1, 48, 64)[0].astype(np.float32)
    base[10:30, 20:40] = [200, 40, 40]
    frames = np.stack([np.clip(base * rng.uniform(0.6, 1.4), 0, 255) for _ in range(6)]).astype(np.uint8)
    none = depth.estimate(frames, "depth-anything-v2", models_dir=fast_depth_models, device="cpu", align="none")
    stab = depth.estimate(frames, "depth-anything-v2", models_dir=fast_depth_models, device="cpu")
    assert _flicker(stab.disparity) < 0.85 * _flicker(none.disparity)
    assert stab.depth.min() == pytest.approx(10000 / 3900, rel=1e-6)  # DepthCrafter's range convention


def test_depth_anything_end_to_end(depth_models):  # noqa: F811
    frames = gradient_clip(4, 48, 80)
    calls = []
    res = depth.estimate(
        frames, "depth-anything-v2", models_dir=depth_models, device="cpu", progress=lambda *a: calls.append(a)
    )
    assert res.model == "depth-anything-v2-small"
    assert res.depth.shape == res.disparity.shape == (4, 48, 80)
    assert res.depth.dtype == np.float32 and np.isfinite(res.depth).all()
    assert res.disparity.min() == 0.0 and res.disparity.max() == 1.0
    assert res.depth.min() == pytest.approx(10000 / 3900, rel=1e-6)
    assert any(c[0] == "depth" for c in calls)
    again = depth.estimate(frames, "depth-anything-v2-small", models_dir=depth_models, device="cpu", batch=2)
    np.testing.assert_allclose(res.disparity, again.disparity, atol=1e-5)  # batching does not change results
