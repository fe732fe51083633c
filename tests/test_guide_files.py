"""The guide stage's files, the guide videos stage's and the stages' hashed writes (issue 12 speed work): what
is written is exactly what the plain library calls would write, and the content manifest is what a fresh hash
of the files gives."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

from ex4d_backend.cameras import CameraPath
from ex4d_backend.footage import write_video
from ex4d_backend.pipeline import guide_files
from ex4d_backend.pipeline.hashed_io import save_npy_hashed, write_hashed
from ex4d_backend.pngio import encode_png
from ex4d_backend.service import integrity


def _guide(t: int, h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, CameraPath]:
    rng = np.random.default_rng(seed)
    v, u = np.mgrid[0:h, 0:w]
    color = np.stack([(np.stack([u * 3 + i, v * 5, (u + v + 7 * i) % 256], -1) % 256) for i in range(t)])
    color = color.astype(np.uint8)
    color[:, : h // 3] = rng.integers(0, 256, (t, h // 3, w, 3), dtype=np.uint8)  # some noise too
    mask = np.where(rng.random((t, h, w)) < 0.3, 255, 0).astype(np.uint8)
    k = np.array([[50.0, 0, w / 2], [0, 50.0, h / 2], [0, 0, 1]])
    ext = np.repeat(np.eye(4)[None], t, axis=0)
    return color, mask, CameraPath(ext, np.repeat(k[None], t, axis=0), w, h, "test")


def _fresh_manifest(folder) -> dict:
    """Sizes and XXH3-128 hashes (``xxhash`` itself, over the whole file read now): the ground truth for a
    manifest."""
    import xxhash

    out = {}
    for root, _dirs, names in os.walk(folder):
        for name in names:
            p = os.path.join(root, name)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = [os.path.getsize(p), xxhash.xxh3_128(fh.read()).hexdigest()]
    return out


@pytest.mark.parametrize("size", [(48, 64), (47, 63)])  # even, and odd sides (padded for yuv420p)
def test_guide_files_are_the_plain_encodings_and_the_manifest_is_fresh(tmp_path, monkeypatch, size):
    """Each PNG is byte for byte ``pngio.encode_png`` of its frame (checked against the PNG spec in
    test_pngio.py) and decodes (OpenCV) to the frame; with one x264 slice both videos are byte for byte ``footage.write_video`` of the RGB/grey
    frames (PyAV's own RGB conversion), so the parallel swscale conversion and the mask's grey lookup table
    change no pixel; the manifests from the hashes taken while writing equal a fresh hash of every file.
    Fails if a PNG is encoded differently, the frame order is mixed up between threads, the grey table is
    wrong, or a hash is taken over other bytes than those written."""
    h, w = size
    color, mask, cam = _guide(5, h, w)
    monkeypatch.setattr(guide_files, "GUIDE_X264_SLICES", 1)
    out, videos = tmp_path / "guide", tmp_path / "videos"
    out.mkdir()
    videos.mkdir()
    guide_files.write_guide_files(out, color, mask, cam)
    guide_files.write_guide_videos(videos, color, mask, 12.0)
    assert sorted(x.name for x in out.iterdir()) == sorted(guide_files.GUIDE_FILES)
    assert sorted(x.name for x in videos.iterdir()) == sorted(guide_files.VIDEO_FILES)

    for i in range(len(color)):
        png_c = (out / "color" / f"frame_{i:05d}.png").read_bytes()
        png_m = (out / "mask" / f"frame_{i:05d}.png").read_bytes()
        assert png_c == encode_png(color[i]) and png_m == encode_png(mask[i])
    np.testing.assert_array_equal(guide_files.read_png_folder(out / "color", 3), color)
    np.testing.assert_array_equal(guide_files.read_png_folder(out / "mask", 1), mask)

    ref = tmp_path / "ref"
    ref.mkdir()
    write_video(ref / "c.mp4", color, 12.0, preset=guide_files.GUIDE_X264_PRESET)
    write_video(ref / "m.mp4", mask, 12.0, preset=guide_files.GUIDE_X264_PRESET)
    assert (videos / "color.mp4").read_bytes() == (ref / "c.mp4").read_bytes()
    assert (videos / "mask.mp4").read_bytes() == (ref / "m.mp4").read_bytes()

    assert integrity.manifest(out) == _fresh_manifest(out)
    assert integrity.manifest(videos) == _fresh_manifest(videos)


def test_sliced_previews_are_deterministic_and_faithful(tmp_path):
    """With ``GUIDE_X264_SLICES`` slices the previews' bytes are the same on every run (never timing
    dependent) and decode as close to the frames as a one-thread encode (within 0.5 dB PSNR). Fails with x264 frame threads or an auto thread count
    (run-to-run or machine-dependent bytes), or a broken slice setup."""
    from ex4d_backend.footage import read_footage

    color, mask, _ = _guide(6, 64, 96, seed=1)
    color[:] = cv2.GaussianBlur(color.reshape(-1, 96, 3), (5, 5), 2).reshape(color.shape)  # compressible
    outs = []
    for i in range(3):
        d = tmp_path / f"g{i}"
        d.mkdir()
        guide_files.write_guide_videos(d, color, mask, 24.0)
        outs.append(((d / "color.mp4").read_bytes(), (d / "mask.mp4").read_bytes()))
    assert outs[0] == outs[1] == outs[2]
    write_video(tmp_path / "one_slice.mp4", color, 24.0, preset=guide_files.GUIDE_X264_PRESET)

    def psnr(path) -> float:
        back = read_footage(path, max_side=None).frames.astype(np.float64)
        return 10 * np.log10(255**2 / np.mean((back - color) ** 2))

    assert psnr(tmp_path / "g0" / "color.mp4") > psnr(tmp_path / "one_slice.mp4") - 0.5 > 25
    m = read_footage(tmp_path / "g0" / "mask.mp4", max_side=None).frames[..., 0].astype(np.float64)
    assert np.mean(np.abs(m - mask)) < 8


def test_grey_table_is_swscales_conversion_of_grey_rgb():
    """The mask preview's yuv420p planes built from the grey table equal swscale's conversion of the RGB
    frame (m, m, m), for every grey value and odd sides. Fails with a made-up BT.601 table or wrong chroma."""
    rng = np.random.default_rng(3)
    m = rng.integers(0, 256, (31, 45), dtype=np.uint8)
    m.reshape(-1)[:256] = np.arange(256)  # every grey value
    want = guide_files._rgb_yuv(np.repeat(m[..., None], 3, axis=2)).to_ndarray()
    np.testing.assert_array_equal(guide_files._mask_yuv(m).to_ndarray(), want)


@pytest.mark.parametrize(
    "arr",
    [
        np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4),
        np.arange(60, dtype=np.uint8).reshape(3, 4, 5)[:, ::2],  # not contiguous
        np.zeros((0, 4), np.float32),
        np.random.default_rng(0).random((3, 70, 90)).astype(np.float32),
    ],
)
def test_save_npy_hashed_is_np_save_with_a_fresh_hash(tmp_path, arr):
    """The file is byte for byte ``np.save``'s and its remembered hash equals a fresh XXH3-128 of the file.
    Fails if the header or data differ from numpy's format, or the hash covers other bytes."""
    p = tmp_path / "a.npy"
    save_npy_hashed(p, arr)
    np.save(tmp_path / "b.npy", arr)
    assert p.read_bytes() == (tmp_path / "b.npy").read_bytes()
    assert integrity.file_hash(p) == integrity.file_hash(p, memo=False)
    np.testing.assert_array_equal(np.load(p), arr)


