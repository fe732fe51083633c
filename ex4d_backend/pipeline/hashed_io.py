"""Writing a stage's files and hashing the very bytes written, in one pass (no re-read for the manifest).

Every file a stage writes into its temporary folder goes through :func:`write_hashed` or
:func:`save_npy_hashed`: the file is created new (never over an existing one), the bytes written are
hashed (XXH3-128, ``service.integrity.hasher``) while they are written, and the digest is recorded
(``integrity.remember``), so ``JobStore.write_stage``'s content manifest costs a ``stat`` per file instead
of a second read. The manifest is the same as a fresh hash of the files would give.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..service import integrity

BLOCK = 1 << 24  # 16 MiB: write and hash in blocks (both release the GIL)


def worker_count() -> int:
    """Threads for encoding and writing a stage's files: the machine's cores (zlib, swscale, x264 and
    hashlib release the GIL)."""
    return max(2, min(32, os.cpu_count() or 1))


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]


def write_hashed(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to the new file ``path`` (O_EXCL) and record its hash."""
    view = memoryview(data).cast("B")
    h = integrity.hasher()
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        for start in range(0, len(view), BLOCK):
            block = view[start : start + BLOCK]
            _write_all(fd, block)
            h.update(block)
    finally:
        os.close(fd)
    integrity.remember(path, h.hexdigest())


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header ``np.save`` writes for a C-ordered array of ``dtype`` and ``shape``."""
    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    np.lib.format.write_array_header_1_0(buf, header)  # public API (numpy 1.26 .. 2.x); np.save's 1.0 header
    return buf.getvalue()


def save_npy_hashed(path: Path, arr: np.ndarray) -> None:
    """``np.save(path, arr)``, byte for byte, hashing the bytes on a second thread while they are written.

    ``arr``: any array (made C-contiguous first when it is not); ``path`` must not exist."""
    arr = np.ascontiguousarray(arr)
    head = npy_header(arr.dtype, arr.shape)
    data = memoryview(arr.reshape(-1).view(np.uint8))

    def digest() -> str:
        h = integrity.hasher()
        h.update(head)
        for start in range(0, len(data), BLOCK):
            h.update(data[start : start + BLOCK])
        return h.hexdigest()

    with ThreadPoolExecutor(1) as pool:
        hashed = pool.submit(digest)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            _write_all(fd, memoryview(head))
            for start in range(0, len(data), BLOCK):
                _write_all(fd, data[start : start + BLOCK])
        finally:
            os.close(fd)
        integrity.remember(path, hashed.result())
