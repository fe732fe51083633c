"""The guide stage's files: lossless PNG frames (the exact guide), H.264 previews and the camera."""

from __future__ import annotations

import io
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..cameras import CameraPath

GUIDE_FILES = ("color.mp4", "mask.mp4", "color", "mask", "camera.npz")  # PNG folders hold frame_00000.png ...
PNG_PREFIX = "frame_"
GUIDE_X264_PRESET = (
    "ultrafast"  # the videos are previews (the PNGs are the exact guide); crf 12 keeps them near-lossless
)
GUIDE_X264_SLICES = 8  # x264 sliced threads of the previews (deterministic for a fixed count; ~ N x faster)
GUIDE_PNG_LEVEL = (
    1  # zlib level of the exact PNG frames: lossless at any level; 1 is several times faster than the default 3
)


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


def write_guide_files(folder: Path, color: np.ndarray, mask: np.ndarray, fps: float, camera: CameraPath) -> None:
    """The guide's files into ``folder`` (a stage's temporary folder), for a guide already in memory
    (:class:`GuideWriter`, every frame handed over at once)."""
    with GuideWriter(folder, fps) as writer:
        writer.add(color, mask, 0, len(color))
        writer.finish(color, mask, camera)


class GuideWriter:
    """Writes a guide's files into ``folder`` (a stage's temporary folder) while the guide is being rendered:
    lossless PNG frames (the exact guide), the two H.264 previews and the camera, each hashed as it is
    written (``hashed_io``).

    Steps, on :func:`hashed_io.worker_count` threads (zlib, swscale, x264 and hashlib release the GIL):
    1. :meth:`add` (per rendered chunk; ``pipeline.guide.render_guide``'s ``on_chunk``): the chunk's PNG frames
    encoded (OpenCV, zlib level ``GUIDE_PNG_LEVEL``) and written, its colour frames converted to the encoder's
    yuv420p (swscale, as the encoder itself would: the same pixels); frame 0 waits for :meth:`finish` (the
    frame-0 rule may replace it after the render); 2. :meth:`finish` (the final guide): frame 0 and any frame
    not handed over, the two previews encoded in memory on two threads of their own (the colour one consuming
    step 1's frames in order, the mask one built from a grey lookup table, :func:`_mask_yuv`), the camera; it
    returns when every file is written. Use as a context manager: on an error, pending work is dropped."""

    def __init__(self, folder: Path, fps: float):
        from .hashed_io import worker_count

        self.folder, self.fps = folder, fps
        (folder / "color").mkdir()
        (folder / "mask").mkdir()
        self.pool = ThreadPoolExecutor(worker_count())
        self.tasks: list = []
        self.yuv: dict[int, object] = {}  # frame -> future of its yuv420p frame

    def __enter__(self) -> GuideWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.pool.shutdown(wait=True, cancel_futures=exc_type is not None)

    def _png(self, sub: str, i: int, img: np.ndarray) -> None:
        import cv2

        from .hashed_io import write_hashed

        if img.ndim == 3:
            img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
        ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, GUIDE_PNG_LEVEL])
        if not ok:
            raise OSError(f"cannot encode PNG frame {i} in {self.folder / sub}")
        write_hashed(self.folder / sub / f"{PNG_PREFIX}{i:05d}.png", buf)

    def _submit(self, color: np.ndarray, mask: np.ndarray, i: int) -> None:
        if i not in self.yuv:
            self.yuv[i] = self.pool.submit(_rgb_yuv, color[i])  # first: the colour encoder waits on them
        self.tasks.append(self.pool.submit(self._png, "color", i, color[i]))
        self.tasks.append(self.pool.submit(self._png, "mask", i, mask[i]))

    def add(self, color: np.ndarray, mask: np.ndarray, start: int, stop: int) -> None:
        """Frames ``start`` .. ``stop - 1`` of ``color`` (T, H, W, 3) / ``mask`` (T, H, W) uint8 are final
        (frame 0 excepted); the arrays must stay unchanged there."""
        for i in range(max(start, 1), stop):
            if i not in self.yuv:
                self._submit(color, mask, i)

    def finish(self, color: np.ndarray, mask: np.ndarray, camera: CameraPath) -> None:
        """The final guide (frame 0 included): the remaining frames, the previews and the camera."""
        from ..cameras import save_camera_npz
        from .hashed_io import write_hashed

        first = Future()  # frame 0 converted here: the colour encoder starts with it, ahead of the queue
        first.set_result(_rgb_yuv(color[0]))
        self.yuv[0] = first
        self._submit(color, mask, 0)
        for i in range(1, len(color)):
            if i not in self.yuv:
                self._submit(color, mask, i)
        yuv = [self.yuv[i] for i in range(len(color))]
        with ThreadPoolExecutor(2) as encoders:
            videos = [
                encoders.submit(
                    lambda: write_hashed(self.folder / "color.mp4", _h264((y.result() for y in yuv), self.fps))
                ),
                encoders.submit(lambda: write_hashed(self.folder / "mask.mp4", _h264(map(_mask_yuv, mask), self.fps))),
            ]
            save_camera_npz(self.folder / "camera.npz", camera)  # a few kB: the manifest hashes it
            for f in (*self.tasks, *videos):
                f.result()  # the first error (the pools' exits wait for the rest)


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