def test_hashed_writes_never_overwrite_and_changes_are_hashed_again(tmp_path, monkeypatch):
    """A hashed write refuses an existing file (a stage folder's files are new); a file changed after it was
    written is hashed again (the memo is keyed by the file's stamp). Fails if the writer truncates existing
    files or the memo outlives a change. Blocks of 16 bytes exercise the block loop."""
    from ex4d_backend.pipeline import hashed_io

    monkeypatch.setattr(hashed_io, "BLOCK", 16)
    p = tmp_path / "x.bin"
    data = bytes(range(256)) * 3
    write_hashed(p, data)
    assert p.read_bytes() == data and integrity.file_hash(p) == integrity.file_hash(p, memo=False)
    with pytest.raises(FileExistsError):
        write_hashed(p, b"other")
    assert p.read_bytes() == data
    with open(p, "r+b") as fh:
        fh.write(b"\xff")
    assert integrity.file_hash(p) == integrity.file_hash(p, memo=False)
    big = np.arange(1000, dtype=np.int64)
    save_npy_hashed(tmp_path / "big.npy", big)
    assert (tmp_path / "big.npy").read_bytes() == _np_save_bytes(tmp_path, big)
    assert integrity.file_hash(tmp_path / "big.npy") == integrity.file_hash(tmp_path / "big.npy", memo=False)


