"""The job store: content-keyed folders for jobs and their cached stage results, plus the service log.

Layout (``<store>`` defaults to ``<user cache>/ex4d/store``)::

    <store>/cache/<stage>-<key>/   one folder per stage result (frames, depth, mesh, guide, generate),
                                   keyed by the content hash of everything it depends on; written to a
                                   temporary name and renamed when complete, so it is either whole or absent
    <store>/jobs/<type>-<key>/     job.json (the job definition, runnable with ``ex4d run``),
                                   state.json (queued / running / done / failed / cancelled / interrupted),
                                   result.json (the result event's payload, when done)
    <store>/logs/service.log       rotating log (1 MiB, plus 3 older files service.log.1 .. .3)
    <store>/locks/<stage>-<key>.lock   per-stage locks (``stage_lock``; see ``locks.py``)

Every stage folder's ``meta.json`` records a content manifest (sizes and hashes of its files,
``integrity.py``); ``stage_meta`` checks it on every reuse and discards a damaged result, so it is
computed again. Several processes (two ``ex4d serve``, farm workers) may share one store: stage locks
keep one result from being computed twice, commits of one stage never race, and start-up clean-up
removes only the temporary folders of processes that are dead.

Footage-level stages (frames, depth, DW-mesh) are keyed only by the footage and their own settings, so
a camera change reuses them. Jobs left ``queued``/``running`` by a process that died are marked
``interrupted`` when the store is opened again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import logging.handlers
import os
import shutil
import stat
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .. import safe_io
from ..atomic import HOST_TAG, partial_owner, replace, temp_sibling, write_bytes
from ..errors import IO_ERROR, NOT_FOUND, Ex4dError, disk_full_error, is_disk_full
from . import integrity, locks
from .protocol import FORBIDDEN_PATH

log = logging.getLogger("ex4d_backend.service")

LOG_NAME = "service.log"
LOG_MAX_BYTES = 1 << 20
LOG_BACKUPS = 3
FINISHED_STATES = ("done", "failed", "cancelled", "interrupted")
META = "meta.json"  # written last into every stage folder
WRITER = ".writer.json"  # the writing process, inside a stage folder being written (removed at commit)
COMMIT = "commit"  # lock name of a stage folder's rename into place
FOREIGN_PARTIAL_AGE = 24 * 3600.0  # a temporary of another host is removed only when this old (s)
OLD_PARTIAL_AGE = 600.0  # a temporary without a writer tag (older versions) is removed when this old (s)


def default_store() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "ex4d" / "store"


def make_key(*parts: object) -> str:
    """A short, stable hash of JSON-able parts (20 hex chars = 80 bits)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def write_json(path: Path, data: object) -> None:
    write_bytes(path, (json.dumps(data, indent=1, sort_keys=True, allow_nan=False) + "\n").encode())


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class JobStore:
    """Job folders, stage caches, input checks and the log of one store folder."""

    def __init__(self, root: str | os.PathLike | None = None, allowed: Iterable[str | os.PathLike] | None = None):
        self.root = Path(root or default_store()).expanduser().resolve()
        for sub in ("cache", "jobs", "logs", "locks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        if allowed is None:
            allowed = [Path.home(), Path.cwd()]
        self.allowed = [Path(a).expanduser().resolve() for a in allowed]
        self._hashes: dict[tuple, str] = {}
        self._lock = threading.Lock()

    # -- inputs -------------------------------------------------------------------------------
    def read_roots(self) -> list[Path]:
        """The folders inputs may be read from: the allowed folders and the store."""
        return [*self.allowed, self.root]

    def check_input(self, path: str | os.PathLike, what: str = "input") -> Path:
        """The resolved path of an input; it must exist, lie inside an allowed folder or the store, and be a
        regular file or a folder (an image sequence; each of its files must be inside too). FIFOs, devices
        and sockets are refused here, before anything reads them. The readers check again on the handle
        they read through (``safe_io``), so swapping the file afterwards gains nothing."""
        try:
            p = Path(path).expanduser()
            resolved = p.resolve()
        except (OSError, ValueError, RuntimeError) as exc:
            raise Ex4dError(f"unusable {what} path: {exc}", where=_where(path)) from None
        self._check_inside(resolved, what, _where(path))
        try:
            st = resolved.stat()
        except FileNotFoundError:
            raise Ex4dError(
                f"the {what} does not exist", where=_where(path), hint="check the path", code=NOT_FOUND
            ) from None
        except OSError as exc:  # a name component too long, a loop, no permission
            raise Ex4dError(f"unusable {what} path: {exc.strerror or exc}", where=_where(path)) from None
        if stat.S_ISDIR(st.st_mode):
            for entry in resolved.iterdir():
                if entry.is_symlink():
                    self._check_inside(entry.resolve(), what, str(entry))
                est = entry.stat() if entry.exists() else None
                if est is not None and not (stat.S_ISREG(est.st_mode) or stat.S_ISDIR(est.st_mode)):
                    raise safe_io.special_file_error(est.st_mode, what, str(entry))
        elif not stat.S_ISREG(st.st_mode):
            raise safe_io.special_file_error(st.st_mode, what, _where(path))
        return resolved

    def _check_inside(self, resolved: Path, what: str, where: str) -> None:
        if not safe_io.inside(resolved, self.read_roots()):
            raise Ex4dError(
                f"the {what} lies outside the allowed folders",
                where=where[:300],
                hint="start the service with `ex4d serve --allow FOLDER` for the folder that holds it",
                code=FORBIDDEN_PATH,
            )

    def input_hash(self, path: Path) -> str:
        """Content hash of an input file or image-sequence folder (memoised by size and mtime). Read through
        ``safe_io`` inside this store's allowed folders; stops with ``Cancelled`` between chunks when the
        current task is cancelled."""
        from ..footage import content_hash, list_image_sequence

        with safe_io.sandbox(self.read_roots(), safe_io.current_cancel()):
            files = list_image_sequence(path) if path.is_dir() else [path]
            stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
            key = (str(path), stamp)
            with self._lock:
                if key in self._hashes:
                    return self._hashes[key]
            if path.is_dir() and not files:
                digest = make_key("folder", str(path), sorted(x.name for x in path.iterdir()))
            else:
                digest = content_hash(path)
        with self._lock:
            self._hashes[key] = digest
        return digest

    # -- stage results ------------------------------------------------------------------------
    def stage_dir(self, stage: str, key: str) -> Path:
        return self.root / "cache" / f"{stage}-{key}"

    def stage_lock(
        self,
        stage: str,
        key: str,
        *,
        stale_after: float = 30.0,
        poll: float = 0.1,
        cancelled: Callable[[], bool] | None = None,
    ) -> contextlib.AbstractContextManager[None]:
        """Exclusive lock for computing one stage result, across processes and machines sharing the store.

        Lock file ``<root>/locks/<stage>-<key>.lock`` made with O_CREAT|O_EXCL, holding JSON {pid, host,
        token, started}; a heartbeat thread touches its mtime every stale_after/4 s while held. A lock whose
        mtime is older than stale_after, or whose owner is on this host and dead, is stale and is broken
        (renamed to a unique name, then removed). Waiting polls every ``poll`` s and raises
        ``errors.Cancelled`` when ``cancelled()`` is true. Re-entrant within one thread."""
        lock = locks.StageLock(locks.lock_path(self.root, stage, key), stale_after=stale_after, poll=poll)
        return lock.hold(cancelled if cancelled is not None else safe_io.current_cancel())

    def is_held(self, stage: str, key: str, *, stale_after: float = 30.0) -> bool:
        """A live (non-stale) lock exists for this stage result (held by any process, this one included)."""
        return locks.StageLock(locks.lock_path(self.root, stage, key), stale_after=stale_after).live()

    def stage_meta(self, stage: str, key: str, *, full: bool = False) -> dict | None:
        """The stage's meta.json if the stage result is complete and intact, else None.

        Intact: every file of the content manifest recorded at write time is present with its size and
        hash (``full``: hash again even what this process already checked). A damaged result is moved out
        of the way (logged), so the caller computes it again."""
        d = self.stage_dir(stage, key)
        meta = read_json(d / META)
        if meta is None:
            if d.exists():
                self._discard(d, "its meta.json is missing or unreadable")
            return None
        problem = integrity.verify(d, meta.get("files"), full=full)
        if problem is not None:
            self._discard(d, problem)
            return None
        return meta

    def verify_stage_dir(self, d: Path, *, full: bool = False) -> bool:
        """Whether a stage folder (by path) is complete and intact."""
        meta = read_json(d / META)
        return meta is not None and integrity.verify(d, meta.get("files"), full=full) is None

    def _discard(self, d: Path, problem: str) -> None:
        with self.stage_lock(COMMIT, d.name):
            if not d.exists():
                return
            aside = d.with_name(f".{d.name}.corrupt-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(d, aside)
            except OSError:
                return
        log.warning("the stored %s is damaged (%s): it will be computed again", d.name, problem)
        shutil.rmtree(aside, ignore_errors=True)

    @contextlib.contextmanager
    def write_stage(self, stage: str, key: str, meta: dict) -> Iterator[Path]:
        """Yield a temporary folder to fill; on success ``meta.json`` (with the content manifest of every
        file written) is added and the folder renamed into place, under the stage's commit lock (replacing
        an older result only once the new one is complete). A temporary folder that disappeared while it was
        written (removed by another process) is never committed."""
        final = self.stage_dir(stage, key)
        tmp = temp_sibling(final)
        tmp.mkdir()
        ino = tmp.stat().st_ino
        writer = {**locks.owner_record(), "token": uuid.uuid4().hex}
        _write_new(tmp / WRITER, json.dumps(writer).encode())
        try:
            yield tmp
            _test_write_delay()
            if not _same_dir(tmp, ino) or read_json(tmp / WRITER) != writer:
                raise Ex4dError(
                    f"the temporary folder of the {stage} result was removed while it was being written",
                    where=str(tmp),
                    hint="another program deleted files in the job store; run the job again",
                    code=IO_ERROR,
                )
            (tmp / WRITER).unlink()
            full_meta = {**meta, "files": integrity.manifest(tmp, skip={META})}
            body = (json.dumps(full_meta, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()
            _write_new(tmp / META, body)  # never creates the folder again
            with self.stage_lock(COMMIT, final.name):
                if not _same_dir(tmp, ino):
                    raise Ex4dError(
                        f"the temporary folder of the {stage} result was removed before it was committed",
                        where=str(tmp),
                        code=IO_ERROR,
                    )
                replace(tmp, final)
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full_error(exc, str(self.root), written=_du(tmp)) from None
            raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    # -- jobs ---------------------------------------------------------------------------------
    def job_dir(self, type_: str, key: str) -> Path:
        return self.root / "jobs" / f"{type_}-{key}"

    def set_state(self, job_dir: Path, state: str, **extra: object) -> None:
        old = read_json(job_dir / "state.json") or {}
        now = time.time()
        data = {**old, **extra, "state": state, "updated": now}
        data.setdefault("created", now)
        data["pid"] = os.getpid()
        write_json(job_dir / "state.json", data)

    def begin_job(self, type_: str, key: str, params: dict, request_id: str | None) -> Path:
        job_dir = self.job_dir(type_, key)
        job_dir.mkdir(parents=True, exist_ok=True)
        write_json(job_dir / "job.json", {"type": type_, "params": params})
        self.set_state(job_dir, "running", request_id=request_id, error=None)
        return job_dir

    def cached_result(self, job_dir: Path) -> dict | None:
        """A previous result whose files all still exist, and whose stage folders in this store are intact
        (see :meth:`stage_meta`), else None."""
        result = read_json(job_dir / "result.json")
        if result is None:
            return None
        cache = self.root / "cache"
        checked: set[Path] = set()
        for name, value in result.items():
            if name.endswith(("_npy", "_pc2", "_mp4", "_npz", "_dir")) and isinstance(value, str):
                p = Path(value)
                if not p.exists():
                    return None
                if p.parent == cache or cache not in p.parents:
                    continue
                stage_dir = cache / p.relative_to(cache).parts[0]
                if stage_dir not in checked:
                    checked.add(stage_dir)
                    stage, _, key = stage_dir.name.partition("-")
                    if self.stage_meta(stage, key) is None:
                        return None
        return result

    def finish_job(self, job_dir: Path, state: str, *, result: dict | None = None, error: dict | None = None) -> None:
        if result is not None:
            write_json(job_dir / "result.json", result)
        self.set_state(job_dir, state, error=error)

    def recover(self) -> list[dict]:
        """Mark jobs a dead process left queued/running as ``interrupted``; return them."""
        out = []
        for state_file in sorted((self.root / "jobs").glob("*/state.json")):
            state = read_json(state_file)
            if state is None or state.get("state") in FINISHED_STATES:
                continue
            if state.get("pid") != os.getpid() and not _pid_alive(state.get("pid")):
                self.set_state(state_file.parent, "interrupted", was=state.get("state"))
                out.append({"job": state_file.parent.name, "request_id": state.get("request_id")})
        return out

    def list_jobs(self, limit: int = 200) -> list[dict]:
        jobs = []
        for job_dir in (self.root / "jobs").iterdir():
            state = read_json(job_dir / "state.json")
            job = read_json(job_dir / "job.json")
            if state is None or job is None:
                continue
            jobs.append(
                {
                    "job": job_dir.name,
                    "type": job.get("type"),
                    "state": state.get("state"),
                    "created": state.get("created"),
                    "updated": state.get("updated"),
                    "request_id": state.get("request_id"),
                    "job_dir": str(job_dir),
                }
            )
        jobs.sort(key=lambda j: j.get("updated") or 0, reverse=True)
        return jobs[:limit]

    def clean_partials(self) -> int:
        """Remove temporary siblings that a dead process left behind (never complete results, never the
        work in progress of a live process, e.g. a second ``ex4d serve`` on this store), and put back a
        previous result that a process killed in the middle of a replace had moved aside
        (``atomic.replace`` renames the old folder to ``.<name>.old-<id>`` just before the new one)."""
        n = 0
        now = time.time()
        for pattern in ("cache/.*.partial-*", "jobs/.*.partial-*", "jobs/*/.*.partial-*"):
            for p in self.root.glob(pattern):
                if self._partial_alive(p, now):
                    continue
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                n += 1
        for pattern in ("cache/.*.corrupt-*", "locks/.*.broken-*"):
            for p in self.root.glob(pattern):
                if now - _mtime(p, now) > OLD_PARTIAL_AGE:
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        for p in self.root.glob("cache/.*.old-*"):
            final = p.with_name(p.name[1:].rsplit(".old-", 1)[0])
            if self.is_held(COMMIT, final.name):
                continue  # a live process is between the two renames of a replace
            with self.stage_lock(COMMIT, final.name):
                if not p.exists():
                    continue
                if final.exists():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    os.replace(p, final)
                    log.warning("restored %s, which an interrupted replace had moved aside", final.name)
            n += 1
        return n

    def _partial_alive(self, p: Path, now: float) -> bool:
        """Whether a temporary may still be written by a live process."""
        owner = partial_owner(p.name)
        if owner is None:
            return now - _mtime(p, now) < OLD_PARTIAL_AGE
        host_tag, pid = owner
        if host_tag != HOST_TAG:
            return now - _mtime(p, now) < FOREIGN_PARTIAL_AGE
        writer = read_json(p / WRITER) if p.is_dir() else None
        start = writer.get("pid_start") if writer and writer.get("pid") == pid else None
        return locks.pid_alive(pid, start)

    # -- log ----------------------------------------------------------------------------------
    def log_handler(self) -> logging.Handler:
        handler = logging.handlers.RotatingFileHandler(
            self.root / "logs" / LOG_NAME,
            maxBytes=LOG_MAX_BYTES,
            backupCount=LOG_BACKUPS,
            encoding="utf-8",
            errors="backslashreplace",  # a lone surrogate in a request never loses a log line
        )
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        return handler


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s"


class TailHandler(logging.Handler):
    """Keeps the last log lines, formatted as in the log file (first line of each record, at most 300
    characters); attached to every ``error`` event."""

    def __init__(self, n: int = 20):
        super().__init__()
        self.lines: deque[str] = deque(maxlen=n)
        self.setFormatter(logging.Formatter(LOG_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            self.lines.append(text.splitlines()[0][:300] if text else "")
        except Exception:  # noqa: BLE001 - logging must never raise
            pass

    def tail(self, n: int = 20) -> list[str]:
        return list(self.lines)[-n:]


_pid_alive = locks.pid_alive


def _du(folder: Path) -> int:
    """Bytes in the files below ``folder`` (0 if it is gone)."""
    total = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def preallocated_npy(path: Path, dtype, shape: tuple[int, ...]):
    """A writable ``np.memmap`` of a new ``.npy`` file whose every byte is allocated on disk first
    (``posix_fallocate``), so writing through the map can never hit a full disk (which would kill the
    process with SIGBUS): a full disk is an ``ENOSPC`` OSError here, before any work."""
    import numpy as np

    dtype = np.dtype(dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)  # public API (numpy 1.26 .. 2.x)
        offset = fh.tell()
        size = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        fh.flush()
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fh.fileno(), 0, size)
        else:  # no fallocate (macOS): write the zeros (slower, same guarantee)
            while fh.tell() < size:
                fh.write(b"\0" * min(1 << 24, size - fh.tell()))
    return np.lib.format.open_memmap(path, mode="r+")


def _where(path: object) -> str:
    """A path for an error message: at most 300 characters, lone surrogates escaped."""
    return str(path)[:300].encode("utf-8", "backslashreplace").decode("utf-8")


def _mtime(p: Path, default: float) -> float:
    try:
        return p.lstat().st_mtime
    except OSError:
        return default


def _same_dir(p: Path, ino: int) -> bool:
    try:
        st = p.lstat()
    except OSError:
        return False
    return st.st_ino == ino and p.is_dir()


def _write_new(path: Path, data: bytes) -> None:
    """Write a file that must not exist yet, in a folder that must exist (never created here)."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _test_write_delay() -> None:
    """Test hook: ``EX4D_SERVICE_WRITE_DELAY`` seconds of sleep inside every stage write (lets the tests
    kill the backend while a result is half written). Never set it in production."""
    delay = os.environ.get("EX4D_SERVICE_WRITE_DELAY")
    if delay:
        time.sleep(float(delay))
