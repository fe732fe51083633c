"""Stereo and EXR results through a real ``ex4d serve`` (issue 18), on an analytic scene: two textured
fronto-parallel planes (left half at Z_NEAR, right half at Z_FAR) filmed by a static camera, its exact
depth as the depth file. Ground truth: Blender's off-axis disparity fx b (1/Z - 1/C) (the formula,
written here), the planes' depths for Z, the guide's own mask PNGs for the EXR alpha."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import service_fixtures as sf

from ex4d_backend.cameras import CV_TO_BLENDER
from ex4d_backend.footage import write_png_sequence
from ex4d_backend.passes import read_exr_channels, srgb_to_linear
from ex4d_backend.pipeline import guide_files
from ex4d_backend.stereo import side_by_side

W, H, T, FX = 192, 128, 3, 200.0
B, C = 0.2, 8.0  # interocular and convergence (scene units)
Z_NEAR, Z_FAR = 4.0, 6.0
EDGE = W // 2  # the planes meet at this column of the source image
FLIP_YZ = np.diag([1.0, -1.0, -1.0, 1.0])


def _texture() -> np.ndarray:
    rng = np.random.default_rng(0)
    cols = np.convolve(rng.random(W + 16), np.ones(3) / 3, "same")[8 : W + 8]
    rows = np.convolve(rng.random(H + 16), np.ones(3) / 3, "same")[8 : H + 8]
    return np.clip(40 + 150 * cols[None, :] + 60 * rows[:, None], 0, 255)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("stereo")
    tex = _texture()
    frames = np.repeat(np.repeat(tex[None, :, :, None], 3, -1), T, 0).astype(np.uint8)
    depth = np.full((T, H, W), Z_NEAR, np.float32)
    depth[:, :, EDGE:] = Z_FAR
    write_png_sequence(root / "data" / "clip", frames)
    np.save(root / "data" / "depth.npy", depth)
    client = sf.start_client(root / "store", [root / "data"])
    mw = CV_TO_BLENDER @ FLIP_YZ  # the source camera (at the origin) in Blender's world
    params = {
        "footage": str(root / "data" / "clip"),
        "depth": {"model": "file", "path": str(root / "data" / "depth.npy")},
        "focal_px": FX,
        "renderer": "cpu",
        "camera": {
            "blender": {
                "matrix_world": [mw.tolist()] * T,
                "lens": FX * 36.0 / W,
                "sensor_width": 36.0,
                "resolution": [W, H],
            }
        },  # fmt: skip
        "stereo": {"interocular": B, "convergence": C, "mode": "OFFAXIS", "pivot": "CENTER"},
    }
    yield client, params
    client.close()


def read_png_folder(folder, channels: int) -> np.ndarray:
    return guide_files.read_png_folder(Path(folder), channels)


def expected_offaxis(z: float) -> float:
    """Blender's off-axis pair: u_left - u_right = fx b (1/Z - 1/C)."""
    return FX * B * (1.0 / z - 1.0 / C)


def disparity(left: np.ndarray, right: np.ndarray, lm: np.ndarray, rm: np.ndarray, cols: slice) -> float:
    """d with L(u) = R(u - d) over ``cols`` of the left image: integer SSD search + parabolic refinement."""
    ds = np.arange(-15, 16)
    err = []
    for d in ds:
        b, mb = np.roll(right, d, 1)[:, cols], np.roll(rm, d, 1)[:, cols]
        sel = lm[:, cols] & mb
        err.append(np.mean((left[:, cols][sel] - b[sel]) ** 2) if sel.sum() > 200 else np.inf)
    err = np.array(err)
    i = int(np.argmin(err))
    e0, e1, e2 = err[i - 1], err[i], err[i + 1]
    return float(ds[i] + 0.5 * (e0 - e2) / (e0 - 2 * e1 + e2))


