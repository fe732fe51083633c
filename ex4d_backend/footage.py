"""Footage I/O: read a video or an image-sequence folder into RGB frames; write videos and PNGs.

Conventions: frames are ``uint8`` arrays of shape (T, H, W, 3), RGB, rows top-down. Videos are
decoded with PyAV (FFmpeg), so any container/codec FFmpeg reads works (mp4, mov, mkv, constant or
variable frame rate: variable-rate footage is read frame by frame and its average rate is reported).
Image sequences are PNG/JPEG (8 or 16 bit) or OpenEXR (linear light, converted to sRGB).
Like the reference, the long side is capped at 1024 px (area resampling) and the first N frames are
used. Processing sizes are kept even so every frame can be encoded as yuv420p H.264.

Safety (the service reads footage a client names): every file is opened once through
``safe_io.open_regular`` (regular files inside the allowed folders, checked on the opened handle) and
decoded from that handle. Only the container formats a shot can be are accepted (``VIDEO_FORMATS``,
probed from the content, whatever the file is called); playlists and lists of other files (HLS, DASH,
ffconcat) are refused, and FFmpeg is never allowed to open a second file or URL. Sizes are bounded
before decoding (``MAX_SOURCE_SIDE``), each frame is resized right after it is decoded (never the whole
clip at full resolution) and cancel is checked between frames.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from . import safe_io
from .atomic import atomic_path
from .constants import MAX_SIDE, SEQUENCE_FPS
from .errors import NOT_FOUND, Ex4dError

VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mxf"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".exr"}
DEFAULT_MAX_SIDE = MAX_SIDE  # the reference caps the long side at 1024 px (constants.py)
MAX_PROCESSING_SIDE = 2048  # the largest max_side later stages accept
DEFAULT_SEQUENCE_FPS = SEQUENCE_FPS  # image sequences without a frame rate (constants.py)
ENCODE_THREADS = 1  # one H.264 encoder thread: x264's frame threads make the bytes vary from run to run
MAX_SOURCE_SIDE = 16384  # frames larger than this (either side) are refused before they are decoded
# FFmpeg demuxers a shot can come from (names as ``container.format.name``); everything else (hls, dash,
# concat, image2, tty, lavfi, data, ...) is refused.
VIDEO_FORMATS = {
    "mov,mp4,m4a,3gp,3g2,mj2",
    "matroska,webm",
    "avi",
    "mxf",
    "mpegts",
    "mpeg",
    "yuv4mpegpipe",
    "flv",
}


@dataclass
class Footage:
    """Decoded footage at the processing resolution."""

    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    fps: float  # frames per second (average rate for variable-rate video)
    source_size: tuple[int, int]  # (width, height) before the long-side cap
    total_frames: int  # frames in the source (T may be fewer with ``max_frames``)
    path: Path

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) at the processing resolution."""
        return self.frames.shape[2], self.frames.shape[1]


def processing_size(width: int, height: int, max_side: int | None = DEFAULT_MAX_SIDE) -> tuple[int, int]:
    """(width, height) after capping the long side at ``max_side`` and rounding to even numbers."""
    scale = 1.0
    if max_side and max(width, height) > max_side:
        scale = max_side / max(width, height)
    w = max(2, int(round(width * scale / 2)) * 2)
    h = max(2, int(round(height * scale / 2)) * 2)
    return w, h


def _natural_key(name: str) -> list:
    return [int(tok) if tok.isdigit() else tok.lower() for tok in re.split(r"(\d+)", name)]


