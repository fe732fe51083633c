"""Footage I/O: video round trips (mp4/mkv/mov), image sequences (PNG/JPEG/EXR), the long-side cap,
first-N sampling, variable frame rate, and clear errors for corrupt or empty inputs."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from ex4d_backend import footage
from ex4d_backend.errors import Ex4dError

H, W = 48, 64


def smooth_frames(n: int, h: int = H, w: int = W) -> np.ndarray:
    """Frames a codec keeps well: smooth gradients plus a per-frame flat level (frame i is recognisable)."""
    v, u = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        out[i, ..., 0] = np.clip(20 + 200 * u / w, 0, 255)
        out[i, ..., 1] = np.clip(30 + 180 * v / h, 0, 255)
        out[i, ..., 2] = 10 + 22 * i
    return out


@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".mov"])
@pytest.mark.parametrize("fps", [12.0, 30000 / 1001])
def test_video_round_trip(tmp_path, suffix: str, fps: float) -> None:
    frames = smooth_frames(7)
    path = footage.write_video(tmp_path / f"clip{suffix}", frames, fps)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"clip{suffix}"]  # no temporary left behind
    got = footage.read_footage(path)
    assert got.frames.shape == frames.shape and got.frames.dtype == np.uint8
    assert got.size == (W, H) and got.source_size == (W, H) and got.total_frames == 7
    assert got.fps == pytest.approx(fps, rel=1e-6)
    err = np.abs(got.frames.astype(int) - frames.astype(int))
    assert err.mean() < 2.0 and np.percentile(err, 99) <= 6
    # the per-frame level identifies each frame: order and count preserved
    np.testing.assert_allclose(got.frames[..., 2].mean(axis=(1, 2)), 10 + 22 * np.arange(7), atol=2)


@pytest.mark.parametrize("size", [(48, 64), (46, 62), (360, 640)])
def test_decoded_frames_are_pyavs_default_conversion(tmp_path, size) -> None:
    """``read_footage`` converts each decoded frame with swscale on one thread (``footage.frame_rgb``, 5x
    faster); the pixels are exactly PyAV's own default ``to_ndarray(format="rgb24")`` of the same frames.
    Fails if the fast path converts with other flags, another colour matrix or range, or another library."""
    import av

    h, w = size
    rng = np.random.default_rng(1)
    frames = np.clip(smooth_frames(5, h, w).astype(int) + rng.integers(-40, 40, (5, h, w, 3)), 0, 255)
    path = footage.write_video(tmp_path / "c.mp4", frames.astype(np.uint8), 24.0)
    with av.open(str(path)) as c:
        want = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    np.testing.assert_array_equal(footage.read_footage(path, max_side=None).frames, want)


def test_write_video_odd_size_and_grey(tmp_path) -> None:
    grey = np.tile(np.linspace(0, 255, 33, dtype=np.uint8)[None, None, :], (3, 21, 1))  # (T, H, W), odd sizes
    got = footage.read_footage(footage.write_video(tmp_path / "g.mp4", grey, 10), max_side=None)
    assert got.frames.shape == (3, 22, 34, 3)  # padded to even by repeating the last row/column
    np.testing.assert_allclose(got.frames[:, :21, :33].mean(-1), grey, atol=6)


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_first_n_frames_and_total(tmp_path, suffix: str) -> None:
    frames = smooth_frames(9)
    path = footage.write_video(tmp_path / f"clip{suffix}", frames, 24)
    got = footage.read_footage(path, max_frames=4)
    assert len(got.frames) == 4 and got.total_frames == 9  # Matroska stores no frame count: still 9
    np.testing.assert_allclose(got.frames[..., 2].mean(axis=(1, 2)), 10 + 22 * np.arange(4), atol=2)
    assert got.fps == pytest.approx(24.0)
    assert len(footage.read_footage(path, max_frames=0).frames) == 9
    assert len(footage.read_footage(path, max_frames=50).frames) == 9


def test_long_side_cap_video(tmp_path) -> None:
    path = footage.write_video(tmp_path / "clip.mp4", smooth_frames(2, 96, 128), 24)
    got = footage.read_footage(path, max_side=64)
    assert got.size == (64, 48) and got.source_size == (128, 96)
    ref = smooth_frames(1, 48, 64)[0].astype(int)  # the same gradient at half size (area resampling)
    assert np.abs(got.frames[0].astype(int) - ref).mean() < 3.0


def test_long_side_cap_default_1024_and_even_sizes(tmp_path) -> None:
    import cv2

    assert footage.DEFAULT_MAX_SIDE == 1024
    assert footage.processing_size(1920, 1080) == (1024, 576)
    assert footage.processing_size(1080, 1920) == (576, 1024)
    assert footage.processing_size(640, 360) == (640, 360)  # never upscaled
    assert footage.processing_size(2050, 1000) == (1024, 500)
    w, h = footage.processing_size(1001, 999, None)  # even for yuv420p, within one pixel
    assert w % 2 == 0 and h % 2 == 0 and abs(w - 1001) == 1 and abs(h - 999) == 1
    seq = tmp_path / "big"
    seq.mkdir()
    img = np.zeros((1000, 2050, 3), np.uint8)
    img[:, :1025] = (0, 0, 255)  # left half red (BGR)
    cv2.imwrite(str(seq / "f_0.png"), img)
    got = footage.read_footage(seq)
    assert got.size == (1024, 500) and got.source_size == (2050, 1000)
    assert got.frames[0, 10, 10].tolist() == [255, 0, 0] and got.frames[0, 10, 1000].tolist() == [0, 0, 0]


def test_variable_frame_rate_video(tmp_path) -> None:
    """Frames with irregular timestamps: every frame is read once, in order; the reported rate is the average
    rate of the frames read, (n - 1) / (last - first timestamp)."""
    import av

    pts_ms = [0, 40, 120, 150, 300, 310, 400, 520]
    frames = smooth_frames(len(pts_ms))
    for suffix in (".mp4", ".mkv"):
        path = tmp_path / f"vfr{suffix}"
        with av.open(str(path), "w") as out:
            stream = out.add_stream("libx264", rate=25)
            stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
            stream.time_base = Fraction(1, 1000)
            stream.codec_context.time_base = Fraction(1, 1000)
            for img, pts in zip(frames, pts_ms, strict=True):
                frame = av.VideoFrame.from_ndarray(img, format="rgb24")
                frame.pts, frame.time_base = pts, Fraction(1, 1000)
                for packet in stream.encode(frame):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        got = footage.read_footage(path)
        assert len(got.frames) == len(pts_ms), suffix
        np.testing.assert_allclose(got.frames[..., 2].mean(axis=(1, 2)), 10 + 22 * np.arange(8), atol=2)
        assert got.fps == pytest.approx(7 / 0.520, rel=1e-6), suffix
        assert footage.read_footage(path, max_frames=3).fps == pytest.approx(2 / 0.120, rel=1e-6)


def test_png_sequences_8_and_16_bit_natural_order(tmp_path) -> None:
    import cv2

    frames = smooth_frames(11)
    for i, f in enumerate(frames):  # frame_2 must come before frame_10
        cv2.imwrite(str(tmp_path / f"frame_{i}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    got = footage.read_footage(tmp_path, fps=12.5)
    np.testing.assert_array_equal(got.frames, frames)
    assert got.fps == 12.5 and got.total_frames == 11
    assert footage.read_footage(tmp_path).fps == footage.DEFAULT_SEQUENCE_FPS
    np.testing.assert_array_equal(footage.read_footage(tmp_path, max_frames=3).frames, frames[:3])
    seq16 = tmp_path / "sixteen"
    seq16.mkdir()
    cv2.imwrite(str(seq16 / "0.png"), cv2.cvtColor(frames[0], cv2.COLOR_RGB2BGR).astype(np.uint16) * 257)
    np.testing.assert_array_equal(footage.read_footage(seq16).frames[0], frames[0])
    grey = tmp_path / "grey"
    grey.mkdir()
    cv2.imwrite(str(grey / "0.png"), frames[0, ..., 0])
    np.testing.assert_array_equal(footage.read_footage(grey).frames[0], np.repeat(frames[0, ..., :1], 3, -1))


def test_jpeg_sequence(tmp_path) -> None:
    import cv2

    frames = smooth_frames(3)
    for i, f in enumerate(frames):
        cv2.imwrite(str(tmp_path / f"{i:04d}.jpg"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    got = footage.read_footage(tmp_path)
    assert got.frames.shape == frames.shape
    assert np.abs(got.frames.astype(int) - frames.astype(int)).mean() < 2.0


def test_exr_sequence_is_linear_to_srgb(tmp_path) -> None:
    import OpenEXR

    lin = np.random.default_rng(0).uniform(0, 1.2, (2, H, W, 3)).astype(np.float32)
    lin[0, 0, 0] = [0.0, 0.002, 1.0]
    for i in range(2):
        header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
        with OpenEXR.File(header, {"RGB": lin[i]}) as f:
            f.write(str(tmp_path / f"f{i}.exr"))
    got = footage.read_footage(tmp_path)
    x = np.clip(lin.astype(np.float64), 0, 1)
    srgb = np.where(x <= 0.0031308, 12.92 * x, 1.055 * x ** (1 / 2.4) - 0.055)  # IEC 61966-2-1
    np.testing.assert_allclose(got.frames, srgb * 255, atol=0.51)
    assert got.frames[0, 0, 0].tolist() == [0, round(0.002 * 12.92 * 255), 255]


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
def _one_clear_error(path, code: str = "bad_input") -> Ex4dError:
    with pytest.raises(Ex4dError) as exc:
        footage.read_footage(path)
    err = exc.value
    assert err.code == code and err.where == str(path) and err.hint and len(str(err).splitlines()) == 1
    return err


def test_corrupt_and_empty_video(tmp_path) -> None:
    (tmp_path / "junk.mp4").write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    _one_clear_error(tmp_path / "junk.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    _one_clear_error(tmp_path / "empty.mp4")
    (tmp_path / "text.mov").write_text("not a movie")
    _one_clear_error(tmp_path / "text.mov")
    # a video cut before its index (moov at the end of an mp4) cannot be opened
    good = footage.write_video(tmp_path / "good.mp4", smooth_frames(5), 10)
    data = good.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    _one_clear_error(tmp_path / "cut.mp4")


def test_audio_only_file_has_no_video_stream(tmp_path) -> None:
    import av

    path = tmp_path / "sound.mkv"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    assert "no video stream" in str(_one_clear_error(path))


def test_empty_and_bad_folders(tmp_path) -> None:
    import cv2

    (tmp_path / "empty").mkdir()
    _one_clear_error(tmp_path / "empty")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    (other / ".hidden.png").write_bytes(b"")
    _one_clear_error(other)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    cv2.imwrite(str(mixed / "0.png"), np.zeros((H, W, 3), np.uint8))
    cv2.imwrite(str(mixed / "1.png"), np.zeros((H, W + 2, 3), np.uint8))
    assert "differ in size" in str(_one_clear_error(mixed))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(Ex4dError) as exc:
        footage.read_footage(broken)
    assert exc.value.where == str(broken / "0.png")
    cv2.imwrite(str(tmp_path / "single.png"), np.zeros((H, W, 3), np.uint8))
    _one_clear_error(tmp_path / "single.png")
    _one_clear_error(tmp_path / "missing.mp4", code="not_found")


def test_png_sequence_writer_round_trip(tmp_path) -> None:
    frames = smooth_frames(3)
    out = footage.write_png_sequence(tmp_path / "seq", frames)
    assert sorted(p.name for p in out.iterdir()) == ["frame_00000.png", "frame_00001.png", "frame_00002.png"]
    np.testing.assert_array_equal(footage.read_footage(out).frames, frames)
    masks = (smooth_frames(2)[..., 0] > 100).astype(np.uint8) * 255
    out2 = footage.write_png_sequence(tmp_path / "masks", masks)
    np.testing.assert_array_equal(footage.read_footage(out2).frames[..., 0], masks)
    # replacing an existing folder is atomic: the old content is gone only once the new one is complete
    footage.write_png_sequence(tmp_path / "seq", frames[:1])
    assert sorted(p.name for p in (tmp_path / "seq").iterdir()) == ["frame_00000.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks", "seq"]


def test_sample_clip_from_shared_data(repo_root) -> None:
    """The reference's example clip (../shared/data/flower/input.mp4): 512 x 512, 49 frames, 30 fps."""
    clip = repo_root.parent / "shared" / "data" / "flower" / "input.mp4"
    if not clip.is_file():
        pytest.skip("shared sample footage not present")
    got = footage.read_footage(clip, max_frames=10)
    assert got.frames.shape == (10, 512, 512, 3) and got.total_frames == 49 and got.fps == pytest.approx(30.0)
