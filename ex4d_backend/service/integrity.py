"""Content manifests of stage results: sizes plus XXH3-128 hashes recorded at write time, checked on reuse.

``manifest(folder)`` lists every file below a stage folder (``meta.json`` itself excepted) as
``{relative path: [size in bytes, xxh3-128 hex]}``; :func:`verify` recomputes it. The hash guards against
damage (a truncated, edited or swapped file), not against an attacker who can write the store, so it is the
non-cryptographic XXH3 (``xxhash``, about 20 GB/s: a 50 MB depth in 3 ms, BLAKE2b took 55 ms). A check costs
one hashing pass the first time a process sees a file; after that the result is memoised by the
file's (device, inode, size, mtime, ctime), so reuse stays cheap and any change to a file (a write, a
truncation, a replaced file: all change ctime, which no user can set back) is hashed again.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

CHUNK = 1 << 22  # 4 MiB
_MEMO: dict[tuple, str] = {}
_MEMO_LOCK = threading.Lock()
_MEMO_MAX = 100_000


def _stamp(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_hash(path: Path, *, cancelled: Callable[[], bool] | None = None, memo: bool = True) -> str:
    """XXH3-128 of a file's bytes (:func:`hasher`, hex); ``cancelled()`` is checked between 4 MiB chunks and raises
    ``errors.Cancelled``."""
    from ..errors import Cancelled

    with open(path, "rb") as fh:
        st = os.fstat(fh.fileno())
        stamp = _stamp(st)
        if memo:
            with _MEMO_LOCK:
                if stamp in _MEMO:
                    return _MEMO[stamp]
        h = hasher()
        while block := fh.read(CHUNK):
            h.update(block)
            if cancelled is not None and cancelled():
                raise Cancelled()
    digest = h.hexdigest()
    with _MEMO_LOCK:
        if len(_MEMO) >= _MEMO_MAX:
            _MEMO.clear()
        _MEMO[stamp] = digest
    return digest


def _files(folder: Path, skip: set[str]) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.relative_to(folder).as_posix() not in skip:
                out.append(p)
    return out


def manifest(folder: Path, *, skip: set[str] | None = None) -> dict[str, list]:
    """``{relative path: [size, hash]}`` of every file below ``folder`` except ``skip``."""
    out = {}
    for p in _files(folder, skip or set()):
        out[p.relative_to(folder).as_posix()] = [p.stat().st_size, file_hash(p)]
    return out


def verify(folder: Path, files: object, *, full: bool = False) -> str | None:
    """None if every file of the manifest ``files`` is present with its size and hash, else what is wrong.
    ``full``: hash again even what this process already checked (``force``)."""
    if not isinstance(files, dict) or not files:
        return "no content manifest (written by an older version)"
    for rel, entry in files.items():
        if not (isinstance(rel, str) and isinstance(entry, list) and len(entry) == 2):
            return "the manifest is malformed"
        if rel.startswith("/") or ".." in Path(rel).parts:
            return f"the manifest names a file outside the folder: {rel[:100]}"
        p = folder / rel
        try:
            size = p.stat().st_size
        except OSError:
            return f"{rel} is missing"
        if size != entry[0]:
            return f"{rel} has {size} bytes instead of {entry[0]}"
    for rel, entry in files.items():
        try:
            digest = file_hash(folder / rel, memo=not full)
        except OSError as exc:
            return f"{rel} cannot be read: {exc}"
        if digest != entry[1]:
            return f"{rel} does not have the content written (hash mismatch)"
    return None


__all__ = ["file_hash", "hasher", "manifest", "remember", "verify"]


def hasher():
    """A new XXH3-128 hash object (``update``, ``hexdigest``): what :func:`file_hash` computes, for writers
    that hash as they write."""
    import xxhash

    return xxhash.xxh3_128()


def remember(path: Path, digest: str) -> None:
    """Record ``digest`` (from :func:`hasher` over exactly the bytes just written) as ``path``'s hash, so the
    manifest of a new stage folder need not read the file again. Memoised like :func:`file_hash`, by the
    file's (device, inode, size, mtime, ctime): any later change to the file is hashed again."""
    stamp = _stamp(os.stat(path))
    with _MEMO_LOCK:
        if len(_MEMO) >= _MEMO_MAX:
            _MEMO.clear()
        _MEMO[stamp] = digest
