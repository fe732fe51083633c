"""Full-resolution composite (``composite.py``): the guide where the source saw, the upscaled generation
in the holes, colours matched, against ground truth computed here independently."""

from __future__ import annotations

import numpy as np
import pytest

from ex4d_backend.composite import Compositor, feather_alpha, fit_colour

GW, GH = 256, 144  # guide (16:9)
W, H = 64, 32  # generation size (crop box 64/32 = 2.0 of the guide: 288 -> 256x128 box, y0 = 8)


def _guide(seed: int = 0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:GH, 0:GW]
    g = np.stack([xx * 255 // GW, yy * 255 // GH, (xx + yy) % 200], -1).astype(np.uint8)
    g = np.clip(g.astype(int) + rng.integers(-10, 10, g.shape), 0, 255).astype(np.uint8)
    mask = np.full((GH, GW), 255, np.uint8)
    mask[40:100, 150:230] = 0  # a disocclusion
    mask[:, :12] = 0  # and a strip at the border
    return g, mask


def _distance_to_hole(mask: np.ndarray) -> np.ndarray:
    """Exact Euclidean distance of every pixel to the nearest hole pixel (brute force, no OpenCV). The
    nearest hole pixel of a seen pixel is always a hole pixel with a seen 4-neighbour (or on the border
    of a hole-only row), so only those are searched."""
    holes = mask <= 127
    pad = np.pad(holes, 1, constant_values=True)
    inner = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
    edge = np.argwhere(holes & ~inner).astype(np.float64)
    pts = np.argwhere(np.ones_like(holes)).astype(np.float64)
    d = np.full(len(pts), np.inf)
    for chunk in np.array_split(edge, max(1, len(edge) // 64)):
        d = np.minimum(d, np.sqrt(((pts[:, None, :] - chunk[None]) ** 2).sum(-1)).min(1))
    d = d.reshape(holes.shape)
    d[holes] = 0.0
    return d


def test_feather_is_distance_over_width():
    """alpha = min(1, d / F) with d the exact distance to the nearest hole. Fails on a blur-based or
    one-sided feather, or a city-block distance."""
    _, mask = _guide()
    alpha = feather_alpha(mask, 6.0)
    expected = np.minimum(1.0, _distance_to_hole(mask) / 6.0)
    np.testing.assert_allclose(alpha, expected, atol=1e-4)
    assert feather_alpha(np.full((4, 4), 255, np.uint8), 6.0).min() == 1.0


@pytest.mark.parametrize("resize", ["crop", "stretch"])
def test_composite_is_guide_where_seen_and_generation_in_holes(resize):
    """Seen pixels at least F from a hole are exactly the guide; hole pixels are exactly the bicubic
    upscale of the generated frame placed in the field-of-view box (edge pixels repeated outside it).
    Fails if the guide is resampled, the generation is pasted at the wrong place/scale, or the feather
    leaks into the holes."""
    import cv2

    g, mask = _guide()
    gen = np.random.default_rng(1).integers(0, 256, (H, W, 3), dtype=np.uint8)
    comp = Compositor((GW, GH), (W, H), resize=resize, match="none")
    out = comp(g, mask, gen)
    assert out.shape == (GH, GW, 3) and out.dtype == np.uint8
    if resize == "stretch":
        up = cv2.resize(gen, (GW, GH), interpolation=cv2.INTER_CUBIC)
    else:  # centred crop box of aspect 2:1 in a 256x144 guide: 256 x 128 at y0 = 8
        assert comp.box == (0, 8, 256, 128)
        box = cv2.resize(gen, (256, 128), interpolation=cv2.INTER_CUBIC)
        up = np.concatenate([np.repeat(box[:1], 8, 0), box, np.repeat(box[-1:], 8, 0)], 0)
    d = _distance_to_hole(mask)
    far = d >= comp.feather_px
    holes = mask <= 127
    np.testing.assert_array_equal(out[far], g[far])
    np.testing.assert_array_equal(out[holes], up[holes])
    _, _, bw, bh = comp.box
    assert comp.feather_px == pytest.approx(8 * max(bw / W, bh / H))  # 8 generation px, in guide px


def test_colour_match_recovers_a_known_shift():
    """The generated frame is the guide with a known per-channel gain/offset (what a VAE colour drift
    looks like); the affine and mean/std fits recover the inverse, so the holes come back in the guide's
    colours. Fails if the fit is inverted, uses the holes, or is not applied."""
    import cv2

    g, mask = _guide()
    small = cv2.resize(g, (W, H * 144 // 128 + 4), interpolation=cv2.INTER_AREA)  # any frame will do
    gain, offset = np.array([0.8, 1.1, 0.9]), np.array([20.0, -8.0, 5.0])
    drifted = np.clip(np.rint(small * gain + offset), 0, 255).astype(np.uint8)
    seen = np.ones(small.shape[:2], bool)
    for mode in ("affine", "meanstd"):
        a = fit_colour(drifted, small, seen, mode)
        np.testing.assert_allclose(np.diag(a[:, :3]), 1 / gain, rtol=0.02)
        np.testing.assert_allclose(a[:, 3], -offset / gain, atol=2.5)
    assert np.array_equal(fit_colour(drifted, small, seen, "none"), np.hstack([np.eye(3), np.zeros((3, 1))]))
    # end to end: a generated frame whose seen region is the drifted guide is matched back
    gen_clean = cv2.resize(g[8:136], (W, H), interpolation=cv2.INTER_AREA)
    gen = np.clip(np.rint(gen_clean * gain + offset), 0, 255).astype(np.uint8)
    out = Compositor((GW, GH), (W, H), match="affine")(g, mask, gen)
    plain = Compositor((GW, GH), (W, H), match="none")(g, mask, gen)
    holes = mask[8:136] <= 127
    ref = cv2.resize(gen_clean, (256, 128), interpolation=cv2.INTER_CUBIC)
    err_matched = np.abs(out[8:136][holes].astype(float) - ref[holes]).mean()
    err_plain = np.abs(plain[8:136][holes].astype(float) - ref[holes]).mean()
    assert err_matched < 2.0 < err_plain
