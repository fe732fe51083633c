"""Disocclusion meter (issue 18): the low-resolution pass's masked share per frame against the full guide's,
for three camera moves over the synthetic scene and a world-fixed camera over a moving source."""

from __future__ import annotations

import numpy as np
import pytest
from scene_fixtures import jittery_source_path, pose, rot, source_footage

from ex4d_backend import cameras, meter, synthetic
from ex4d_backend.cameras import CameraPath
from ex4d_backend.recon import run_recon

W, H, T = 512, 384, 7
TOL_PP = 2.0  # the bound: percentage points per frame

pytestmark = pytest.mark.slow  # full CPU guides at 512 x 384 to compare with: about 15-25 s in all


@pytest.fixture(scope="module")
def scene():
    frames, depth, k = synthetic.make_scene(W, H, T)
    return frames, depth, k


@pytest.mark.parametrize("preset", ["30", "180", "zoom_out"])
def test_meter_matches_the_full_guide(scene, preset) -> None:
    """An orbit, a sideways sweep and a dolly: the meter (every 3rd pixel) is within 2 points of the full
    guide's masked share on every frame, and the moves do disocclude (the test is not trivially 0 = 0).
    Catches a meter with the guide's own alpha threshold on the decimated mesh (reads 3-7 points high), an
    even output step (border-ring aliasing), another camera or frame order than the guide's."""
    frames, depth, k = scene
    cam = cameras.preset_path(preset, T, k, depth[0], W, H)
    full = meter.guide_masked_share(run_recon(frames, depth, cam, k=k, renderer="cpu").mask)
    m = meter.masked_share(depth, k, cam)
    assert meter.meter_step(W, H) == 3
    assert full.max() > 0.05
    np.testing.assert_array_less(np.abs(m - full) * 100, TOL_PP)
    assert m[0] == 0.0 == full[0]  # frame 0 is the source frame (the camera starts there)


def test_meter_over_a_moving_source() -> None:
    """A world-fixed camera over a jittering, moving source (issue 15's setup), depth in other units: the
    meter takes the source path and the scale as the guide does. Catches a meter that ignores them."""
    k = np.array([[420.0, 0, 240.0], [0, 420.0, 180.0], [0, 0, 1]])
    w, h, n = 480, 360, 5
    e_src = jittery_source_path(n)
    frames, depth = source_footage(e_src, k, w, h)
    source = CameraPath(e_src, k, w, h)
    cam = CameraPath(np.broadcast_to(pose((0.3, -0.12, -0.5), rot(-7.0, 2.5, 1.0)), (n, 4, 4)).copy(), k, w, h)
    guide = run_recon(frames, depth / 2.0, cam, k=k, renderer="cpu", source_camera=source, depth_scale=2.0)
    full = meter.guide_masked_share(guide.mask)
    m = meter.masked_share(depth / 2.0, k, cam, source=source, depth_scale=2.0)
    assert full.min() > 0.02
    np.testing.assert_array_less(np.abs(m - full) * 100, TOL_PP)
    wrong = meter.masked_share(depth / 2.0, k, cam, depth_scale=2.0)  # the source path forgotten
    assert np.abs(wrong - full).max() * 100 > 3 * TOL_PP


def test_meter_step_is_odd() -> None:
    for side in (128, 256, 512, 640, 1024, 1920):
        s = meter.meter_step(side, side // 2)
        assert s % 2 == 1 and side / s >= 100


@pytest.mark.cuda
def test_meter_cuda_agrees_with_cpu(scene) -> None:
    """The nvdiffrast path of the meter (no antialiasing) reads what the numba one reads (0.5 points)."""
    frames, depth, k = scene
    cam = cameras.preset_path("30", T, k, depth[0], W, H)
    a = meter.masked_share(depth, k, cam, renderer="cpu")
    b = meter.masked_share(depth, k, cam, renderer="cuda")
    np.testing.assert_array_less(np.abs(a - b) * 100, 0.5)
