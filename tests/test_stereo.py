"""Stereo pairs (issue 18) with Blender's conventions: eye placement against Blender's formulas, and the
disparity measured between left/right guides of an analytic textured plane against fx b (1/Z - 1/C)."""

from __future__ import annotations

import numpy as np
import pytest

from ex4d_backend import dwmesh, render, stereo
from ex4d_backend.camera_paths import invert_rigid
from ex4d_backend.cameras import CameraPath, opencv_to_blender_matrix_world

W, H, FX = 192, 128, 200.0
K = np.array([[FX, 0, W / 2], [0, FX, H / 2], [0, 0, 1]])
B, C = 0.2, 8.0


def plane_guides(z: float, mode: str, pivot: str = "CENTER"):
    """Left/right guides of a fronto-parallel plane at depth ``z`` with a smooth random texture."""
    rng = np.random.default_rng(0)
    cols = np.convolve(rng.random(W + 16), np.ones(3) / 3, "same")[8 : W + 8]
    rows = np.convolve(rng.random(H + 16), np.ones(3) / 3, "same")[8 : H + 8]
    tex = np.clip(40 + 150 * cols[None, :] + 60 * rows[:, None], 0, 255)
    frames = np.repeat(tex[None, :, :, None], 3, -1).astype(np.uint8)
    depth = np.full((1, H, W), z, np.float32)
    mesh = dwmesh.build_dwmesh(depth, K, frames)
    centre = CameraPath(np.eye(4)[None], K, W, H, "c")
    left, right = stereo.eye_cameras(centre, B, C, mode, pivot)
    gl = render.render_guide(mesh, left, frames, renderer="cpu")
    gr = render.render_guide(mesh, right, frames, renderer="cpu")
    return gl, gr


def measured_disparity(gl, gr) -> float:
    """d with L(u) = R(u - d) (u_left - u_right): integer SSD search, parabolic sub-pixel refinement."""
    lc, lm = gl[0][0, ..., 0].astype(float), gl[1][0] > 0
    rc, rm = gr[0][0, ..., 0].astype(float), gr[1][0] > 0
    ds = np.arange(-20, 21)
    err = []
    for d in ds:
        a, ma = lc[:, 30:-30], lm[:, 30:-30]
        b = np.roll(rc, d, 1)[:, 30:-30]
        mb = np.roll(rm, d, 1)[:, 30:-30]
        sel = ma & mb
        err.append(np.mean((a[sel] - b[sel]) ** 2) if sel.any() else np.inf)
    err = np.array(err)
    i = int(np.argmin(err))
    e0, e1, e2 = err[i - 1], err[i], err[i + 1]
    return float(ds[i] + 0.5 * (e0 - e2) / (e0 - 2 * e1 + e2))


@pytest.mark.parametrize(
    "mode,z",
    [("OFFAXIS", 4.0), ("OFFAXIS", C), ("PARALLEL", 4.0)],
)
def test_plane_disparity_matches_the_interocular(mode, z) -> None:
    """Catches eyes swapped (negative disparity), the shift's sign or size (zero parallax not at C), the
    interocular halved or doubled."""
    gl, gr = plane_guides(z, mode)
    want = stereo.expected_disparity(FX, B, C, z, mode)
    assert abs(measured_disparity(gl, gr) - want) < 0.15, (measured_disparity(gl, gr), want)


def test_toe_in_converges_on_the_centre_line() -> None:
    """TOE / CENTER: each eye's optical axis passes through (0, 0, C) of the centre camera; a plane at C has
    (near) zero disparity at the image centre."""
    left, right = stereo.eye_cameras(CameraPath(np.eye(4)[None], K, W, H), B, C, "TOE", "CENTER")
    for eye, x in ((left, -B / 2), (right, B / 2)):
        c2w = invert_rigid(eye.extrinsics[0])
        np.testing.assert_allclose(c2w[:3, 3], [x, 0, 0], atol=1e-12)
        hit = c2w[:3, 3] + c2w[:3, 2] * (C / c2w[2, 2])  # along the eye's +z (OpenCV forward) to z = C
        np.testing.assert_allclose(hit, [0, 0, C], atol=1e-9)
    gl, gr = plane_guides(C, "TOE")
    assert abs(measured_disparity(gl, gr)) < 0.3


def test_eye_positions_follow_blender() -> None:
    """Blender's model matrices, written out: CENTER eyes at -+b/2 along the camera's x (Blender axes), LEFT
    pivot keeps the left eye and moves the right one by b; off-axis shifts cx by -+fx b / (2 C)."""
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))
    e = np.eye(4)
    e[:3, :3], e[:3, 3] = q, rng.normal(size=3)
    centre = CameraPath(e[None], K, W, H)
    mw = opencv_to_blender_matrix_world(e)
    for pivot, xl, xr in (("CENTER", -B / 2, B / 2), ("LEFT", 0.0, B), ("RIGHT", -B, 0.0)):
        left, right = stereo.eye_cameras(centre, B, C, "OFFAXIS", pivot)
        for eye, x in ((left, xl), (right, xr)):
            want = mw @ np.array([x, 0, 0, 1.0])  # Blender: translate_m4(modelmat, x, 0, 0)
            got = opencv_to_blender_matrix_world(eye.extrinsics[0])
            np.testing.assert_allclose(got[:, 3], want, atol=1e-12)
            np.testing.assert_allclose(got[:3, :3], mw[:3, :3], atol=1e-12)
    left, right = stereo.eye_cameras(centre, B, C, "OFFAXIS", "CENTER")
    assert left.intrinsics[0, 0, 2] == pytest.approx(W / 2 - FX * B / (2 * C))
    assert right.intrinsics[0, 0, 2] == pytest.approx(W / 2 + FX * B / (2 * C))


def test_cli_stereo_writes_both_eyes(tmp_path) -> None:
    """``ex4d recon --stereo IOD:CONV`` writes <cam>_left / <cam>_right guides and cameras whose centres are
    the centre camera's -+ IOD/2 along its x axis; a bad spec is one clear error."""
    from ex4d_backend import cli
    from ex4d_backend.footage import write_png_sequence

    frames = np.full((3, H, W, 3), 128, np.uint8)
    write_png_sequence(tmp_path / "in", frames)
    np.save(tmp_path / "d.npy", np.full((3, H, W), 4.0, np.float32))
    out = tmp_path / "out"
    args = ["recon", "--input", str(tmp_path / "in"), "--depth", str(tmp_path / "d.npy"), "--cam", "30",
            "--output-dir", str(out), "--renderer", "cpu", "--fx", str(FX), "--fps", "24"]  # fmt: skip
    assert cli.main(args + ["--stereo", f"{B}:{C}"]) == 0
    with (
        np.load(out / "camera_30.npz") as c,
        np.load(out / "camera_30_left.npz") as lf,
        np.load(out / "camera_30_right.npz") as rt,
    ):
        for eye, x in ((lf, -B / 2), (rt, B / 2)):
            rel = eye["extrinsics"] @ invert_rigid(c["extrinsics"])  # centre camera -> eye camera
            np.testing.assert_allclose(invert_rigid(rel)[:, :3, 3], np.broadcast_to([x, 0, 0], (3, 3)), atol=1e-9)
    assert (out / "color_30_left.mp4").is_file() and (out / "mask_30_right.mp4").is_file()
    for bad in ("wide", "0.1:2:SIDEWAYS", "-1"):
        assert cli.main(args + ["--output-dir", str(tmp_path / "bad"), "--stereo", bad]) == 2
    assert not (tmp_path / "bad").exists()
