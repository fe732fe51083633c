"""The guide stage's files (lossless PNG frames: the exact guide, and the camera) and the guide videos
stage's (two H.264 videos of the guide)."""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..cameras import CameraPath

GUIDE_FILES = ("color", "mask", "camera.npz")  # the guide stage's; the PNG folders hold frame_00000.png ...
VIDEO_FILES = ("color.mp4", "mask.mp4")  # ``stages.guide_videos_stage``'s
PNG_PREFIX = "frame_"
GUIDE_X264_PRESET = (
    "ultrafast"  # the videos are previews (the PNGs are the exact guide); crf 12 keeps them near-lossless
)
GUIDE_X264_SLICES = 8  # x264 sliced threads of the previews (deterministic for a fixed count; ~ N x faster)


def read_png_folder(folder: Path, channels: int) -> np.ndarray:
    """(T, H, W, 3) RGB or (T, H, W) grey uint8 from ``frame_*.png`` files."""
    import cv2

    files = sorted(folder.glob(f"{PNG_PREFIX}*.png"))
    flag = cv2.IMREAD_COLOR if channels == 3 else cv2.IMREAD_GRAYSCALE
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        imgs = list(pool.map(lambda f: cv2.imread(str(f), flag), files))
    if channels == 3:
        imgs = [cv2.cvtColor(i, cv2.COLOR_BGR2RGB) for i in imgs]
    return np.stack(imgs)


def write_guide_files(folder: Path, color: np.ndarray, mask: np.ndarray, camera: CameraPath) -> None:
    """The guide stage's files into ``folder`` (a stage's temporary folder): the PNG frames ``color/`` and
    ``mask/`` (the exact guide) and ``camera.npz``, each hashed as it is written (``hashed_io``).

    ``color`` (T, H, W, 3) RGB and ``mask`` (T, H, W) uint8. The frames are encoded (``pngio.encode_png``:
    the "up" filter and ISA-L's deflate, 1.3 ms a 512² frame where libpng took 5-11 ms) and written on
    :func:`hashed_io.worker_count` threads (deflate and the hash release the GIL) after the render, not
    while it runs: encoding while later chunks rendered slowed the render more than it saved (H200: render
    0.054 -> 0.11 s, the job 0.14 -> 0.15-0.19 s)."""
    from ..cameras import save_camera_npz
    from ..pngio import encode_png
    from .hashed_io import worker_count, write_hashed

    def png(sub: str, i: int, img: np.ndarray) -> None:
        write_hashed(folder / sub / f"{PNG_PREFIX}{i:05d}.png", encode_png(img))

    (folder / "color").mkdir()
    (folder / "mask").mkdir()
    with ThreadPoolExecutor(worker_count()) as pool:
        tasks = [
            pool.submit(png, sub, i, arr[i])
            for i in range(len(color))
            for sub, arr in (("color", color), ("mask", mask))
        ]
        save_camera_npz(folder / "camera.npz", camera)  # a few kB: the manifest hashes it
        try:
            for f in tasks:
                f.result()  # the first error
        except BaseException:
            for f in tasks:
                f.cancel()
            raise


def write_guide_videos(folder: Path, color: np.ndarray, mask: np.ndarray, fps: float) -> None:
    """The guide videos stage's files into ``folder``: ``color.mp4`` and ``mask.mp4`` (H.264, near-lossless
    previews of the guide for people and other tools; the PNG frames stay the exact guide), encoded in
    memory at once on two threads, the colour frames converted to yuv420p on the others (swscale, as the
    encoder itself would: the same pixels; the mask ones by a grey lookup table, :func:`_mask_yuv`)."""
    from .hashed_io import worker_count, write_hashed

    with ThreadPoolExecutor(worker_count()) as pool, ThreadPoolExecutor(2) as encoders:
        yuv = [pool.submit(_rgb_yuv, c) for c in color]
        videos = [
            encoders.submit(lambda: write_hashed(folder / "color.mp4", _h264((y.result() for y in yuv), fps))),
            encoders.submit(lambda: write_hashed(folder / "mask.mp4", _h264(map(_mask_yuv, mask), fps))),
        ]
        for f in videos:
            f.result()


def _even(img: np.ndarray) -> np.ndarray:
    """A frame padded to even sides by repeating the last row/column (yuv420p), as ``footage.write_video``."""
    h, w = img.shape[:2]
    if h % 2 == 0 and w % 2 == 0:
        return np.ascontiguousarray(img)
    pad = ((0, h % 2), (0, w % 2)) + ((0, 0),) * (img.ndim - 2)
    return np.pad(img, pad, mode="edge")


def _rgb_yuv(img: np.ndarray):
    """(H, W, 3) uint8 RGB -> an ``av.VideoFrame`` in yuv420p, converted by swscale exactly as the encoder
    converts an RGB frame itself (``VideoCodecContext``: same size, default interpolation, one thread)."""
    import av

    return av.VideoFrame.from_ndarray(_even(img), format="rgb24").reformat(format="yuv420p", threads=1)


_GREY_LUT: np.ndarray | None = None


def _grey_lut() -> np.ndarray:
    """(256,) uint8: swscale's yuv420p luma of the grey RGB pixel (v, v, v); checked once that a grey image's
    chroma is exactly 128 (so a grey frame's yuv420p is this table applied to it, plus flat chroma)."""
    global _GREY_LUT
    if _GREY_LUT is None:
        ramp = np.repeat(np.arange(256, dtype=np.uint8).reshape(16, 16)[..., None], 3, axis=2)
        planes = _rgb_yuv(ramp).to_ndarray()  # (24, 16): Y rows, then U and V
        if not (planes[16:] == 128).all():
            raise RuntimeError("swscale gives grey pixels non-neutral chroma: the mask preview needs RGB frames")
        _GREY_LUT = planes[:16].reshape(256).copy()
    return _GREY_LUT


def _mask_yuv(mask: np.ndarray):
    """(H, W) uint8 grey -> the yuv420p ``av.VideoFrame`` swscale would make of the RGB frame (m, m, m)
    (:func:`_grey_lut`), without converting three channels."""
    import av

    m = _even(mask)
    h, w = m.shape
    planes = np.full((h * 3 // 2, w), 128, np.uint8)
    planes[:h] = _grey_lut()[m]
    return av.VideoFrame.from_ndarray(planes, format="yuv420p")


def _h264(frames, fps: float) -> bytes:
    """An mp4 (H.264 yuv420p, crf 12, x264 ``GUIDE_X264_PRESET``) of yuv420p ``av.VideoFrame``s, in memory.

    ``GUIDE_X264_SLICES`` sliced threads: the bytes depend on the slice count only (fixed here), never on
    the machine or on timing (x264's frame threads would make them vary)."""
    from fractions import Fraction

    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = None
        for f in frames:
            if stream is None:
                stream = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
                stream.width, stream.height = f.width, f.height
                stream.pix_fmt = "yuv420p"
                stream.options = {"crf": "12", "preset": GUIDE_X264_PRESET}
                stream.codec_context.thread_type = "SLICE"
                stream.codec_context.thread_count = GUIDE_X264_SLICES
            for packet in stream.encode(f):
                out.mux(packet)
        if stream is None:
            raise ValueError("a preview needs at least one frame")
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()
