"""Frames streamed through disk: lazy readers of guide videos / PNG folders and frame-by-frame writers.

Long shots never sit in memory as a whole: :class:`FrameReader` decodes a video (PyAV) or reads a
PNG/JPEG/EXR folder in increasing frame order, keeps only the frames still needed (a caller drops
what it is done with) and can shrink each frame as it is read (``transform``, e.g. the resize to the
generation size), so a window of 49 frames of a 4K guide costs 49 generation-size frames.
:class:`ResultWriter` writes an mp4 and/or a PNG folder one frame at a time under temporary names
and renames them into place only when the whole result is complete (all or nothing, as
:func:`~ex4d_backend.generation.write_outputs`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np

from ..errors import NOT_FOUND, Ex4dError
from ..footage import DEFAULT_SEQUENCE_FPS, IMAGE_SUFFIXES, frame_rgb, list_image_sequence, read_image_rgb

Transform = Callable[[np.ndarray], np.ndarray]


class FrameReader:
    """Frames of a video file or an image-sequence folder, read lazily and in increasing order.

    ``frames(start, stop)`` returns frames ``[start, stop)`` stacked (after ``transform``); indices
    may only move forward: ``release(before)`` forgets frames below ``before`` and asking for one
    again is an error. ``channel0`` keeps only the first channel (mask videos: (H, W) uint8).
    """

    def __init__(self, path: str | os.PathLike, *, transform: Transform | None = None, channel0: bool = False):
        self.path = Path(path)
        if not self.path.exists():
            raise Ex4dError(f"guide not found: {self.path}", where=str(self.path), code=NOT_FOUND)
        self.transform, self.channel0 = transform, channel0
        self._buf: dict[int, np.ndarray] = {}
        self._next = 0  # next frame index the decoder yields
        self._low = 0  # frames below this were released
        self._container = self._decoder = None
        if self.path.is_dir():
            self._files = list_image_sequence(self.path)
            if not self._files:
                raise Ex4dError("the folder holds no PNG, JPEG or EXR frames", where=str(self.path))
            self.n_frames, self.fps = len(self._files), DEFAULT_SEQUENCE_FPS
            self.size = _size_of(read_image_rgb(self._files[0]))
        elif self.path.suffix.lower() in IMAGE_SUFFIXES:
            raise Ex4dError("a single image is not a guide", where=str(self.path), hint="pass the video or folder")
        else:
            self._files = None
            self.n_frames, self.fps, self.size = _probe_video(self.path)

    # -- reading -------------------------------------------------------------------------------
    def _decode(self) -> Iterator[np.ndarray]:
        import av

        self._container = av.open(str(self.path))
        for frame in self._container.decode(self._container.streams.video[0]):
            yield frame_rgb(frame)

    def _prepare(self, img: np.ndarray) -> np.ndarray:
        if self.channel0:
            img = np.ascontiguousarray(img[..., 0])
        return self.transform(img) if self.transform else img

    def frame(self, i: int) -> np.ndarray:
        if not 0 <= i < self.n_frames:
            raise IndexError(f"frame {i} of {self.n_frames}")
        if i < self._low:
            raise ValueError(f"frame {i} was released (reader is at {self._low})")
        if i in self._buf:
            return self._buf[i]
        if self._files is not None:
            self._buf[i] = self._prepare(read_image_rgb(self._files[i]))
            return self._buf[i]
        if self._decoder is None:
            self._decoder = self._decode()
        while self._next <= i:
            try:
                img = next(self._decoder)
            except StopIteration:
                raise Ex4dError(
                    f"the video ended after {self._next} frames, expected {self.n_frames}",
                    where=str(self.path),
                    hint="the file is truncated; render the guide again",
                ) from None
            if self._next >= self._low:
                self._buf[self._next] = self._prepare(img)
            self._next += 1
        return self._buf[i]

    def frames(self, start: int, stop: int) -> np.ndarray:
        return np.stack([self.frame(i) for i in range(start, stop)])

    def take(self, indices) -> np.ndarray:
        return np.stack([self.frame(int(i)) for i in indices])

    def release(self, before: int) -> None:
        """Forget every frame below ``before``."""
        self._low = max(self._low, before)
        for k in [k for k in self._buf if k < self._low]:
            del self._buf[k]

    def close(self) -> None:
        self._buf.clear()
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None
        if self._container is not None:
            self._container.close()
            self._container = None

    def __enter__(self) -> FrameReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _size_of(img: np.ndarray) -> tuple[int, int]:
    return int(img.shape[1]), int(img.shape[0])


def _probe_video(path: Path) -> tuple[int, float, tuple[int, int]]:
    """(frame count from the demuxed packets, frame rate, (width, height)) without decoding."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise Ex4dError("the file has no video stream", where=str(path))
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or Fraction(DEFAULT_SEQUENCE_FPS)
            size = (int(stream.codec_context.width), int(stream.codec_context.height))
            n = sum(1 for packet in container.demux(video=0) if packet.size)
    except av.error.FFmpegError as exc:
        raise Ex4dError(f"cannot open the video: {exc}", where=str(path), hint="re-export it as mp4") from None
    if n == 0:
        raise Ex4dError("the video has no frames", where=str(path))
    return n, float(rate), size


