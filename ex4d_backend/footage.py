"""Footage I/O: read a video or an image-sequence folder into RGB frames; write videos and PNGs.

Conventions: frames are ``uint8`` arrays of shape (T, H, W, 3), RGB, rows top-down. Videos are
decoded with PyAV (FFmpeg), so any container/codec FFmpeg reads works (mp4, mov, mkv, constant or
variable frame rate: variable-rate footage is read frame by frame and its average rate is reported).
Image sequences are PNG/JPEG (8 or 16 bit) or OpenEXR (linear light, converted to sRGB).
Like the reference, the long side is capped at 1024 px (area resampling) and the first N frames are
used. Processing sizes are kept even so every frame can be encoded as yuv420p H.264.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .errors import NOT_FOUND, Ex4dError

VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mxf"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".exr"}
DEFAULT_MAX_SIDE = 1024  # the reference caps the long side at 1024 px
DEFAULT_SEQUENCE_FPS = 24.0


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
    if not p.exists():
        raise Ex4dError(f"footage not found: {p}", where=str(p), hint="check the path", code=NOT_FOUND)
    if p.is_dir():
        frames, src_fps, total = _read_sequence(p, max_frames)
    elif p.suffix.lower() in IMAGE_SUFFIXES:
        raise Ex4dError(
            "a single image is not footage", where=str(p), hint="pass the folder that holds the image sequence"
        )
    else:
        frames, src_fps, total = _read_video(p, max_frames)
    if len(frames) == 0:
        raise Ex4dError("the footage has no frames", where=str(p), hint="check the file plays in a video player")
    src_h, src_w = frames[0].shape[:2]
    w, h = processing_size(src_w, src_h, max_side)
    if (w, h) != (src_w, src_h):
        import cv2

        interp = cv2.INTER_AREA if w < src_w else cv2.INTER_LINEAR
        frames = [cv2.resize(f, (w, h), interpolation=interp) for f in frames]
    return Footage(
        frames=np.ascontiguousarray(np.stack(frames)),
        fps=float(fps or src_fps),
        source_size=(src_w, src_h),
        total_frames=total,
        path=p,
    )


def _read_video(p: Path, max_frames: int | None) -> tuple[list[np.ndarray], float, int]:
    import av

    try:
        container = av.open(str(p))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise Ex4dError(
            f"cannot open the video: {exc}",
            where=str(p),
            hint="the file is not a video FFmpeg can read (corrupt or unsupported); re-export it as mp4/mov",
        ) from None
    with container:
        if not container.streams.video:
            raise Ex4dError("the file has no video stream", where=str(p), hint="pass a video file")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or Fraction(DEFAULT_SEQUENCE_FPS)
        frames: list[np.ndarray] = []
        times: list[Fraction] = []  # presentation times (s) of the decoded frames, when known
        tick = Fraction(0)  # their time base (s)
        try:
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
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


def _count_video_packets(p: Path) -> int:
    """Frames in the first video stream, counted from its packets (demuxed, not decoded)."""
    import av

    try:
        with av.open(str(p)) as container:
            return sum(1 for packet in container.demux(video=0) if packet.size)
    except av.error.FFmpegError:
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


def _read_sequence(folder: Path, max_frames: int | None) -> tuple[list[np.ndarray], float, int]:
    files = list_image_sequence(folder)
    if not files:
        raise Ex4dError(
            "the folder holds no PNG, JPEG or EXR frames", where=str(folder), hint="point at the image-sequence folder"
        )
    total = len(files)
    if max_frames:
        files = files[:max_frames]
    frames = [read_image_rgb(f) for f in files]
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise Ex4dError(
            f"the frames of the sequence differ in size: {sorted(shapes)}",
            where=str(folder),
            hint="all frames of a sequence must have the same resolution",
        )
    return frames, DEFAULT_SEQUENCE_FPS, total


def read_image_rgb(path: Path) -> np.ndarray:
    """One frame as uint8 RGB. 16-bit PNGs are scaled to 8 bit; EXR (linear) is encoded to sRGB."""
    if path.suffix.lower() == ".exr":
        data = read_exr(path)
        if data.ndim == 2:
            data = np.repeat(data[..., None], 3, axis=2)
        rgb = linear_to_srgb(np.clip(data[..., :3], 0.0, 1.0))
        return (rgb * 255.0 + 0.5).astype(np.uint8)
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise Ex4dError("cannot read the image", where=str(path), hint="the file is corrupt or not an image")
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = cv2.cvtColor(img[..., :3], cv2.COLOR_BGR2RGB)
    if img.dtype == np.uint16:
        img = (img.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    return img


def read_exr(path: Path) -> np.ndarray:
    """The first part of an EXR as float32: (H, W) for one channel, (H, W, C) for RGB(A)."""
    import OpenEXR

    try:
        with OpenEXR.File(str(path)) as f:
            channels = f.channels()
            if "RGBA" in channels:
                arr = channels["RGBA"].pixels
            elif "RGB" in channels:
                arr = channels["RGB"].pixels
            else:
                # Depth-like files: Z, Y, depth.V, R ... take a sensible single channel.
                for name in ("Z", "depth", "Y", "R", "V"):
                    if name in channels:
                        arr = channels[name].pixels
                        break
                else:
                    arr = next(iter(channels.values())).pixels
            return np.asarray(arr, dtype=np.float32)
    except Ex4dError:
        raise
    except Exception as exc:  # OpenEXR raises plain exceptions for corrupt files
        raise Ex4dError(f"cannot read the EXR file: {exc}", where=str(path), hint="the file is corrupt") from None


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

    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = np.repeat(frames[..., None], 3, axis=3)
    if frames.dtype != np.uint8:
        raise ValueError("write_video expects uint8 frames")
    _, h, w, _ = frames.shape
    pad_h, pad_w = h % 2, w % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    final = Path(path)
    rate = Fraction(fps).limit_denominator(1001)
    with atomic_path(final) as tmp:
        with av.open(str(tmp), mode="w") as out:
            stream = out.add_stream("libx264", rate=rate)
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf), "preset": preset}
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


def content_hash(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, or of a folder's image files (names and bytes), as hex."""
    p = Path(path)
    h = hashlib.sha256()
    files = list_image_sequence(p) if p.is_dir() else [p]
    for f in files:
        h.update(f.name.encode() if p.is_dir() else b"")
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


__all__ = [
    "Footage",
    "content_hash",
    "processing_size",
    "read_footage",
    "read_image_rgb",
    "write_png_sequence",
    "write_video",
]
