"""Depth files: round trips for every accepted format, the reference disparity mapping, resampling,
validation and repair."""

from __future__ import annotations

import numpy as np
import pytest

from ex4d_backend import depth_io
from ex4d_backend.errors import Ex4dError

T, H, W = 4, 12, 16
RNG = np.random.default_rng(11)


def write_exr(path, channels: dict[str, np.ndarray]) -> None:
    import OpenEXR

    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    with OpenEXR.File(header, {k: np.ascontiguousarray(v, np.float32) for k, v in channels.items()}) as f:
        f.write(str(path))


def write_png16(path, arr: np.ndarray) -> None:
    import cv2

    assert cv2.imwrite(str(path), arr.astype(np.uint16))


def ref_disparity_to_depth(disp: np.ndarray) -> np.ndarray:
    """EX4D_REFERENCE.md: d = min-max normalised over the clip; depth = 10000 / (3900 * max(d, 1e-5 / 3900)),
    clipped to [1e-4, 1e4]."""
    d = (disp - disp.min()) / (disp.max() - disp.min())
    return np.clip(10000 / (3900 * np.maximum(d, 1e-5 / 3900)), 1e-4, 1e4)


def random_depth(t=T, h=H, w=W) -> np.ndarray:
    return RNG.uniform(0.5, 20.0, (t, h, w)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# round trips
# ----------------------------------------------------------------------------------------------
def test_npy_round_trip(tmp_path) -> None:
    d = random_depth()
    np.save(tmp_path / "d.npy", d)
    np.testing.assert_array_equal(depth_io.load_depth(tmp_path / "d.npy", size=(W, H), n_frames=T), d)
    np.save(tmp_path / "d64.npy", d.astype(np.float64))  # any float dtype
    out = depth_io.load_depth(tmp_path / "d64.npy")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, d)


@pytest.mark.parametrize("key", ["depth", "disparity", "arr_0", "anything"])
def test_npz_round_trip(tmp_path, key: str) -> None:
    d = random_depth()
    np.savez_compressed(tmp_path / "d.npz", **{key: d})
    np.testing.assert_array_equal(depth_io.load_depth(tmp_path / "d.npz", n_frames=T), d)


def test_npz_prefers_depth_key_and_rejects_ambiguous(tmp_path) -> None:
    d = random_depth()
    np.savez(tmp_path / "a.npz", other=d * 2, depth=d)
    np.testing.assert_array_equal(depth_io.load_depth(tmp_path / "a.npz"), d)
    np.savez(tmp_path / "b.npz", first=d, second=d)
    with pytest.raises(Ex4dError) as exc:
        depth_io.load_depth(tmp_path / "b.npz")
    assert "first" in str(exc.value) and exc.value.where == str(tmp_path / "b.npz")


def test_shapes_2d_and_trailing_channel(tmp_path) -> None:
    d = random_depth()
    np.save(tmp_path / "one.npy", d[0])
    np.testing.assert_array_equal(depth_io.load_depth(tmp_path / "one.npy"), d[:1])
    np.save(tmp_path / "c1.npy", d[..., None])
    np.testing.assert_array_equal(depth_io.load_depth(tmp_path / "c1.npy"), d)
    np.save(tmp_path / "c3.npy", np.repeat(d[..., None], 3, -1))
    with pytest.raises(Ex4dError):
        depth_io.load_depth(tmp_path / "c3.npy")


@pytest.mark.parametrize("channel", ["Z", "R", "depth"])
def test_exr_folder_round_trip(tmp_path, channel: str) -> None:
    d = random_depth()
    for t in range(T):  # natural order: frame_2 before frame_10
        write_exr(tmp_path / f"frame_{t * 4}.exr", {channel: d[t]})
    np.testing.assert_array_equal(depth_io.load_depth(tmp_path, n_frames=T), d)


def test_exr_rgb_takes_first_channel(tmp_path) -> None:
    d = random_depth()
    for t in range(T):
        write_exr(tmp_path / f"{t:03d}.exr", {"RGB": np.stack([d[t], d[t] * 2, d[t] * 3], -1)})
    np.testing.assert_array_equal(depth_io.load_depth(tmp_path), d)


def test_png16_folder_round_trip_with_scale(tmp_path) -> None:
    mm = RNG.integers(500, 60000, (T, H, W))
    for t in range(T):
        write_png16(tmp_path / f"depth_{t + 1}.png", mm[t])
    got = depth_io.load_depth(tmp_path, n_frames=T, scale=0.001)
    np.testing.assert_allclose(got, (mm * 0.001).astype(np.float32), rtol=1e-6)


