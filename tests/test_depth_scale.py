"""Depth scale from a camera solve's bundles (issue 15): synthetic bundles on the analytic scene's surfaces,
seen by a jittering source camera, depth maps in other units with noise and outliers among the bundles."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scene_fixtures import H, K, W, jittery_source_path, render, source_footage, visible_from

from ex4d_backend import depth_scale as ds
from ex4d_backend.cameras import CV_TO_BLENDER, CameraPath
from ex4d_backend.errors import Ex4dError

T = 6
S_TRUE = 2.7  # world units per depth unit


@pytest.fixture(scope="module")
def solve():
    e_src = jittery_source_path(T, seed=5)
    _, depth = source_footage(e_src)
    source = CameraPath(e_src, K, W, H)
    rng = np.random.default_rng(0)
    _, _, pts, _ = render(e_src[0], offset=0.0)
    pick = rng.choice(H * W, 120, replace=False)
    points = pts.reshape(-1, 3)[pick]
    vis = np.stack([visible_from(points, e) for e in e_src])
    return source, depth, points, vis


def with_outliers(points: np.ndarray, share: float, seed: int = 1) -> np.ndarray:
    """Bad bundles: a share of the points moved along their line of sight from the first camera by a factor
    0.5..0.8 (a fifth of them) or 1.25..2 (they still project to the same pixel, with the wrong depth)."""
    rng = np.random.default_rng(seed)
    out = points.copy()
    bad = rng.random(len(points)) < share
    e0 = jittery_source_path(T, seed=5)[0]
    c0 = np.linalg.inv(e0)[:3, 3]
    f = np.where(rng.random(bad.sum()) < 0.2, rng.uniform(0.5, 0.8, bad.sum()), rng.uniform(1.25, 2.0, bad.sum()))
    out[bad] = c0 + f[:, None] * (points[bad] - c0)
    return out


def noisy(depth: np.ndarray, rel: float, seed: int = 2) -> np.ndarray:
    return depth * (1 + np.random.default_rng(seed).normal(0, rel, depth.shape))


def test_shot_scale_to_one_percent_with_outliers(solve) -> None:
    """25 % bad bundles and 1 % depth noise: the scale is found to 1 %, the residual reflects the noise,
    no warning. Catches a least-squares fit (pulled by the outliers), a ratio the wrong way round (1/s),
    sampling the depth at the wrong pixel (u/v swapped) or without the source pose of that frame."""
    source, depth, points, vis = solve
    b = ds.Bundles(with_outliers(points, 0.25), vis)
    fit = ds.fit_depth_scale(b, source, noisy(depth / S_TRUE, 0.01))
    assert abs(fit.scale / S_TRUE - 1) < 0.01, fit.scale
    assert fit.residual < 0.03 and not fit.warnings and fit.n_obs > 300
    plain_ls = np.exp(np.mean(np.log(_ratios(b, source, depth / S_TRUE))))
    assert abs(plain_ls / S_TRUE - 1) > 0.02  # the outliers do bias a non-robust fit: the test can tell


def _ratios(b, source, depth):
    _, z_s, z_d = ds.observations(b, source, depth)
    return z_s / z_d


def test_per_frame_scale(solve) -> None:
    """Depth whose scale drifts over the shot (as per-window monocular depth can): each frame's scale to 1 %."""
    source, depth, points, vis = solve
    truth = S_TRUE * (1 + 0.06 * np.arange(T))
    fit = ds.fit_depth_scale(
        ds.Bundles(with_outliers(points, 0.2), vis), source, depth / truth[:, None, None], per_frame=True
    )
    np.testing.assert_allclose(fit.scales(T), truth, rtol=0.01)


def test_poor_fit_warns(solve) -> None:
    """Depth that is not a scaled copy (an affine disparity, as relative depth models give): a warning says so
    (the ratio's slope against depth), while outlier bundles on a scaled copy give no slope. Catches a fit
    that never warns, or one that calls outliers a distortion."""
    source, depth, points, vis = solve
    affine = 1.0 / (0.2 / depth + 0.3)
    fit = ds.fit_depth_scale(ds.Bundles(points, vis), source, affine)
    assert fit.poor and "does not follow" in fit.warnings[0] and fit.slope > 0.5
    # most bundles lie on the wall, so a robust scale alone looks fine: the slope is what tells
    assert fit.residual < ds.WARN_RESIDUAL
    assert abs(ds.fit_depth_scale(ds.Bundles(with_outliers(points, 0.25), vis), source, depth).slope) < 0.05


def test_marker_positions_and_blender_bundle_files(solve, tmp_path) -> None:
    """A Blender-world JSON bundle file with marker positions gives the same fit as OpenCV points projected.
    Catches a wrong CV_TO_BLENDER direction and a uv (column, row) swap."""
    source, depth, points, vis = solve
    d = depth / S_TRUE
    ref = ds.fit_depth_scale(ds.Bundles(points, vis), source, d)
    blender = points @ CV_TO_BLENDER[:3, :3].T
    items = []
    for j in range(len(points)):
        frames = np.flatnonzero(vis[:, j]).tolist()
        uv = []
        for t in frames:
            x = source.extrinsics[t] @ np.append(points[j], 1)
            uv.append([K[0, 0] * x[0] / x[2] + K[0, 2], K[1, 1] * x[1] / x[2] + K[1, 2]])
        items.append({"co": blender[j].tolist(), "frames": frames, "uv": uv})
    f = tmp_path / "bundles.json"
    f.write_text(json.dumps({"convention": "blender", "bundles": items}))
    b = ds.load_bundles(f, T)
    np.testing.assert_allclose(b.points, points, atol=1e-12)
    fit = ds.fit_depth_scale(b, source, d)
    assert fit.n_obs == ref.n_obs and abs(fit.scale / ref.scale - 1) < 1e-9
    np.savez(tmp_path / "b.npz", points=points, visibility=vis)
    assert abs(ds.fit_depth_scale(ds.load_bundles(tmp_path / "b.npz", T), source, d).scale / ref.scale - 1) < 1e-12


def test_bad_bundles_are_one_clear_error(solve, tmp_path) -> None:
    source, depth, points, vis = solve
    with pytest.raises(Ex4dError, match="no bundle projects"):
        ds.fit_depth_scale(ds.Bundles(points, np.zeros_like(vis)), source, depth)
    with pytest.raises(Ex4dError, match="not found"):
        ds.load_bundles(tmp_path / "none.json", T)
    (tmp_path / "x.json").write_text("[1, 2]")
    with pytest.raises(Ex4dError, match="bundles"):
        ds.load_bundles(tmp_path / "x.json", T)
    with pytest.raises(Ex4dError):
        ds.ScaleFit.manual(0.0)
    assert ds.ScaleFit.manual(3.0).scales(2).tolist() == [3.0, 3.0]
