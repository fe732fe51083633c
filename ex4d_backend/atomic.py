"""Write outputs under a temporary name and rename them into place only when complete.

A crash, a cancel or an error therefore never leaves a half-written file or folder at the final
path, and never deletes what the user already had there until the new result is complete.

Temporary names carry their writer (``.<stem>.partial-<host tag>-<pid>-<random><suffix>``), so a clean-up
can tell the leftovers of a dead process from the work in progress of a live one (another ``ex4d serve``
on the same store). :func:`atomic_group` renames several outputs together (all or nothing).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

HOST_TAG = hashlib.sha1(socket.gethostname().encode(errors="replace")).hexdigest()[:8]
_PARTIAL = re.compile(r"\.partial-([0-9a-f]{8})-([0-9]+)-[0-9a-f]{8}")


def temp_sibling(path: Path) -> Path:
    """A hidden temporary name next to ``path`` (same folder, so the rename is atomic on one file system)
    that keeps the suffix, so libraries that choose a format by extension (PyAV, OpenCV) still do the right
    thing, and names its writer (this host and process)."""
    return path.with_name(f".{path.stem}.partial-{HOST_TAG}-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")


_temp_sibling = temp_sibling  # old name


def partial_owner(name: str) -> tuple[str, int] | None:
    """(host tag, pid) of the writer of a temporary name made by :func:`temp_sibling`; None for a name
    without one (written by an older version)."""
    m = _PARTIAL.search(name)
    return (m.group(1), int(m.group(2))) if m else None


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path`` (file or folder).

    On an exception the temporary is removed and ``path`` is left exactly as it was.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(final)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to {tmp}")
        replace(tmp, final)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


class AtomicGroup:
    """Temporary names for several outputs that are renamed into place together (see :func:`atomic_group`)."""

    def __init__(self) -> None:
        self.pairs: list[tuple[Path, Path]] = []  # (temporary, final)

    def path(self, final: str | os.PathLike) -> Path:
        """The temporary path to write ``final`` to."""
        final = Path(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_sibling(final)
        self.pairs.append((tmp, final))
        return tmp

    def final(self, tmp: str | os.PathLike) -> Path:
        """The final path of a temporary made by :meth:`path`."""
        return next(f for t, f in self.pairs if t == Path(tmp))

    def _commit(self) -> None:
        for tmp, _ in self.pairs:
            if not tmp.exists():
                raise FileNotFoundError(f"nothing was written to {tmp}")
        # Move every existing output aside first, then rename the new ones in; on any failure put the old
        # ones back, so the set on disk is either all old or all new.
        aside: list[tuple[Path, Path]] = []
        done: list[Path] = []
        try:
            for _, final in self.pairs:
                if final.exists() or final.is_symlink():
                    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
                    os.replace(final, old)
                    aside.append((old, final))
            for tmp, final in self.pairs:
                os.replace(tmp, final)
                done.append(final)
        except BaseException:
            for final in done:
                _remove(final)
            for old, final in aside:
                os.replace(old, final)
            raise
        for old, _ in aside:
            _remove(old)


@contextlib.contextmanager
def atomic_group() -> Iterator[AtomicGroup]:
    """All-or-nothing output sets: ``with atomic_group() as g: write(g.path(a)); write(g.path(b))`` leaves
    either every new file at its final path or (after an error, a full disk, a kill before the commit) none,
    with the files that were there before untouched."""
    group = AtomicGroup()
    try:
        yield group
        group._commit()
    finally:
        for tmp, _ in group.pairs:
            if tmp.exists() or tmp.is_symlink():
                _remove(tmp)


def replace(src: Path, dst: Path) -> None:
    """Move ``src`` onto ``dst``. A file replaces atomically; a folder replaces the old folder
    only after the new one is complete (old one moved aside, then removed)."""
    if src.is_dir() and dst.exists():
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dst, old)
        try:
            os.replace(src, dst)
        except BaseException:
            os.replace(old, dst)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