class ResultWriter:
    """Write frames one at a time into an mp4 (H.264 yuv420p, ``crf``) and/or a PNG folder
    (``frame_00000.png`` ...). Use as a context manager: on a clean exit the results are renamed into
    place (the PNG folder first, then the video); on an exception nothing appears at the final paths.

    ``background`` (default) encodes and writes on a worker thread (a queue of at most
    ``queue_frames`` frames, so memory stays bounded) while the caller computes the next frames; a
    write error is raised by the next :meth:`write` or on exit."""

    def __init__(self, video=None, frames_dir=None, *, fps: float, crf: int = 12, background: bool = True,
                 queue_frames: int = 4):  # fmt: skip
        self.video = Path(video) if video else None
        self.frames_dir = Path(frames_dir) if frames_dir else None
        self.fps, self.crf = fps, crf
        self.count = 0  # frames handed to write()
        self._written = 0  # frames written to disk
        self._stack = contextlib.ExitStack()
        self._av = self._stream = None
        self._background, self._queue_frames = background and (video or frames_dir), queue_frames
        self._queue = self._thread = self._error = None

    def __enter__(self) -> ResultWriter:
        import queue
        import threading

        from ..atomic import atomic_path

        try:
            if self.video is not None:
                self._tmp_video = self._stack.enter_context(atomic_path(self.video))
            if self.frames_dir is not None:
                self._tmp_dir = self._stack.enter_context(atomic_path(self.frames_dir))
                self._tmp_dir.mkdir(parents=True)
        except BaseException:
            self._stack.close()
            raise
        if self._background:
            self._queue = queue.Queue(maxsize=self._queue_frames)
            self._thread = threading.Thread(target=self._work, name="ex4d-result-writer", daemon=True)
            self._thread.start()
        return self

    def write(self, frame: np.ndarray) -> None:
        """One uint8 (H, W, 3) RGB frame."""
        if self._error is not None:
            raise self._error
        if self._queue is not None:
            self._queue.put(np.array(frame, dtype=np.uint8, copy=True))
        else:
            self._write_now(np.ascontiguousarray(frame))
        self.count += 1

    def _work(self) -> None:
        while (frame := self._queue.get()) is not None:
            if self._error is None:  # after an error: keep draining so write() never blocks
                try:
                    self._write_now(frame)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    self._error = exc

    def _stop_worker(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _write_now(self, frame: np.ndarray) -> None:
        import cv2

        if self.frames_dir is not None:
            if not cv2.imwrite(str(self._tmp_dir / f"frame_{self._written:05d}.png"), frame[..., ::-1]):
                raise OSError(f"cannot write PNG frame {self._written} in {self.frames_dir}")
        if self.video is not None:
            self._encode(frame)
        self._written += 1

    def _encode(self, frame: np.ndarray) -> None:
        import av

        h, w = frame.shape[:2]
        if h % 2 or w % 2:  # yuv420p needs even sizes: repeat the last row / column
            frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        if self._av is None:
            self._av = av.open(str(self._tmp_video), mode="w")
            self._stream = self._av.add_stream("libx264", rate=Fraction(self.fps).limit_denominator(1001))
            self._stream.width, self._stream.height = frame.shape[1], frame.shape[0]
            self._stream.pix_fmt = "yuv420p"
            self._stream.options = {"crf": str(self.crf), "preset": "medium"}
        for packet in self._stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            self._av.mux(packet)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop_worker()
        if exc_type is None and self._error is not None:
            exc_type, exc, tb = type(self._error), self._error, self._error.__traceback__
            failed = self._error
        else:
            failed = None
        if exc_type is not None:  # failed: close the encoder, remove the temporaries
            if self._av is not None:
                self._av.close()
            self._stack.__exit__(exc_type, exc, tb)
            if failed is not None:
                raise failed
            return
        with self._stack:  # complete: flush, then rename into place (an error here removes them)
            if self._av is not None:
                try:
                    for packet in self._stream.encode():
                        self._av.mux(packet)
                finally:
                    self._av.close()
            if self.count == 0:
                raise Ex4dError("no frames were written", where=str(self.video or self.frames_dir))

    def paths(self) -> dict[str, Path]:
        out = {}
        if self.video is not None:
            out["video"] = self.video
        if self.frames_dir is not None:
            out["frames"] = self.frames_dir
        return out


__all__ = ["FrameReader", "ResultWriter"]