def test_png8_and_empty_folder_are_rejected(tmp_path) -> None:
    import cv2

    (tmp_path / "empty").mkdir()
    with pytest.raises(Ex4dError) as exc:
        depth_io.load_depth(tmp_path / "empty")
    assert exc.value.where == str(tmp_path / "empty")
    (tmp_path / "png8").mkdir()
    cv2.imwrite(str(tmp_path / "png8" / "0.png"), np.full((H, W), 7, np.uint8))
    with pytest.raises(Ex4dError) as exc:
        depth_io.load_depth(tmp_path / "png8")
    assert "16-bit" in str(exc.value)


def test_mixed_frame_sizes_rejected(tmp_path) -> None:
    write_exr(tmp_path / "0.exr", {"Z": np.ones((H, W))})
    write_exr(tmp_path / "1.exr", {"Z": np.ones((H, W + 2))})
    with pytest.raises(Ex4dError):
        depth_io.load_depth(tmp_path)


def test_missing_and_corrupt_files(tmp_path) -> None:
    with pytest.raises(Ex4dError) as exc:
        depth_io.load_depth(tmp_path / "nope.npy")
    assert exc.value.code == "not_found"
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 truncated")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "str.npy", np.array([["a", "b"], ["c", "d"]]))
    for name in ("bad.npy", "bad.npz", "obj.npy", "str.npy"):
        with pytest.raises(Ex4dError) as exc:
            depth_io.load_depth(tmp_path / name)
        assert exc.value.where == str(tmp_path / name), name
    (tmp_path / "exr").mkdir()
    (tmp_path / "exr" / "0.exr").write_bytes(b"not an exr at all")
    with pytest.raises(Ex4dError):
        depth_io.load_depth(tmp_path / "exr")


# ----------------------------------------------------------------------------------------------
# depth vs disparity
# ----------------------------------------------------------------------------------------------
def test_disparity_uses_the_reference_formula(tmp_path) -> None:
    disp = RNG.uniform(-3.0, 40.0, (T, H, W)).astype(np.float32)
    disp[1, 2, 3] = disp.min() - 1.0  # the clip minimum: d = 0 -> clipped to the far limit
    np.save(tmp_path / "disp.npy", disp)
    got = depth_io.load_depth(tmp_path / "disp.npy", kind="disparity")
    expected = ref_disparity_to_depth(disp.astype(np.float64))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got.min() == pytest.approx(10000 / 3900, rel=1e-6)  # nearest surface about 2.56 units away
    assert got[1, 2, 3] == pytest.approx(1e4)
    np.testing.assert_allclose(depth_io.disparity_to_depth(disp), expected, rtol=1e-6)
    # min-max over the CLIP, not per frame: a frame whose disparity only reaches half the clip's range
    # stays twice as far away
    two = np.stack([np.linspace(0, 0.5, H * W).reshape(H, W), np.linspace(0, 1, H * W).reshape(H, W)])
    depth2 = depth_io.disparity_to_depth(two)
    assert depth2[0].min() == pytest.approx(2 * 10000 / 3900, rel=1e-5)
    assert depth2[1].min() == pytest.approx(10000 / 3900, rel=1e-5)


def test_disparity_affine_invariant() -> None:
    disp = RNG.uniform(0.1, 1.0, (T, H, W))
    np.testing.assert_allclose(
        depth_io.disparity_to_depth(disp), depth_io.disparity_to_depth(disp * 7.5 + 3.0), rtol=1e-5
    )


def test_depth_is_clipped_like_the_reference(tmp_path) -> None:
    d = random_depth()
    d[0, 0, 0] = 5e4
    d[0, 0, 1] = 1e-6
    np.save(tmp_path / "d.npy", d)
    got = depth_io.load_depth(tmp_path / "d.npy")
    assert got[0, 0, 0] == pytest.approx(1e4) and got[0, 0, 1] == pytest.approx(1e-4)


def test_unknown_kind_and_bad_scale(tmp_path) -> None:
    np.save(tmp_path / "d.npy", random_depth())
    with pytest.raises(Ex4dError):
        depth_io.load_depth(tmp_path / "d.npy", kind="inverse")
    for scale in (0.0, -1.0, float("nan")):
        with pytest.raises(Ex4dError):
            depth_io.load_depth(tmp_path / "d.npy", scale=scale)