@pytest.mark.slow
def test_render_guide_stereo_disparity_and_exr(env):
    """Catches: eyes swapped (sign), the interocular or the off-axis shift lost in the protocol path
    (convergence ignored: PARALLEL's fx b / Z instead), frame 0 replaced by the source frame in an eye (zero
    disparity there), the EXR alpha not being the guide mask, Z not the novel camera's depth (e.g. the source
    depth map's per-pixel values resampled, or 1e10 where the mesh is), the side-by-side halves swapped."""
    client, params = env
    req, _ = sf.run(client, "render_guide", {**params, "exr": True})
    r = req.raise_for_error()
    assert set(r["eyes"]) == {"left", "right"} and r["left_color_dir"] == r["eyes"]["left"]["color_dir"]
    lc = read_png_folder(r["left_color_dir"], 3)[..., 0].astype(float)
    rc = read_png_folder(r["right_color_dir"], 3)[..., 0].astype(float)
    lm = read_png_folder(r["left_mask_dir"], 1) > 0
    rm = read_png_folder(r["right_mask_dir"], 1) > 0
    near, far = slice(25, EDGE - 20), slice(EDGE + 20, W - 25)
    for t in range(T):
        for cols, z in ((near, Z_NEAR), (far, Z_FAR)):
            got = disparity(lc[t], rc[t], lm[t], rm[t], cols)
            assert abs(got - expected_offaxis(z)) < 0.2, (t, z, got, expected_offaxis(z))
    # EXR passes of each eye: A is the guide mask, Z the plane's depth (the eyes are translated along x only)
    for eye in ("left", "right"):
        mask = read_png_folder(r[f"{eye}_mask_dir"], 1)
        colour = read_png_folder(r[f"{eye}_color_dir"], 3)
        exrs = sorted(Path(r[f"{eye}_exr_dir"]).glob("frame_*.exr"))
        assert len(exrs) == T
        for t, f in enumerate(exrs):
            ch = read_exr_channels(f)
            assert set(ch) == {"R", "G", "B", "A", "Z"} and ch["Z"].dtype == np.float32
            np.testing.assert_array_equal(ch["A"] > 0.5, mask[t] > 127)
            lin = srgb_to_linear(colour[t, ..., 0] / 255.0)
            assert np.abs(ch["R"].astype(float) - lin).max() < 2e-3  # half float
            z = ch["Z"]
            np.testing.assert_allclose(z[10:-10, near], Z_NEAR, rtol=1e-4)
            np.testing.assert_allclose(z[10:-10, far], Z_FAR, rtol=1e-4)
            step = (slice(10, -10), slice(EDGE - 15, EDGE + 15))
            hole = mask[t][step] == 0
            assert hole.sum() >= H - 20  # the step's disocclusion is masked (A = 0), every row ...
            zs = z[step][hole]  # ... and holds the occlusion sheet's depth, between the planes
            assert ((zs >= Z_NEAR - 1e-3) & (zs <= Z_FAR + 1e-3)).all(), zs.max()
    centre = sorted(Path(r["exr_dir"]).glob("frame_*.exr"))
    assert len(centre) == T
    sbs = read_png_folder(r["sbs_dir"], 3)
    want = side_by_side(read_png_folder(r["left_color_dir"], 3), read_png_folder(r["right_color_dir"], 3))
    np.testing.assert_array_equal(sbs, want)


@pytest.mark.slow
def test_generate_both_eyes_and_one_eye(env):
    """Generate with stereo (preview generator): both eyes, the side-by-side is exactly left | right, the
    result EXR holds the generated colour with the guide mask resized; ``eye: right`` alone gives the same
    right-eye frames (the same stage entry); ``eye`` without ``stereo`` is one clear error."""
    client, params = env
    gen = {
        **params,
        "generator": "preview",
        "width": 96,
        "height": 64,
        "num_frames": 5,
        "frame_sampling": "reference",
        "exr": True,
    }
    req, _ = sf.run(client, "generate", gen)
    r = req.raise_for_error()
    left, right = read_png_folder(r["left_frames_dir"], 3), read_png_folder(r["right_frames_dir"], 3)
    assert left.shape == (5, 64, 96, 3) and not np.array_equal(left, right)
    np.testing.assert_array_equal(read_png_folder(r["sbs_dir"], 3), side_by_side(left, right))
    ch = read_exr_channels(sorted(Path(r["right_exr_dir"]).glob("*.exr"))[1])
    assert ch["Z"].shape == (64, 96)
    np.testing.assert_allclose(ch["R"].astype(float), srgb_to_linear(right[1, ..., 0] / 255.0), atol=2e-3)
    src_t = r["eyes"]["right"]["source_frames"][1]  # the guide frame generated frame 1 was made from
    mask = read_png_folder(r["eyes"]["right"]["guide_dir"] + "/mask", 1)[src_t]
    rows = np.minimum(((np.arange(64) + 0.5) * H / 64).astype(int), H - 1)
    cols = np.minimum(((np.arange(96) + 0.5) * W / 96).astype(int), W - 1)
    np.testing.assert_array_equal(ch["A"] > 0.5, mask[rows][:, cols] > 127)
    req2, _ = sf.run(client, "generate", {**gen, "eye": "right"})
    r2 = req2.raise_for_error()
    assert r2["eye"] == "right" and r2["cached"]["generate"] is True
    np.testing.assert_array_equal(read_png_folder(r2["frames_dir"], 3), right)
    bad = {k: v for k, v in gen.items() if k != "stereo"}
    req3, _ = sf.run(client, "generate", {**bad, "eye": "left"})
    assert req3.error["code"] == "invalid_request" and "stereo" in req3.error["message"], req3.error


def test_side_by_side_is_left_then_right() -> None:
    """Pure: the left eye fills the left half (catches swapped halves, a cross-eyed layout, a stack along
    rows); eyes of different sizes are one clear error."""
    from ex4d_backend.errors import Ex4dError

    left = np.zeros((2, 4, 5, 3), np.uint8)
    right = np.full((2, 4, 5, 3), 200, np.uint8)
    sbs = side_by_side(left, right)
    assert sbs.shape == (2, 4, 10, 3) and (sbs[:, :, :5] == 0).all() and (sbs[:, :, 5:] == 200).all()
    with pytest.raises(Ex4dError):
        side_by_side(left, right[:, :, :4])


