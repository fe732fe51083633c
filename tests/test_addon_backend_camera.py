"""The backend side of the add-on's camera contract (issue 12: camera maths only in the backend).

- ``camera.blender.shift_x/shift_y`` may be one value per frame (an animated lens shift): the protocol
  accepts it and ``cameras.camera_path_from_blender`` gives each frame its own principal point, by
  Blender's rule written here (cx = W/2 - shift_x * W for a HORIZONTAL fit, cy = H/2 + shift_y * W).
  Fails when the shift is taken from one frame, or the list is refused.
- ``probe_footage`` and ``build_dwmesh`` give the source camera as Blender values (``matrix_world``
  looking along +Y with Z up at the origin: the Blender camera whose -Z axis is world +Y), so the add-on
  needs no convention of its own.
"""

from __future__ import annotations

import numpy as np
import pytest

from ex4d_backend import cameras
from ex4d_backend.service import info, protocol


def test_per_frame_shift_reaches_each_frames_intrinsics() -> None:
    n, w, h = 4, 96, 64
    mw = np.stack([np.eye(4)] * n)
    sx, sy = np.linspace(0.0, 0.25, n), np.linspace(0.0, -0.1, n)
    path = cameras.camera_path_from_blender(mw, 35.0, w, h, 36.0, 24.0, "HORIZONTAL", sx, sy)
    np.testing.assert_allclose(path.intrinsics[:, 0, 2], w / 2 - sx * w)
    np.testing.assert_allclose(path.intrinsics[:, 1, 2], h / 2 + sy * w)
    np.testing.assert_allclose(path.intrinsics[:, 0, 0], 35.0 / 36.0 * w)
    one = cameras.camera_path_from_blender(mw, 35.0, w, h, 36.0, 24.0, "HORIZONTAL", 0.1, 0.0)
    np.testing.assert_allclose(one.intrinsics[:, 0, 2], w / 2 - 0.1 * w)  # one value: every frame


def test_protocol_accepts_a_shift_per_frame_and_refuses_junk() -> None:
    cam = {"matrix_world": [np.eye(4).tolist()] * 3, "lens": [35.0] * 3, "shift_x": [0.0, 0.1, 0.2], "shift_y": 0.0}
    params = {"footage": "/x.mp4", "depth": {"model": "file", "path": "/d.npy"}, "camera": {"blender": cam}}
    protocol.validate_params("render_guide", params)
    cam["shift_x"] = ["a", 0.1, 0.2]
    with pytest.raises(Exception):  # noqa: B017 - the protocol's own error type
        protocol.validate_params("render_guide", params)


def test_source_camera_as_blender_values() -> None:
    k = cameras.reference_intrinsics(64, 48, 50.0)
    cam = info.blender_source_camera(k, 64, 48)
    mw = np.array(cam["matrix_world"])
    np.testing.assert_allclose(mw[:3, 3], 0.0, atol=1e-12)
    np.testing.assert_allclose(-mw[:3, 2], [0.0, 1.0, 0.0], atol=1e-12)  # looks along +Y
    np.testing.assert_allclose(mw[:3, 1], [0.0, 0.0, 1.0], atol=1e-12)  # up is +Z
    assert cam["lens"] == pytest.approx(50.0 * 36.0 / 64) and cam["sensor_fit"] == "HORIZONTAL"
    assert cam["shift_x"] == pytest.approx(0.0) and cam["shift_y"] == pytest.approx(0.0)