# ----------------------------------------------------------------------------------------------
# size and frame count
# ----------------------------------------------------------------------------------------------
def test_resample_to_footage_size(tmp_path) -> None:
    # 2x2 blocks at twice the size: area resampling gives the block values exactly
    small = random_depth()
    big = np.repeat(np.repeat(small, 2, 1), 2, 2)
    np.save(tmp_path / "big.npy", big)
    np.testing.assert_allclose(depth_io.load_depth(tmp_path / "big.npy", size=(W, H), n_frames=T), small, rtol=1e-6)
    # upsampling a constant-per-frame depth keeps it constant
    const = np.broadcast_to(np.arange(1, T + 1, dtype=np.float32)[:, None, None], (T, H // 2, W // 2))
    np.save(tmp_path / "small.npy", np.ascontiguousarray(const))
    up = depth_io.load_depth(tmp_path / "small.npy", size=(W, H))
    assert up.shape == (T, H, W)
    np.testing.assert_allclose(up, np.broadcast_to(const[:, :1, :1], (T, H, W)), rtol=1e-6)
    # an aspect ratio within 2 % is accepted (rounding of even sizes), beyond it is not
    np.save(tmp_path / "near.npy", random_depth(T, 12, 16))  # 4:3 vs 100x74 (1.35 % off)
    assert depth_io.load_depth(tmp_path / "near.npy", size=(100, 74)).shape == (T, 74, 100)
    with pytest.raises(Ex4dError):
        depth_io.load_depth(tmp_path / "near.npy", size=(100, 72))  # 3.7 % off


@pytest.mark.parametrize("shape", [(T, H, W + 4), (T, H + 4, W), (T, W, H)])
def test_wrong_aspect_is_rejected(tmp_path, shape) -> None:
    np.save(tmp_path / "d.npy", RNG.uniform(1, 2, shape).astype(np.float32))
    with pytest.raises(Ex4dError) as exc:
        depth_io.load_depth(tmp_path / "d.npy", size=(W, H), n_frames=T)
    assert "aspect" in str(exc.value) and exc.value.hint


def test_frame_count(tmp_path) -> None:
    d = random_depth(10)
    np.save(tmp_path / "d.npy", d)
    # the footage's first 4 of 10 frames are used: a depth file for the whole clip is fine
    np.testing.assert_array_equal(depth_io.load_depth(tmp_path / "d.npy", n_frames=4, total_frames=10), d[:4])
    np.testing.assert_array_equal(depth_io.load_depth(tmp_path / "d.npy", n_frames=10), d)
    for n, total in ((4, None), (4, 12), (11, 11), (12, None)):
        with pytest.raises(Ex4dError) as exc:
            depth_io.load_depth(tmp_path / "d.npy", n_frames=n, total_frames=total)
        assert "frames" in str(exc.value) and exc.value.hint


# ----------------------------------------------------------------------------------------------
# NaN / inf / non-positive
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 0.0, -2.0])
def test_bad_values_are_rejected_with_frame_and_hint(tmp_path, bad: float) -> None:
    d = random_depth()
    d[2, 5, 6] = bad
    np.save(tmp_path / "d.npy", d)
    with pytest.raises(Ex4dError) as exc:
        depth_io.load_depth(tmp_path / "d.npy", n_frames=T)
    msg = str(exc.value)
    assert "frame 2" in msg and "--repair-depth" in msg and len(msg.splitlines()) == 1


@pytest.mark.parametrize("bad", [np.nan, np.inf, 0.0, -2.0])
def test_repair_fills_from_neighbours(tmp_path, bad: float) -> None:
    d = np.full((T, H, W), 5.0, np.float32)
    d[:, :, W // 2 :] = 9.0
    holes = np.zeros_like(d, bool)
    holes[1, 3:5, 2:4] = True  # inside the 5.0 region
    holes[3, 8, 12] = True  # inside the 9.0 region
    d[holes] = bad
    np.save(tmp_path / "d.npy", d)
    got = depth_io.load_depth(tmp_path / "d.npy", repair=True)
    assert np.isfinite(got).all() and (got > 0).all()
    np.testing.assert_array_equal(got[~holes], d[~holes])  # valid values untouched
    np.testing.assert_allclose(got[1, 3:5, 2:4], 5.0, atol=0.05)
    assert got[3, 8, 12] == pytest.approx(9.0, abs=0.05)


def test_repair_needs_some_valid_value(tmp_path) -> None:
    d = random_depth()
    d[1] = np.nan
    np.save(tmp_path / "d.npy", d)
    with pytest.raises(Ex4dError) as exc:
        depth_io.load_depth(tmp_path / "d.npy", repair=True)
    assert "frame 1" in str(exc.value)


def test_disparity_allows_zero_and_negative_but_not_nan(tmp_path) -> None:
    disp = RNG.uniform(-1.0, 1.0, (T, H, W)).astype(np.float32)
    disp[0, 0, 0] = 0.0
    np.save(tmp_path / "ok.npy", disp)
    assert np.isfinite(depth_io.load_depth(tmp_path / "ok.npy", kind="disparity")).all()
    disp[2, 1, 1] = np.nan
    np.save(tmp_path / "nan.npy", disp)
    with pytest.raises(Ex4dError):
        depth_io.load_depth(tmp_path / "nan.npy", kind="disparity")