@pytest.mark.slow
def test_second_eye_reuses_the_first_eyes_result(env):
    """``second_eye: reuse_first``: where the right guide is unseen but the left eye's result (warped by
    its Z pass) lands, the right result holds the left's content, so the eyes agree there. Measured on the
    two planes with the novel pair moved right of the source (both eyes see a disocclusion right of the
    near plane's edge): the mismatch |R - warp(L)| over those pixels, independent vs reused. With the
    preview generator (which keeps seen guide pixels) this checks the mechanism; the model's own consistency
    needs the GPU benchmark (``benchmarks/bench_stereo_reuse.py``). Catches: the warp going the wrong way
    (eyes swapped: no overlap with the hole), Z in the wrong units, the reuse not reaching the generator."""
    from ex4d_backend.pipeline.stereo_stage import warp_to_eye

    client, params = env
    tx = 0.6
    mw = CV_TO_BLENDER @ FLIP_YZ
    mw[:3, 3] = CV_TO_BLENDER[:3, :3] @ np.array([tx, 0.0, 0.0])
    cam = {"blender": {**params["camera"]["blender"], "matrix_world": [mw.tolist()] * T}}
    base = {
        **params,
        "camera": cam,
        "generator": "preview",
        "width": W,
        "height": H,
        "num_frames": 5,
        "frame_sampling": "reference",
    }
    out = {}
    for mode in ("independent", "reuse_first"):
        req, _ = sf.run(client, "generate", {**base, "stereo": {**params["stereo"], "second_eye": mode}, "exr": True})
        r = req.raise_for_error()
        left, right = read_png_folder(r["left_frames_dir"], 3), read_png_folder(r["right_frames_dir"], 3)
        lz = np.stack([read_exr_channels(f)["Z"] for f in sorted(Path(r["left_exr_dir"]).glob("*.exr"))])
        with (
            np.load(Path(r["eyes"]["left"]["guide_dir"]) / "camera.npz") as lc,
            np.load(Path(r["eyes"]["right"]["guide_dir"]) / "camera.npz") as rc,
        ):
            lk, le, rk, re_ = (np.broadcast_to(a, (T, *a.shape[-2:])) for a in
                               (lc["intrinsics"], lc["extrinsics"], rc["intrinsics"], rc["extrinsics"]))  # fmt: skip
        if mode == "independent":  # the right eye's own guide (reuse_first reports its filled copy)
            rmask = read_png_folder(Path(r["eyes"]["right"]["guide_dir"]) / "mask", 1)
        errs, n = [], 0
        for j, t in enumerate(r["source_frames"]):
            warped, hit = warp_to_eye(left[j], lz[j], lk[t], le[t], rk[t], re_[t])
            sel = hit & (rmask[t] == 0)
            sel[:, :25] = sel[:, -25:] = False  # away from the border ring ...
            sel[:40] = False  # ... and from the preview's label (top rows)
            n += int(sel.sum())
            errs.append(np.abs(right[j].astype(float) - warped)[sel])
        out[mode] = (float(np.concatenate(errs).mean()), n)
    print("\nsecond eye |R - warp(L)| on the shared disocclusion:", out)
    assert out["independent"][1] > 100  # there is a region both eyes invent
    assert out["reuse_first"][0] < 0.4 * out["independent"][0], out


def test_warp_to_eye_moves_a_plane_by_its_disparity() -> None:
    """Pure: a fronto-parallel plane at depth Z seen by a camera, warped into one translated by +b along x,
    moves by -fx b / Z pixels (the pinhole formula, written here); the nearer of two points landing on one
    pixel wins. Catches the transform inverted (moves the wrong way), pixel centres off by half a pixel,
    a z-buffer keeping the far point."""
    from ex4d_backend.pipeline.stereo_stage import warp_to_eye

    h, w, z, b = 20, 60, 5.0, 0.25  # fx b / z = 200 * 0.25 / 5 = 10 px
    k = np.array([[FX, 0, w / 2], [0, FX, h / 2], [0, 0, 1.0]])
    colour = np.zeros((h, w, 3), np.uint8)
    colour[..., 0] = np.arange(w)[None, :]  # the column index as colour
    e_to = np.eye(4)
    e_to[0, 3] = -b  # world-to-camera of a camera at x = +b
    out, hit = warp_to_eye(colour, np.full((h, w), z, np.float32), k, np.eye(4), k, e_to)
    shift = FX * b / z
    cols = np.arange(w)
    src = cols + int(shift)  # the point of source column c lands on column c - shift
    ok = src < w
    assert hit[:, cols[ok]].all() and not hit[:, cols[~ok]].any()
    np.testing.assert_array_equal(out[5, cols[ok], 0], src[ok])
    z2 = np.full((h, w), z, np.float32)
    z2[:, 40] = 2.5  # a nearer point at column 40 lands at 40 - 20 = 20 over the far point of column 30
    out2, _ = warp_to_eye(colour, z2, k, np.eye(4), k, e_to)
    assert out2[5, 20, 0] == 40
