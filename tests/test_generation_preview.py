"""The weight-free preview generator: holes really filled, seen pixels untouched, temporal
propagation, the PREVIEW label, and the generator interface shared with EX-4D."""

from __future__ import annotations

import numpy as np
import pytest

from ex4d_backend.generation import load_generator
from ex4d_backend.generation.preview import PreviewGenerator

A = np.array([200, 40, 90], np.uint8)
B = np.array([20, 180, 250], np.uint8)


def _guide(colors, hole=(slice(20, 40), slice(24, 44)), h=64, w=64):
    """Uniform frames of the given colours, each with the same rectangular hole (mask 0) holding junk."""
    t = len(colors)
    color = np.empty((t, h, w, 3), np.uint8)
    mask = np.full((t, h, w), 255, np.uint8)
    for i, c in enumerate(colors):
        color[i] = c
        color[i][hole] = (255, 0, 255)  # junk in the hole: must not survive
        mask[i][hole] = 0
    return color, mask, hole


def test_holes_filled_seen_pixels_unchanged():
    rng = np.random.default_rng(0)
    color = rng.integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    color[0, :, :32] = A  # left half uniform so the fill has a known answer near it
    mask = np.full((1, 64, 64), 255, np.uint8)
    mask[0, 10:30, 8:20] = 0  # hole inside the uniform half
    out = PreviewGenerator(label=False)(color, mask, height=64, width=64, num_frames=1)
    seen = mask[0] > 0
    np.testing.assert_array_equal(out[0][seen], color[0][seen])
    hole = out[0][~seen].astype(int)
    assert np.abs(hole - A.astype(int)).max() <= 4  # filled from its surroundings (1/4-res fill)


def test_uniform_fill_and_temporal_propagation():
    """Frame 0's hole takes its surroundings (A); frame 1's hole is the 50/50 blend of its own spatial
    fill (B) and frame 0's output (A): (A + B + 1) // 2."""
    color, mask, hole = _guide([A, B, B, B, B])
    out = PreviewGenerator(label=False)(color, mask, height=64, width=64, num_frames=5)
    assert np.abs(out[0][hole].astype(int) - A.astype(int)).max() <= 2
    blend = (A.astype(int) + B.astype(int) + 1) // 2
    assert np.abs(out[1][hole].astype(int) - blend).max() <= 2
    np.testing.assert_array_equal(out[1][mask[1] > 0], np.broadcast_to(B, out[1][mask[1] > 0].shape))
    # the fill keeps converging to the steady colour: |fill - B| halves every frame
    errs = [np.abs(out[i][hole].astype(int) - B.astype(int)).max() for i in range(1, 5)]
    assert all(e2 <= e1 // 2 + 3 for e1, e2 in zip(errs, errs[1:], strict=False)) and errs[-1] <= errs[0] // 4, errs


def test_frames_without_holes_pass_through_and_break_the_chain():
    color, mask, hole = _guide([A, B, A, A, A])
    mask[1] = 255  # frame 1 fully seen (its "hole" junk is real content now)
    out = PreviewGenerator(label=False)(color, mask, height=64, width=64, num_frames=5)
    np.testing.assert_array_equal(out[1], color[1])
    blend = (A.astype(int) + color[1][hole].astype(int) + 1) // 2  # propagated from frame 1's output
    assert np.abs(out[2][hole].astype(int) - blend).max() <= 2


def test_label_and_interface():
    color, mask, _ = _guide([A] * 3)
    calls = []
    gen = load_generator("preview", models_dir="/nonexistent", vram_profile="12gb", merge_lora=True)
    out = gen(
        color, mask, height=32, width=48, num_frames=5, steps=25, cfg=5.0, seed=3, callback=lambda *a: calls.append(a)
    )
    assert out.shape == (5, 32, 48, 3) and out.dtype == np.uint8
    assert [(s, i, n) for s, i, n, _ in calls] == [("preview", i, 5) for i in range(1, 6)]
    plain = PreviewGenerator(label=False)(color, mask, height=32, width=48, num_frames=5)
    diff = np.any(out != plain, axis=-1)
    assert diff.any() and not diff[out.shape[1] // 2 :].any()  # the label sits in the top part only
    gen.close()


def test_preview_rejects_mismatched_guides():
    from ex4d_backend.errors import Ex4dError

    color, mask, _ = _guide([A, B, A, B, A])
    mask = mask[:1]
    with pytest.raises(Ex4dError, match="5 frames but the mask guide has 1"):
        PreviewGenerator()(color, mask, height=32, width=32, num_frames=5)
