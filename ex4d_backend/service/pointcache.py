"""PC2 point caches (the format of Blender's Mesh Cache modifier) for per-frame vertex positions.

Layout (little endian): ``char[12] "POINTCACHE2\\0"``, ``int32 version = 1``, ``int32 points``,
``float32 start_frame``, ``float32 sample_rate``, ``int32 samples``, then ``samples x points x 3`` float32.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np

HEADER = struct.Struct("<12siiffi")
MAGIC = b"POINTCACHE2\0"


def write_pc2(
    path: Path,
    chunks: Iterable[np.ndarray],
    n_points: int,
    n_samples: int,
    start_frame: float = 0.0,
    sample_rate: float = 1.0,
) -> None:
    """Write ``n_samples`` frames of ``n_points`` positions given as (t, n_points, 3) chunks."""
    written = 0
    with open(path, "wb") as fh:
        fh.write(HEADER.pack(MAGIC, 1, n_points, float(start_frame), float(sample_rate), n_samples))
        for chunk in chunks:
            arr = np.ascontiguousarray(chunk, dtype="<f4")
            if arr.ndim != 3 or arr.shape[1:] != (n_points, 3):
                raise ValueError(f"PC2 chunk of shape {arr.shape}, expected (t, {n_points}, 3)")
            fh.write(arr.tobytes())
            written += len(arr)
    if written != n_samples:
        raise ValueError(f"PC2 got {written} frames, {n_samples} announced")


def read_pc2(path: Path) -> tuple[np.ndarray, float, float]:
    """(positions (samples, points, 3) float32, start_frame, sample_rate)."""
    with open(path, "rb") as fh:
        magic, version, points, start, rate, samples = HEADER.unpack(fh.read(HEADER.size))
        if magic != MAGIC or version != 1:
            raise ValueError(f"{path} is not a PC2 file")
        data = np.frombuffer(fh.read(), dtype="<f4")
    return data.reshape(samples, points, 3), start, rate
