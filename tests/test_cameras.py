"""Cameras: reference presets (formulas written literally from EX4D_REFERENCE.md), look-at, camera files,
Blender and OpenGL conversions (round trips and independent projection formulas)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ex4d_backend import cameras
from ex4d_backend.errors import Ex4dError

RNG = np.random.default_rng(1234)


# ----------------------------------------------------------------------------------------------
# The reference, written literally (EX4D_REFERENCE.md, "Camera presets")
# ----------------------------------------------------------------------------------------------
def ref_radius(depth0: np.ndarray) -> float:
    d = depth0.astype(np.float64).copy()
    d[0, :] = 100.0
    d[-1, :] = 100.0
    d[:, 0] = 100.0
    d[:, -1] = 100.0
    return d.min() + 0.15


def ref_eyes(deg: int, n: int, r: float) -> np.ndarray:
    if deg == 180:
        a = np.linspace(0, 2 * np.pi, n)
        return np.stack([r * np.sin(a), 0.2 * r * (np.cos(a) - 1), np.zeros(n)], 1)
    a = np.linspace(0, np.deg2rad(deg), n)
    return np.stack([r * np.sin(a), 0.2 * r * (np.abs(np.cos(a)) - 1), r - r * np.abs(np.cos(a))], 1)


def ref_world_to_cam(eye: np.ndarray, target: np.ndarray) -> np.ndarray:
    up = np.array([0.0, 1.0, 0.0])
    f = (target - eye) / np.linalg.norm(target - eye)
    right = np.cross(f, up)
    right /= np.linalg.norm(right)
    up2 = np.cross(right, f)
    up2 /= np.linalg.norm(up2)
    rot = np.stack([-right, up2, f])  # the reference's (right', up', f) with x flipped to OpenCV
    e = np.eye(4)
    e[:3, :3] = rot
    e[:3, 3] = -rot @ eye
    return e


def random_depth0(h: int = 24, w: int = 32) -> np.ndarray:
    return RNG.uniform(1.5, 9.0, size=(h, w)).astype(np.float32)


def camera_centres(ext: np.ndarray) -> np.ndarray:
    return np.einsum("nji,nj->ni", ext[:, :3, :3], -ext[:, :3, 3])  # -R^T t


K = cameras.reference_intrinsics(32, 24)


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("deg", [30, 60, 90, 180, 45, 120, 270, -30, 7])
@pytest.mark.parametrize("n", [2, 13, 49])
def test_angle_presets_match_reference_formulas(deg: int, n: int) -> None:
    depth0 = random_depth0()
    r = ref_radius(depth0)
    cam = cameras.preset_path(str(deg), n, K, depth0, 32, 24)
    assert len(cam) == n and cam.extrinsics.shape == (n, 4, 4) and cam.intrinsics.shape == (n, 3, 3)
    assert np.allclose(cam.intrinsics, K)
    eyes = ref_eyes(deg, n, r)
    target = np.array([0.0, 0.0, r])
    expected = np.stack([ref_world_to_cam(e, target) for e in eyes])
    np.testing.assert_allclose(cam.extrinsics, expected, atol=1e-9)
    np.testing.assert_allclose(camera_centres(cam.extrinsics), eyes, atol=1e-9)
    # Every camera looks at the target: it projects to the principal point.
    for e in cam.extrinsics:
        p = K @ (e[:3, :3] @ target + e[:3, 3])
        np.testing.assert_allclose(p[:2] / p[2], K[:2, 2], atol=1e-7)
    # Frame 0 is the source camera (identity) for the angle presets (eye = 0).
    np.testing.assert_allclose(cam.extrinsics[0], np.eye(4), atol=1e-12)


def test_preset_radius_uses_border_ring_and_offset() -> None:
    depth0 = np.full((10, 12), 5.0, np.float32)
    depth0[0, 3] = 0.5  # on the border ring: replaced by 100, must not count
    depth0[4, 5] = 2.0
    assert cameras.preset_radius(depth0) == pytest.approx(2.15)
    assert cameras.preset_radius(depth0) == pytest.approx(ref_radius(depth0))


def test_preset_up_vector_and_no_roll() -> None:
    depth0 = random_depth0()
    cam = cameras.preset_path("90", 9, K, depth0, 32, 24)
    world_up = np.array([0.0, 1.0, 0.0])  # OpenCV world: pointing down the image
    for e in cam.extrinsics:
        rot = e[:3, :3]
        assert abs(rot[0] @ world_up) < 1e-12  # camera x axis stays horizontal (no roll)
        assert rot[1] @ world_up > 0  # world up still points down the image
    # The 90-degree orbit ends a quarter turn round the target: the optical axis' horizontal part is -x
    # (looking left at the target), tilted by atan(0.2) since the eye rose by 0.2 r (y = -0.2 r).
    fwd = cam.extrinsics[-1, 2, :3]
    np.testing.assert_allclose(fwd, np.array([-1.0, 0.2, 0.0]) / np.sqrt(1.04), atol=1e-9)


def test_180_is_a_sideways_sweep() -> None:
    cam = cameras.preset_path("180", 41, K, random_depth0(), 32, 24)
    fwd = cam.extrinsics[:, 2, :3]
    yaw = np.degrees(np.arctan2(fwd[:, 0], fwd[:, 2]))
    assert np.all(np.abs(yaw) < 46.0) and yaw.max() > 40.0 and yaw.min() < -40.0
    assert np.allclose(camera_centres(cam.extrinsics)[:, 2], 0.0)


@pytest.mark.parametrize("name,sign", [("zoom_in", 1.0), ("zoom_out", -1.0)])
def test_zoom_presets_dolly_along_the_axis(name: str, sign: float) -> None:
    depth0 = random_depth0()
    r = ref_radius(depth0)
    n = 7
    cam = cameras.preset_path(name, n, K, depth0, 32, 24)
    assert len(cam) == n
    # Orientation unchanged (the source camera's), centre moves along +z (in) / -z (out) by ZOOM_DISTANCE * r.
    np.testing.assert_allclose(cam.extrinsics[:, :3, :3], np.broadcast_to(np.eye(3), (n, 3, 3)), atol=1e-12)
    expected = np.zeros((n, 3))
    expected[:, 2] = sign * cameras.ZOOM_DISTANCE * r * np.linspace(0, 1, n)
    np.testing.assert_allclose(camera_centres(cam.extrinsics), expected, atol=1e-12)
    assert cameras.ZOOM_DISTANCE * r < r  # zoom_in stops in front of the target


@pytest.mark.parametrize("bad", ["sideways", "", "90deg", "1.5e", "zoom"])
def test_unknown_preset_is_one_clear_error(bad: str) -> None:
    with pytest.raises(Ex4dError) as exc:
        cameras.preset_path(bad, 5, K, random_depth0(), 32, 24)
    assert "preset" in str(exc.value) and exc.value.where == "--cam" and exc.value.hint


def test_preset_needs_a_frame() -> None:
    with pytest.raises(Ex4dError):
        cameras.preset_path("90", 0, K, random_depth0(), 32, 24)


# ----------------------------------------------------------------------------------------------
# look_at
# ----------------------------------------------------------------------------------------------
def test_look_at_is_a_proper_rotation_and_looks_at_the_target() -> None:
    for _ in range(200):
        eye = RNG.normal(size=3) * 3
        target = eye + RNG.normal(size=3) * 2
        e = cameras.look_at(eye, target)
        rot = e[:3, :3]
        np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(rot) == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_allclose(e[3], [0, 0, 0, 1])
        np.testing.assert_allclose(e[:3, :3] @ eye + e[:3, 3], 0.0, atol=1e-9)  # eye -> camera origin
        tc = e[:3, :3] @ target + e[:3, 3]
        np.testing.assert_allclose(tc[:2], 0.0, atol=1e-9)
        assert tc[2] == pytest.approx(np.linalg.norm(target - eye))
        np.testing.assert_allclose(e, ref_world_to_cam(eye, target), atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Blender conversions
# ----------------------------------------------------------------------------------------------
def random_rotation() -> np.ndarray:
    q, r = np.linalg.qr(RNG.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def random_extrinsics(n: int) -> np.ndarray:
    e = np.tile(np.eye(4), (n, 1, 1))
    for i in range(n):
        e[i, :3, :3] = random_rotation()
        e[i, :3, 3] = RNG.normal(size=3) * 4
    return e


def test_source_camera_in_blender_sits_at_origin_looking_along_plus_y_with_z_up() -> None:
    mw = cameras.opencv_to_blender_matrix_world(np.eye(4))
    np.testing.assert_allclose(mw[:3, 3], 0.0, atol=1e-12)
    np.testing.assert_allclose(mw[:3, :3] @ [0, 0, -1], [0, 1, 0], atol=1e-12)  # Blender cameras look down -Z
    np.testing.assert_allclose(mw[:3, :3] @ [0, 1, 0], [0, 0, 1], atol=1e-12)  # their +Y is up
    np.testing.assert_allclose(mw[:3, :3] @ [1, 0, 0], [1, 0, 0], atol=1e-12)


def test_blender_matrix_world_round_trip_and_semantics() -> None:
    ext = random_extrinsics(50)
    mw = cameras.opencv_to_blender_matrix_world(ext)
    np.testing.assert_allclose(cameras.blender_matrix_world_to_opencv(mw), ext, atol=1e-9)
    cv_to_bl = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], float)  # X = x, Y = z, Z = -y
    for e, m in zip(ext, mw, strict=True):
        rot, t = e[:3, :3], e[:3, 3]
        centre_cv = -rot.T @ t
        np.testing.assert_allclose(m[:3, 3], cv_to_bl @ centre_cv, atol=1e-9)
        # Optical axis (OpenCV +z) = Blender camera's local -Z; image down (OpenCV +y) = local -Y.
        np.testing.assert_allclose(m[:3, :3] @ [0, 0, -1], cv_to_bl @ rot.T @ [0, 0, 1], atol=1e-9)
        np.testing.assert_allclose(m[:3, :3] @ [0, -1, 0], cv_to_bl @ rot.T @ [0, 1, 0], atol=1e-9)
    # A scaled camera (or a scaled parent) is still the same camera.
    scaled = mw.copy()
    scaled[:, :3, :3] *= 2.5
    np.testing.assert_allclose(cameras.blender_matrix_world_to_opencv(scaled), ext, atol=1e-9)


def blender_project(
    p_cam_blender: np.ndarray, lens, sensor_w, sensor_h, fit, shift_x, shift_y, width, height
) -> np.ndarray:
    """Pixel (u right, v down, origin at the top-left image corner) of a point in Blender camera space,
    written from Blender's viewplane formula (BKE_camera_params_compute_viewplane): fit AUTO -> horizontal
    when W >= H; sensor size = sensor_height only for VERTICAL fit; shift in units of the fitted side."""
    eff = fit if fit != "AUTO" else ("HORIZONTAL" if width >= height else "VERTICAL")
    viewfac = width if eff == "HORIZONTAL" else height
    sensor = sensor_h if fit == "VERTICAL" else sensor_w
    x, y, z = p_cam_blender
    f_px = lens / sensor * viewfac
    u = f_px * x / -z + width / 2 - shift_x * viewfac
    v_up = f_px * y / -z + height / 2 - shift_y * viewfac
    return np.array([u, height - v_up])


@pytest.mark.parametrize("fit", ["AUTO", "HORIZONTAL", "VERTICAL"])
@pytest.mark.parametrize("size", [(640, 360), (360, 640), (500, 500)])
def test_intrinsics_blender_round_trip_and_projection(fit: str, size: tuple[int, int]) -> None:
    width, height = size
    for _ in range(30):
        f = RNG.uniform(100, 2000)
        cx = width / 2 + RNG.uniform(-0.2, 0.2) * width
        cy = height / 2 + RNG.uniform(-0.2, 0.2) * height
        k = np.array([[f, 0, cx], [0, f, cy], [0, 0, 1.0]])
        sensor_w = RNG.uniform(10, 50)
        bl = cameras.intrinsics_to_blender(k, width, height, sensor_width=sensor_w, sensor_fit=fit)
        k2 = cameras.blender_to_intrinsics(
            bl["lens"],
            width,
            height,
            bl["sensor_width"],
            bl["sensor_height"],
            bl["sensor_fit"],
            bl["shift_x"],
            bl["shift_y"],
        )
        np.testing.assert_allclose(k2, k, rtol=1e-12, atol=1e-9)
        # Independent check: Blender's own projection of random points equals K's projection.
        for _ in range(5):
            p = np.array([RNG.uniform(-1, 1), RNG.uniform(-1, 1), RNG.uniform(1, 5)])  # OpenCV camera
            uv = (k @ p)[:2] / p[2]
            p_bl = np.array([p[0], -p[1], -p[2]])
            got = blender_project(
                p_bl,
                bl["lens"],
                bl["sensor_width"],
                bl["sensor_height"],
                fit,
                bl["shift_x"],
                bl["shift_y"],
                width,
                height,
            )
            np.testing.assert_allclose(got, uv, atol=1e-7)


@pytest.mark.parametrize("fit", ["AUTO", "HORIZONTAL", "VERTICAL"])
@pytest.mark.parametrize("size", [(640, 360), (360, 640)])
def test_blender_to_intrinsics_matches_blender_projection(fit: str, size: tuple[int, int]) -> None:
    width, height = size
    lens, sw, sh, shx, shy = 42.0, 36.0, 24.0, 0.07, -0.11
    k = cameras.blender_to_intrinsics(lens, width, height, sw, sh, fit, shx, shy)
    for _ in range(10):
        p = np.array([RNG.uniform(-1, 1), RNG.uniform(-1, 1), RNG.uniform(1, 5)])
        uv = (k @ p)[:2] / p[2]
        got = blender_project(np.array([p[0], -p[1], -p[2]]), lens, sw, sh, fit, shx, shy, width, height)
        np.testing.assert_allclose(uv, got, atol=1e-7)


def test_camera_path_from_blender_round_trip() -> None:
    ext = random_extrinsics(6)
    width, height = 320, 240
    k = np.array([[400.0, 0, 150.0], [0, 400.0, 130.0], [0, 0, 1]])
    bl = cameras.intrinsics_to_blender(k, width, height, sensor_width=36.0)
    mw = cameras.opencv_to_blender_matrix_world(ext)
    cam = cameras.camera_path_from_blender(
        mw, bl["lens"], width, height, 36.0, 24.0, "AUTO", bl["shift_x"], bl["shift_y"]
    )
    np.testing.assert_allclose(cam.extrinsics, ext, atol=1e-9)
    np.testing.assert_allclose(cam.intrinsics, np.broadcast_to(k, (6, 3, 3)), atol=1e-9)
    with pytest.raises(Ex4dError):
        cameras.camera_path_from_blender(mw[:, :3], 35.0, width, height)
    with pytest.raises(Ex4dError):
        cameras.camera_path_from_blender(mw, -1.0, width, height)
    bad = mw.copy()
    bad[2, 0, 0] = np.nan
    with pytest.raises(Ex4dError):
        cameras.camera_path_from_blender(bad, 35.0, width, height)


def test_non_square_pixels_rejected_for_blender() -> None:
    with pytest.raises(Ex4dError):
        cameras.intrinsics_to_blender(np.array([[500.0, 0, 32], [0, 450.0, 24], [0, 0, 1]]), 64, 48)
    with pytest.raises(Ex4dError):
        cameras.intrinsics_to_blender(K, 32, 24, sensor_fit="DIAGONAL")


# ----------------------------------------------------------------------------------------------
# OpenGL
# ----------------------------------------------------------------------------------------------
def test_opengl_view_round_trip_and_projection_matches_k() -> None:
    width, height = 96, 64
    ext = random_extrinsics(20)
    view = cameras.opencv_to_opengl_view(ext)
    np.testing.assert_allclose(cameras.opengl_view_to_opencv(view), ext, atol=1e-12)
    for e, v in zip(ext, view, strict=True):
        f = RNG.uniform(40, 200)
        k = np.array([[f, 0, RNG.uniform(30, 60)], [0, f * RNG.uniform(0.9, 1.1), RNG.uniform(20, 40)], [0, 0, 1]])
        proj = cameras.projection_matrix(k, width, height)
        for _ in range(10):
            p_cam = np.array([RNG.uniform(-1, 1), RNG.uniform(-1, 1), RNG.uniform(0.5, 50)])
            world = np.linalg.inv(e) @ np.append(p_cam, 1.0)
            uv = (k @ p_cam)[:2] / p_cam[2]
            # OpenGL view space: camera looks down -z, y up.
            pv = v @ world
            np.testing.assert_allclose(pv[:3], [p_cam[0], -p_cam[1], -p_cam[2]], atol=1e-9)
            # projection_matrix takes OpenCV camera coordinates; its rows come out top-down
            clip = proj @ e @ world
            ndc = clip[:3] / clip[3]
            pix = np.array([(ndc[0] + 1) * width / 2, (ndc[1] + 1) * height / 2])
            np.testing.assert_allclose(pix, uv, atol=1e-7)
            # OpenGL depth: near -> -1, far -> +1, here strictly inside
            assert -1 < ndc[2] < 1


def test_projection_depth_range() -> None:
    proj = cameras.projection_matrix(K, 32, 24, near=1e-3, far=1e3)
    for z, expected in [(1e-3, -1.0), (1e3, 1.0)]:
        clip = proj @ np.array([0.0, 0.0, z, 1.0])
        assert clip[2] / clip[3] == pytest.approx(expected, abs=1e-9)


# ----------------------------------------------------------------------------------------------
# Camera files
# ----------------------------------------------------------------------------------------------
def test_camera_file_npz_and_json(tmp_path) -> None:
    ext = random_extrinsics(8)
    k_one = np.array([[300.0, 0, 20], [0, 300.0, 15], [0, 0, 1]])
    k_each = np.stack([k_one * [[1 + i / 10], [1 + i / 10], [1]] for i in range(8)])
    np.savez(tmp_path / "path_a.npz", extrinsics=ext, intrinsics=k_one)
    np.savez(tmp_path / "path_b.npz", extrinsics=ext, intrinsics=k_each)
    (tmp_path / "path_c.json").write_text(json.dumps({"extrinsics": ext.tolist(), "intrinsics": k_each.tolist()}))
    (tmp_path / "path_d.json").write_text(json.dumps({"extrinsics": ext.tolist()}))
    a = cameras.load_camera_file(tmp_path / "path_a.npz", 5, 40, 30)
    assert a.name == "path_a" and len(a) == 5 and (a.width, a.height) == (40, 30)
    np.testing.assert_allclose(a.extrinsics, ext[:5])
    np.testing.assert_allclose(a.intrinsics, np.broadcast_to(k_one, (5, 3, 3)))
    b = cameras.load_camera_file(tmp_path / "path_b.npz", None, 40, 30)
    np.testing.assert_allclose(b.intrinsics, k_each)
    c = cameras.load_camera_file(tmp_path / "path_c.json", 8, 40, 30)
    np.testing.assert_allclose(c.extrinsics, ext)
    np.testing.assert_allclose(c.intrinsics, k_each)
    d = cameras.load_camera_file(tmp_path / "path_d.json", 3, 40, 30, default_k=k_one)
    np.testing.assert_allclose(d.intrinsics, np.broadcast_to(k_one, (3, 3, 3)))
    d2 = cameras.load_camera_file(tmp_path / "path_d.json", 3, 40, 30)
    np.testing.assert_allclose(d2.intrinsics[0], cameras.reference_intrinsics(40, 30))


def test_save_camera_npz_round_trip(tmp_path) -> None:
    ext = random_extrinsics(4)
    cam = cameras.CameraPath(ext, K, 32, 24, name="x")
    out = cameras.save_camera_npz(tmp_path / "camera_x.npz", cam)
    with np.load(out) as z:
        assert z["extrinsics"].shape == (4, 4, 4) and z["intrinsics"].shape == (3, 3)
        np.testing.assert_allclose(z["extrinsics"], ext)
        assert "OpenCV" in str(z["convention"])
    back = cameras.load_camera_file(out, 4, 32, 24)
    np.testing.assert_allclose(back.extrinsics, ext)
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def _bad_camera_files(tmp_path):
    ext = random_extrinsics(4)
    nan = ext.copy()
    nan[1, 0, 3] = np.nan
    skew = ext.copy()
    skew[0, :3, :3] *= 1.5
    lastrow = ext.copy()
    lastrow[2, 3] = [0, 0, 1, 1]
    cases = {
        "shape_34.npz": dict(extrinsics=ext[:, :3, :]),
        "single_44.npz": dict(extrinsics=ext[0]),
        "k_shape.npz": dict(extrinsics=ext, intrinsics=np.eye(4)),
        "k_count.npz": dict(extrinsics=ext, intrinsics=np.stack([K] * 3)),
        "nan.npz": dict(extrinsics=nan),
        "nan_k.npz": dict(extrinsics=ext, intrinsics=np.full((3, 3), np.nan)),
        "not_rigid.npz": dict(extrinsics=skew),
        "last_row.npz": dict(extrinsics=lastrow),
        "no_extrinsics.npz": dict(poses=ext),
    }
    for name, arrays in cases.items():
        np.savez(tmp_path / name, **arrays)
    (tmp_path / "ragged.json").write_text('{"extrinsics": [[[1, 0, 0, 0], [0, 1, 0]]]}')
    (tmp_path / "broken.json").write_text('{"extrinsics": [[[1, 0')
    (tmp_path / "a_list.json").write_text(json.dumps(ext.tolist()))
    (tmp_path / "too_few.json").write_text(json.dumps({"extrinsics": ext[:2].tolist()}))
    (tmp_path / "cam.txt").write_text("1 0 0 0")
    good = tmp_path / "truncated.npz"
    np.savez(good, extrinsics=ext)
    good.write_bytes(good.read_bytes()[:100])
    (tmp_path / "garbage.npz").write_bytes(b"\x00not a numpy file" * 10)
    return sorted(p for p in tmp_path.iterdir())


def test_bad_camera_files_give_one_clear_error(tmp_path) -> None:
    files = _bad_camera_files(tmp_path)
    assert len(files) == 16
    for f in files:
        with pytest.raises(Ex4dError) as exc:
            cameras.load_camera_file(f, 3, 32, 24)
        assert exc.value.where == str(f), f
        assert len(str(exc.value).splitlines()) == 1
    with pytest.raises(Ex4dError) as exc:
        cameras.load_camera_file(tmp_path / "missing.npz", 3, 32, 24)
    assert exc.value.code == "not_found"