def _np_save_bytes(tmp_path, arr) -> bytes:
    np.save(tmp_path / "ref.npy", arr)
    return (tmp_path / "ref.npy").read_bytes()


@pytest.mark.parametrize(
    ("values", "scale"),
    [((0.5, 80.0), 1.0), ((5e-5, 2e4), 1.0), ((1.0, 9.0), 0.001), ((3.0, 4.0), 7.5)],  # in range, clipped, scaled
)
def test_file_depth_is_the_reference_clip_formula(tmp_path, values, scale):
    """``load_depth``'s fast path (no copy when nothing changes) gives bit for bit the reference's
    ``clip(depth * scale, 1e-4, 1e4)`` in float32, written literally here. Fails if the shortcut skips a clip
    or a scale, or returns another dtype."""
    from ex4d_backend.depth_io import load_depth

    rng = np.random.default_rng(5)
    lo, hi = values
    raw = (lo + (hi - lo) * rng.random((3, 6, 8))).astype(np.float32)
    raw[0, 0, 0], raw[-1, -1, -1] = lo, hi
    np.save(tmp_path / "d.npy", raw)
    got = load_depth(tmp_path / "d.npy", n_frames=3, scale=scale)
    want = np.clip(raw * np.float32(scale), 1e-4, 1e4).astype(np.float32)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


def test_file_depth_stage_stores_the_file_depth_with_a_valid_manifest(tmp_path, monkeypatch):
    """The frames and depth stages of a new shot with a file depth: ``depth.npy`` holds exactly what
    ``depth_io.load_depth`` reads (the clip's exact depth), ``frames.npy`` the footage's frames, the meta's
    range is the array's, both manifests pass a full re-hash (``stage_meta(full=True)``), and no garbage
    collection runs (it is for a depth model's memory; it cost 0.2 s a shot). Fails if the depth is stored
    from another array, a hash is taken over other bytes, or ``free_memory`` runs for a file."""
    import service_fixtures as sf

    from ex4d_backend.pipeline import stages
    from ex4d_backend.pipeline.settings import DepthSettings, FrameSettings
    from ex4d_backend.service.jobstore import JobStore

    clip = sf.make_clip(tmp_path / "data", n_frames=5)
    monkeypatch.setattr(stages, "free_memory", lambda: pytest.fail("free_memory ran for a file depth"))
    store = JobStore(tmp_path / "store", [clip.root])
    ctx = stages.Context(store)
    c = stages.frames_stage(ctx, clip.footage, FrameSettings())
    d = stages.depth_stage(ctx, c, DepthSettings.from_params(clip.params()["depth"]))
    np.testing.assert_array_equal(np.asarray(c.frames), clip.frames)
    np.testing.assert_array_equal(np.asarray(d.depth), clip.depth)
    assert np.asarray(d.depth).dtype == np.float32
    assert (d.meta["depth_min"], d.meta["depth_max"]) == (float(clip.depth.min()), float(clip.depth.max()))
    assert store.stage_meta("frames", c.key, full=True) is not None
    assert store.stage_meta("depth", d.key, full=True) is not None


