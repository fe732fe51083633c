"""``build_dwmesh`` with a moving source camera and a depth scale (issue 15, the add-on's path): the service
fits the scale to bundles (or takes a manual one) and returns it, while the DW-mesh stays in depth units.

Ground truth: the synthetic scene's exact depth; bundles are its surface points unprojected at pixel centres,
scaled by a known factor and placed in a Blender world by a known source pose (the Blender -> OpenCV formula
written literally here).
"""

from __future__ import annotations

import numpy as np
import pytest
import service_fixtures as sf

from ex4d_backend.service.pointcache import read_pc2

CV_TO_BLENDER = np.array([[1.0, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]])
FLIP_YZ = np.diag([1.0, -1.0, -1.0, 1.0])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("svc_source")
    clip = sf.make_clip(root / "data", n_frames=4)
    client = sf.start_client(root / "store", [clip.root])
    yield clip, client
    client.close()


def _source_pose() -> np.ndarray:
    """A Blender matrix_world: the backend's origin pose (C @ F) turned 20 degrees about Z and moved."""
    a = np.radians(20.0)
    turn = np.array([[np.cos(a), -np.sin(a), 0, 0.3], [np.sin(a), np.cos(a), 0, -1.2], [0, 0, 1, 0.7], [0, 0, 0, 1]])
    return turn @ CV_TO_BLENDER @ FLIP_YZ


def test_build_dwmesh_fits_the_depth_scale_to_bundles(env):
    """Bundles = 2.5 x the scene's surface points in the world of a moved, turned source camera: the fit is 2.5
    within 1 %, returned per frame, and the vertices are the static build's (depth units). Fails when the build
    ignores depth_scale, fits in the wrong world (source pose not used), or scales the mesh itself."""
    clip, client = env
    t, h, w = clip.depth.shape
    mw = _source_pose()
    k = clip.k
    rng = np.random.default_rng(3)
    bundles = []
    for _ in range(40):
        u, v = int(rng.integers(3, w - 3)), int(rng.integers(3, h - 3))
        d = float(clip.depth[0, v, u])
        p_cv = 2.5 * np.array([(u - k[0, 2]) / k[0, 0] * d, (v - k[1, 2]) / k[1, 1] * d, d, 1.0 / 2.5])
        bundles.append({"co": (mw @ FLIP_YZ @ p_cv)[:3].tolist(), "frames": [0]})
    lens = k[0, 0] * 36.0 / w
    source = {"blender": {"matrix_world": [mw.tolist()] * t, "lens": lens, "sensor_width": 36.0, "resolution": [w, h]}}
    scale = {"bundles": bundles, "convention": "blender"}
    r = sf.run(client, "build_dwmesh", clip.params(source_camera=source, depth_scale=scale))[0].raise_for_error()
    assert r["depth_scale_fit"]["scale"] == pytest.approx(2.5, rel=0.01)
    assert r["depth_scales"] == pytest.approx([2.5] * t, rel=0.01)
    static = sf.run(client, "build_dwmesh", clip.params())[0].raise_for_error()
    assert static["depth_scales"] == [1.0] * t and static["depth_scale_fit"] == {}
    np.testing.assert_allclose(read_pc2(r["positions_pc2"])[0], read_pc2(static["positions_pc2"])[0], atol=1e-4)


def test_build_dwmesh_manual_scale_and_a_fit_without_source_is_refused(env):
    """A manual scale comes back as it is; bundles without a source camera are one clear bad_input error."""
    clip, client = env
    t = clip.depth.shape[0]
    r = sf.run(client, "build_dwmesh", clip.params(depth_scale=1.75))[0].raise_for_error()
    assert r["depth_scales"] == pytest.approx([1.75] * t) and r["depth_scale_fit"] == {}
    req = sf.run(client, "build_dwmesh", clip.params(depth_scale={"bundles": [{"co": [0, 0, 1], "frames": [0]}]}))[0]
    assert req.error is not None and req.error["code"] == "bad_input" and "source camera" in req.error["message"]
