"""``ex4d serve`` with a moving source camera (issue 15): a real service subprocess, the analytic scene
filmed by a jittering camera, the source sent as raw Blender camera data (as the add-on will), the
depth's scale fitted to bundles sent in Blender world coordinates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import service_fixtures as sf
from scene_fixtures import H, K, W, band, jittery_source_path, pose, psnr, render, rot, source_footage, visible_from

from ex4d_backend.cameras import CV_TO_BLENDER, intrinsics_to_blender, opencv_to_blender_matrix_world
from ex4d_backend.footage import list_image_sequence, read_image_rgb, write_png_sequence

pytestmark = pytest.mark.slow  # a service subprocess: about 20 s in all, mostly its start-up

T = 5
SCALE = 1.6  # the depth file is in 1/1.6 world units


def blender_camera(extrinsics: np.ndarray) -> dict:
    lens = intrinsics_to_blender(K, W, H, 36.0, "HORIZONTAL")
    return {
        "matrix_world": opencv_to_blender_matrix_world(extrinsics).tolist(),
        "lens": lens["lens"],
        "sensor_width": 36.0,
        "sensor_fit": "HORIZONTAL",
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("svc_src")
    e_src = jittery_source_path(T, seed=7)
    frames, depth = source_footage(e_src)
    write_png_sequence(root / "data" / "clip", frames)
    np.save(root / "data" / "depth.npy", (depth / SCALE).astype(np.float32))
    client = sf.start_client(root / "store", [root / "data"])
    params = {
        "footage": str(root / "data" / "clip"),
        "depth": {"model": "file", "path": str(root / "data" / "depth.npy")},
        "renderer": "cpu",
        "source_camera": {"blender": blender_camera(e_src)},
    }
    yield params, e_src, frames, depth, client
    client.close()


def _read(folder: str) -> np.ndarray:
    return np.stack([read_image_rgb(p) for p in list_image_sequence(Path(folder))])


def _bundles_blender(e_src: np.ndarray) -> list[dict]:
    _, _, pts, _ = render(e_src[0])
    points = pts.reshape(-1, 3)[np.random.default_rng(0).choice(H * W, 60, replace=False)]
    vis = np.stack([visible_from(points, e) for e in e_src])
    blender = points @ CV_TO_BLENDER[:3, :3].T
    return [{"co": blender[j].tolist(), "frames": np.flatnonzero(vis[:, j]).tolist()} for j in range(len(points))]


def test_world_fixed_camera_and_bundle_fit_through_the_service(env) -> None:
    """A world-fixed Blender camera over the moving source, the depth scale fitted to Blender-world bundles:
    the guide matches the ray-cast ground truth per frame (kept/masked >= 0.99, PSNR >= 30 dB), frame 0 is
    rendered (the camera does not start at the source). Catches a service that ignores source_camera (the
    static-source guide), a wrong Blender->OpenCV conversion of the source or the bundles, a scale not
    applied."""
    params, e_src, _, _, client = env
    e_novel = pose((0.25, -0.1, -0.45), rot(-6.0, 2.0, 0.5))
    p = {
        **params,
        "camera": {"blender": blender_camera(np.broadcast_to(e_novel, (T, 4, 4)))},
        "depth_scale": {"bundles": _bundles_blender(e_src), "convention": "blender"},
    }
    req, _ = sf.run(client, "render_guide", p)
    r = req.raise_for_error()
    assert r["frame0_is_source"] is False and abs(r["depth_scale_fit"]["scale"] / SCALE - 1) < 0.01
    color, mask = _read(r["color_dir"]), _read(r["mask_dir"])[..., 0]
    _, col_gt, pts, pid = render(e_novel, offset=0.5)
    for t in range(T):
        seen = visible_from(pts.reshape(-1, 3), e_src[t]).reshape(H, W)
        edge = band(seen)
        for i in np.unique(pid):
            edge |= band(pid == i)
        care, m = ~edge, mask[t] > 127
        assert (m & seen & care).sum() / (seen & care).sum() >= 0.99, t
        assert (~m & ~seen & care).sum() / (~seen & care).sum() >= 0.99, t
        sel = m & seen & care
        assert psnr(color[t][sel], col_gt[sel] * 255) >= 30.0, t


def test_lock_off_and_manual_scale_through_the_service(env) -> None:
    """``{"lock_off": 0}`` with a manual depth scale: frame 0 is the footage (the camera starts at the source),
    later frames show the scene from source pose 0 (PSNR >= 30 dB against the ray-cast from it). Catches a
    lock_off that follows the source, and a frame-0 rule that replaces frames it should not."""
    params, e_src, frames, _, client = env
    req, _ = sf.run(client, "render_guide", {**params, "camera": {"lock_off": 0}, "depth_scale": SCALE})
    r = req.raise_for_error()
    assert r["frame0_is_source"] is True
    color, mask = _read(r["color_dir"]), _read(r["mask_dir"])[..., 0]
    np.testing.assert_array_equal(color[0], frames[0])
    # build_dwmesh with the same source camera gives the mesh the guide was rendered from (one cache entry)
    mreq, _ = sf.run(client, "build_dwmesh", {k: v for k, v in params.items() if k != "renderer"})
    m = mreq.raise_for_error()
    assert m["cached"]["mesh"] is True
    _, col_gt, pts, pid = render(e_src[0], offset=0.5)
    for t in range(1, T):
        seen = visible_from(pts.reshape(-1, 3), e_src[t]).reshape(H, W)
        sel = (mask[t] > 127) & seen & ~band(seen)
        assert sel.mean() > 0.5 and psnr(color[t][sel], col_gt[sel] * 255) >= 30.0, t
        assert not np.array_equal(color[t], frames[t])


def test_bad_source_camera_is_one_clear_error(env) -> None:
    params, e_src, _, _, client = env
    bad = {**params, "camera": {"preset": "30"}, "source_camera": {"blender": blender_camera(e_src[:2])}}
    req, _ = sf.run(client, "render_guide", bad)
    assert req.error is not None and "frames" in str(req.error), req.error
    req, _ = sf.run(client, "render_guide", {**params, "camera": {"lock_off": 99}})
    assert req.error is not None and "outside the shot" in str(req.error)