def list_image_sequence(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
    return sorted(files, key=lambda p: _natural_key(p.name))


def read_footage(
    path: str | os.PathLike,
    *,
    max_frames: int | None = None,
    max_side: int | None = DEFAULT_MAX_SIDE,
    fps: float | None = None,
) -> Footage:
    """Read a video file or an image-sequence folder.

    Args:
        path: video file or folder of PNG/JPEG/EXR frames (sorted in natural order).
        max_frames: keep only the first N frames (None or 0: all).
        max_side: cap of the long side in pixels (None: keep the source size, rounded to even).
        fps: frame rate to report for image sequences (default 24), or to override a video's.
    """
    p = Path(path)
    if max_side is not None and not (isinstance(max_side, int) and 2 <= max_side <= MAX_SOURCE_SIDE):
        raise Ex4dError(f"max_side must be an integer from 2 to {MAX_SOURCE_SIDE}, not {max_side!r}", where="max_side")
    if max_frames is not None and (not isinstance(max_frames, int) or max_frames < 0):
        raise Ex4dError(f"max_frames must be a whole number >= 0, not {max_frames!r}", where="max_frames")
    if fps is not None and not (isinstance(fps, (int, float)) and 0 < fps <= 1000):
        raise Ex4dError(f"fps must be a number in (0, 1000], not {fps!r}", where="fps")
    if not p.exists():
        raise Ex4dError(f"footage not found: {p}", where=str(p), hint="check the path", code=NOT_FOUND)
    sizer = _Sizer(max_side, str(p))
    if p.is_dir():
        frames, src_fps, total = _read_sequence(p, max_frames, sizer)
    elif p.suffix.lower() in IMAGE_SUFFIXES:
        raise Ex4dError(
            "a single image is not footage", where=str(p), hint="pass the folder that holds the image sequence"
        )
    else:
        frames, src_fps, total = _read_video(p, max_frames, sizer)
    if len(frames) == 0:
        raise Ex4dError("the footage has no frames", where=str(p), hint="check the file plays in a video player")
    return Footage(
        frames=np.ascontiguousarray(np.stack(frames)),
        fps=float(fps or src_fps),
        source_size=sizer.source,
        total_frames=total,
        path=p,
    )


class _Sizer:
    """Resizes each frame to the processing size right after it is decoded; checks sizes before decoding."""

    def __init__(self, max_side: int | None, where: str):
        self.max_side, self.where = max_side, where
        self.source: tuple[int, int] | None = None  # (width, height) of the first frame

    def check_source(self, width: int, height: int) -> None:
        """Refuse absurd frame sizes (a header claiming 40000 x 40000) before anything is decoded."""
        if width <= 0 or height <= 0 or max(width, height) > MAX_SOURCE_SIDE:
            raise Ex4dError(
                f"the frames are {width} x {height} pixels; at most {MAX_SOURCE_SIDE} per side are read",
                where=self.where,
                hint="scale the footage down before using it",
            )

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        h, w = frame.shape[:2]
        if self.source is None:
            self.check_source(w, h)
            self.source = (w, h)
        elif (w, h) != self.source:
            raise Ex4dError(
                f"the frames differ in size: {self.source[0]}x{self.source[1]} and {w}x{h}",
                where=self.where,
                hint="all frames of a shot must have the same resolution",
            )
        tw, th = processing_size(w, h, self.max_side)
        if (tw, th) == (w, h):
            return np.ascontiguousarray(frame)
        import cv2

        interp = cv2.INTER_AREA if tw < w else cv2.INTER_LINEAR
        return cv2.resize(frame, (tw, th), interpolation=interp)


class _NoNestedOpen:
    """PyAV ``io_open``: FFmpeg asks it to open any second file or URL (playlist entries, concat lists,
    external references); it refuses every one and remembers what was asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def __call__(self, url: str, flags: int, options: dict):
        self.asked.append(str(url)[:200])
        raise PermissionError(f"opening {str(url)[:200]} from inside the footage is not allowed")


def open_video(p: Path):
    """(container, file handle) of a video: opened through ``safe_io``, format checked, no nested opens."""
    import av

    fh = safe_io.open_regular(p, "footage")
    nested = _NoNestedOpen()
    try:
        container = av.open(fh, io_open=nested, options={"protocol_whitelist": "file"})
    except (av.error.FFmpegError, OSError, UnicodeDecodeError, ValueError) as exc:
        fh.close()
        if nested.asked:
            raise _list_error(p, f"it refers to {nested.asked[0]}") from None
        raise Ex4dError(
            f"cannot open the video: {exc}",
            where=str(p),
            hint="the file is not a video FFmpeg can read (corrupt or unsupported); re-export it as mp4/mov",
        ) from None
    name = container.format.name
    if name not in VIDEO_FORMATS or nested.asked:
        container.close()
        fh.close()
        raise _list_error(p, f"its format is '{name}'")
    return container, fh


def _list_error(p: Path, detail: str) -> Ex4dError:
    return Ex4dError(
        f"the file is not a video a shot can be ({detail}): playlists and lists of other files are refused",
        where=str(p),
        hint=f"pass the video itself (formats: {', '.join(sorted(VIDEO_FORMATS))}) or an image-sequence folder",
    )


def _read_video(p: Path, max_frames: int | None, sizer: _Sizer) -> tuple[list[np.ndarray], float, int]:
    import av

    container, fh = open_video(p)
    with fh, container:
        if not container.streams.video:
            raise Ex4dError("the file has no video stream", where=str(p), hint="pass a video file")
        stream = container.streams.video[0]
        sizer.check_source(stream.codec_context.width or 1, stream.codec_context.height or 1)
        rate = stream.average_rate or stream.guessed_rate or Fraction(DEFAULT_SEQUENCE_FPS)
        frames: list[np.ndarray] = []
        times: list[Fraction] = []  # presentation times (s) of the decoded frames, when known
        tick = Fraction(0)  # their time base (s)
        try:
            for frame in container.decode(stream):
                safe_io.check_cancel()
                frames.append(sizer(frame_rgb(frame)))
                if frame.pts is not None and frame.time_base is not None:
                    times.append(frame.pts * frame.time_base)
                    tick = frame.time_base
                if max_frames and len(frames) >= max_frames:
                    break
        except av.error.FFmpegError as exc:
            if not frames:
                raise Ex4dError(
                    f"cannot decode the video: {exc}", where=str(p), hint="the file is corrupt; re-export it"
                ) from None
            # A truncated file: keep the frames that decoded, as video players do.
        rate = _average_rate(times, Fraction(rate), tick) if len(times) == len(frames) else rate
        total = len(frames)
        if max_frames and len(frames) >= max_frames:
            # Stopped early: the container's frame count, or (Matroska/WebM store none) its video packets.
            total = max(stream.frames or _count_video_packets(p), len(frames))
    return frames, float(rate), int(total)


def frame_rgb(frame) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a decoded ``av.VideoFrame``: swscale's conversion on one thread, the same pixels
    as ``frame.to_ndarray(format="rgb24")`` (checked by the tests) about 5x faster, since that default
    (``threads=0``) starts a thread pool for every frame (512²: 4 ms against 0.8 ms)."""
    return frame.reformat(format="rgb24", threads=1).to_ndarray()


def _count_video_packets(p: Path) -> int:
    """Frames in the first video stream, counted from its packets (demuxed, not decoded)."""
    import av

    try:
        container, fh = open_video(p)
        with fh, container:
            n = 0
            for packet in container.demux(video=0):
                n += 1 if packet.size else 0
                if n % 256 == 0:
                    safe_io.check_cancel()
            return n
    except (av.error.FFmpegError, Ex4dError):
        return 0


def _average_rate(times: list[Fraction], rate: Fraction, tick: Fraction) -> Fraction:
    """Frame rate to report for frames shown at ``times`` (s): the container's ``rate`` when every frame sits
    on that rate's grid (constant rate, within one time-base ``tick``), else the average rate of the frames
    read, (n - 1) / (last - first). For variable-rate video the container's figure can be a nominal rate
    (Matroska reports its default duration) or be skewed by the last frame's duration (MP4)."""
    if len(times) < 2:
        return rate
    ts = sorted(times)
    span = ts[-1] - ts[0]
    if span <= 0:
        return rate
    if rate > 0 and all(abs((t - ts[0]) - i / rate) <= tick for i, t in enumerate(ts)):
        return rate
    return Fraction(len(ts) - 1) / span


def _read_sequence(folder: Path, max_frames: int | None, sizer: _Sizer) -> tuple[list[np.ndarray], float, int]:
    folder = safe_io.check_folder(folder, "footage folder")
    files = list_image_sequence(folder)
    if not files:
        raise Ex4dError(
            "the folder holds no PNG, JPEG or EXR frames", where=str(folder), hint="point at the image-sequence folder"
        )
    total = len(files)
    if max_frames:
        files = files[:max_frames]
    frames = []
    for f in files:
        safe_io.check_cancel()
        frames.append(sizer(read_image_rgb(f)))
    return frames, DEFAULT_SEQUENCE_FPS, total


def image_header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG or JPEG header, without decoding; None if it cannot be told."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                i += 1
                continue
            marker = data[i + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                i += 2
                continue
            length = int.from_bytes(data[i + 2 : i + 4], "big")
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                return int.from_bytes(data[i + 7 : i + 9], "big"), int.from_bytes(data[i + 5 : i + 7], "big")
            i += 2 + length
    return None


def read_image_rgb(path: Path) -> np.ndarray:
    """One frame as uint8 RGB. 16-bit PNGs are scaled to 8 bit; EXR (linear) is encoded to sRGB."""
    if path.suffix.lower() == ".exr":
        data = read_exr(path)
        if data.ndim == 2:
            data = np.repeat(data[..., None], 3, axis=2)
        rgb = linear_to_srgb(np.clip(data[..., :3], 0.0, 1.0))
        return (rgb * 255.0 + 0.5).astype(np.uint8)
    import cv2

    img = decode_image(path, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise Ex4dError("cannot read the image", where=str(path), hint="the file is corrupt or not an image")
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = cv2.cvtColor(img[..., :3], cv2.COLOR_BGR2RGB)
    if img.dtype == np.uint16:
        img = (img.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    return img


def decode_image(path: Path, flags: int) -> np.ndarray | None:
    """``cv2.imdecode`` of a PNG/JPEG read through ``safe_io`` (size checked from the header first)."""
    import cv2

    data = safe_io.read_bytes(path, "image")
    size = image_header_size(data)
    if size is not None:
        _Sizer(None, str(path)).check_source(*size)
    return cv2.imdecode(np.frombuffer(data, np.uint8), flags)


def read_exr(path: Path) -> np.ndarray:
    """The first part of an EXR as float32: (H, W) for one channel, (H, W, C) for RGB(A).

    OpenEXR reads by file name, so inside a sandbox (the service) it reads a private copy of the bytes read
    through ``safe_io``: the file checked is the file read."""
    import tempfile

    if safe_io.current_roots() is None:
        with safe_io.open_regular(path, "EXR file"):  # a regular file (a FIFO would block OpenEXR)
            pass
        return _read_exr_file(str(path), str(path))
    data = safe_io.read_bytes(path, "EXR file")
    with tempfile.NamedTemporaryFile(suffix=".exr") as tmp:
        tmp.write(data)
        tmp.flush()
        del data
        return _read_exr_file(tmp.name, str(path))


def _read_exr_file(name: str, where: str) -> np.ndarray:
    import OpenEXR

    try:
        with OpenEXR.File(name, header_only=True) as f:
            box = f.header().get("dataWindow")
        if box is not None:
            (x0, y0), (x1, y1) = np.asarray(box[0]).tolist(), np.asarray(box[1]).tolist()
            _Sizer(None, where).check_source(x1 - x0 + 1, y1 - y0 + 1)
    except Ex4dError:
        raise
    except Exception:  # noqa: BLE001 - an unreadable header is reported by the full read below
        pass
    try:
        with OpenEXR.File(name) as f:
            channels = f.channels()
            if "RGBA" in channels:
                arr = channels["RGBA"].pixels
            elif "RGB" in channels:
                arr = channels["RGB"].pixels
            else:
                # Depth-like files: Z, Y, depth.V, R ... take a sensible single channel.
                for channel in ("Z", "depth", "Y", "R", "V"):
                    if channel in channels:
                        arr = channels[channel].pixels
                        break
                else:
                    arr = next(iter(channels.values())).pixels
            return np.asarray(arr, dtype=np.float32)
    except Ex4dError:
        raise
    except Exception as exc:  # OpenEXR raises plain exceptions for corrupt files
        raise Ex4dError(f"cannot read the EXR file: {exc}", where=where, hint="the file is corrupt") from None


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(np.maximum(x, 0.0031308), 1 / 2.4) - 0.055)


def write_video(
    path: str | os.PathLike, frames: np.ndarray, fps: float, *, crf: int = 12, preset: str = "medium"
) -> Path:
    """Encode (T, H, W, 3) or (T, H, W) uint8 frames as H.264 yuv420p (plays everywhere); ``preset`` is
    x264's speed/size trade-off (the quality is set by ``crf``).

    Odd sizes are padded by repeating the last row/column. Written atomically.
    """
    import av

    final = Path(path)
    if final.is_dir():
        raise Ex4dError("the output video is an existing folder", where=str(final), hint="name an .mp4 file")
    if final.suffix.lower() not in VIDEO_SUFFIXES:
        raise Ex4dError(f"the output video must end in .mp4 (or {', '.join(sorted(VIDEO_SUFFIXES))})", where=str(final))
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = np.repeat(frames[..., None], 3, axis=3)
    if frames.dtype != np.uint8:
        raise ValueError("write_video expects uint8 frames")
    _, h, w, _ = frames.shape
    pad_h, pad_w = h % 2, w % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    rate = Fraction(fps).limit_denominator(1001)
    with atomic_path(final) as tmp:
        with av.open(str(tmp), mode="w") as out:
            stream = out.add_stream("libx264", rate=rate)
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf), "preset": preset}
            # x264's output depends on its thread count (by default the machine's core count) and, with frame
            # threads, on timing: one thread makes the bytes (so the decoded pixels) the same for the same frames.
            stream.codec_context.thread_count = ENCODE_THREADS
            for f in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
    return final


def write_png_sequence(folder: str | os.PathLike, frames: np.ndarray, *, prefix: str = "frame_") -> Path:
    """Write frames as ``<prefix>00000.png`` ... into ``folder`` (replaced atomically when complete)."""
    import cv2

    final = Path(folder)
    with atomic_path(final) as tmp:
        tmp.mkdir(parents=True)
        for i, f in enumerate(np.asarray(frames)):
            img = f if f.ndim == 2 else cv2.cvtColor(f, cv2.COLOR_RGB2BGR)
            if not cv2.imwrite(str(tmp / f"{prefix}{i:05d}.png"), img):
                raise OSError(f"cannot write PNG frame {i} in {final}")
    return final


def content_hash(path: str | os.PathLike, *, chunk: int = 1 << 22) -> str:
    """XXH3-128 of a file's bytes, or of a folder's image files (names and bytes), as hex: the identity of an
    input in cache keys (``service.integrity.hasher``: the store's one hash, non-cryptographic). Reads
    through ``safe_io`` (regular files inside the sandbox) and stops with ``Cancelled`` between chunks."""
    from .service.integrity import hasher

    p = Path(path)
    h = hasher()
    files = list_image_sequence(p) if p.is_dir() else [p]
    for f in files:
        h.update(f.name.encode() if p.is_dir() else b"")
        with safe_io.open_regular(f, "input") as fh:
            while block := fh.read(chunk):
                h.update(block)
                safe_io.check_cancel()
    return h.hexdigest()


__all__ = [
    "Footage",
    "content_hash",
    "frame_rgb",
    "processing_size",
    "read_footage",
    "read_image_rgb",
    "write_png_sequence",
    "write_video",
]
