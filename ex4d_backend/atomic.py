"""Write outputs under a temporary name and rename them into place only when complete.

A crash, a cancel or an error therefore never leaves a half-written file or folder at the final
path, and never deletes what the user already had there until the new result is complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def _temp_sibling(path: Path) -> Path:
    # Same folder (so the rename is atomic on one file system), hidden, and keeps the suffix so
    # libraries that choose a format by extension (PyAV, OpenCV) still do the right thing.
    return path.with_name(f".{path.stem}.partial-{uuid.uuid4().hex[:8]}{path.suffix}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path`` (file or folder).

    On an exception the temporary is removed and ``path`` is left exactly as it was.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(final)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to {tmp}")
        replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()


def replace(src: Path, dst: Path) -> None:
    """Move ``src`` onto ``dst``. A file replaces atomically; a folder replaces the old folder
    only after the new one is complete (old one moved aside, then removed)."""
    if src.is_dir() and dst.exists():
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
