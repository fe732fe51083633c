"""The ``meter`` request (issue 18) through a real ``ex4d serve`` subprocess: the disocclusion meter on the
cached stages, cached per camera hash."""

from __future__ import annotations

import time

import numpy as np
import pytest
import service_fixtures as sf

from ex4d_backend import meter
from ex4d_backend.cameras import CameraPath

W, H, T = 384, 288, 7  # meter_step 3: the decimated pass, not the full guide's mesh


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("svc_meter")
    clip = sf.make_clip(root / "data", W, H, T, focal_px=360.0)
    client = sf.start_client(root / "store", [clip.root])
    yield clip, client
    client.close()


def test_meter_request_equals_masked_share_and_caches(env):
    """The request's shares equal ``meter.masked_share`` on the same depth, K and camera path (the guide's
    own camera.npz), are within 2 points of the full guide's masked share, report the worst frame, and a
    repeat is a cache hit; the same cameras sent as matrices hit the meter's per-camera-hash entry.
    Catches an executor that meters another camera (not the preset resolved like render_guide's), another
    depth/K, a stale or missing cache (the second call recomputing), a worst frame off by one."""
    clip, client = env
    params = clip.params(camera={"preset": "180"}, renderer="cpu")
    guide = client.request("render_guide", params, timeout=300)
    t0 = time.monotonic()
    first = client.request("meter", params, timeout=300)
    first_s = time.monotonic() - t0
    with np.load(guide["camera_npz"]) as npz:
        path = CameraPath(npz["extrinsics"], npz["intrinsics"], W, H)
    expected = meter.masked_share(clip.depth, clip.k, path, renderer="cpu")
    got = np.asarray(first["masked_share"])
    assert got.shape == (T,)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert np.abs(got - np.asarray(guide["masked_share"])).max() * 100 < 2.0
    assert got.max() > 0.05  # the move does disocclude
    assert first["worst_frame"] == int(np.argmax(expected))
    assert first["worst_share"] == pytest.approx(expected.max(), abs=1e-6)
    assert first["camera_hash"] == guide["camera_hash"]
    assert first["cached"].get("meter") is False and first["cached"].get("depth") is True

    t0 = time.monotonic()
    again = client.request("meter", params, timeout=60)
    again_s = time.monotonic() - t0
    assert again["masked_share"] == first["masked_share"]
    assert again["cached"].get("meter") is True
    print(f"meter request {W}x{H}x{T}: first {first_s:.2f} s, repeated {again_s:.2f} s")

    with np.load(guide["camera_npz"]) as npz:
        opencv = {"extrinsics": npz["extrinsics"].tolist(), "intrinsics": npz["intrinsics"].tolist()}
    other = client.request("meter", clip.params(camera={"opencv": opencv}, renderer="cpu"), timeout=60)
    assert other["camera_hash"] == first["camera_hash"]
    assert other["cached"].get("meter") is True  # the camera hash, not the request's spelling, keys it
    assert other["masked_share"] == first["masked_share"]


def test_meter_bad_camera_is_one_clear_error(env):
    """A camera path with too few frames is refused with the camera stage's error (nothing metered).
    Catches a meter that pads, truncates or crashes on a short path."""
    clip, client = env
    eye = np.eye(4).tolist()
    req, _events = sf.run(client, "meter", clip.params(camera={"opencv": {"extrinsics": [eye, eye]}}, renderer="cpu"))
    assert req.error is not None
    assert req.error["where"] == "params.camera" and "frames" in req.error["message"]