def test_stored_guide_is_the_rendered_guide_and_videos_come_on_request(tmp_path):
    """The guide stage's PNG frames decode to exactly the returned guide (frame 0 too, which the frame-0 rule
    replaces after the render), its meta.json holds the frame-0 flag and the per-frame unseen share of the
    final mask, the manifest passes a full re-hash, and the folder holds no video; the guide videos stage,
    from the stored PNGs (a reused guide), gives the same bytes as from the arrays just rendered. Fails if
    frame 0 is written before the rule, meta.json misses what is known only after the render, the guide stage
    encodes videos again, or the videos stage reads other frames than the guide's."""
    import json

    import service_fixtures as sf

    from ex4d_backend.pipeline import stages
    from ex4d_backend.pipeline.settings import DepthSettings, FrameSettings, MeshSettings, RenderSettings
    from ex4d_backend.render import guide_masked_share
    from ex4d_backend.service.jobstore import JobStore

    clip = sf.make_clip(tmp_path / "data", n_frames=9)
    store = JobStore(tmp_path / "store", [clip.root])
    ctx = stages.Context(store)
    c = stages.frames_stage(ctx, clip.footage, FrameSettings())
    d = stages.depth_stage(ctx, c, DepthSettings.from_params(clip.params()["depth"]))
    cam = stages.camera_stage(ctx, c, d, clip.k, {"preset": "90"}, MeshSettings())
    g = stages.guide_stage(ctx, c, d, clip.k, cam, MeshSettings(), RenderSettings("cpu"))
    assert g.guide is not None and g.guide.frame0_is_source
    np.testing.assert_array_equal(guide_files.read_png_folder(g.dir / "color", 3), g.guide.color)
    np.testing.assert_array_equal(guide_files.read_png_folder(g.dir / "mask", 1), g.guide.mask)
    np.testing.assert_array_equal(g.guide.color[0], clip.frames[0])
    stored = json.loads((g.dir / "meta.json").read_text())
    assert stored["frame0_is_source"] is True
    assert stored["masked_share"] == [round(float(v), 6) for v in guide_masked_share(g.guide.mask)]
    unseen = (g.guide.mask == 0).reshape(len(g.guide.mask), -1).mean(1)  # the share of 0 pixels, literally
    np.testing.assert_array_equal(guide_masked_share(g.guide.mask), unseen)
    assert store.stage_meta("guide", g.key, full=True) is not None
    assert not list(g.dir.glob("*.mp4"))
    fresh = stages.guide_videos_stage(ctx, g)  # the arrays in memory
    assert ctx.cached["guide_videos"] is False and store.stage_meta("guide_videos", fresh.key, full=True)
    mp4 = {n: (fresh.dir / n).read_bytes() for n in guide_files.VIDEO_FILES}
    store2 = JobStore(tmp_path / "store2", [clip.root])
    ctx2 = stages.Context(store2)
    c2 = stages.frames_stage(ctx2, clip.footage, FrameSettings())
    d2 = stages.depth_stage(ctx2, c2, DepthSettings.from_params(clip.params()["depth"]))
    cam2 = stages.camera_stage(ctx2, c2, d2, clip.k, {"preset": "90"}, MeshSettings())
    stages.guide_stage(ctx2, c2, d2, clip.k, cam2, MeshSettings(), RenderSettings("cpu"))
    reused = stages.guide_stage(ctx2, c2, d2, clip.k, cam2, MeshSettings(), RenderSettings("cpu"))
    assert reused.guide is None  # from the store: the videos stage reads its PNGs
    again = stages.guide_videos_stage(ctx2, reused)
    assert {n: (again.dir / n).read_bytes() for n in guide_files.VIDEO_FILES} == mp4
