"""The job store: content-keyed folders for jobs and their cached stage results, plus the service log.

Layout (``<store>`` defaults to ``<user cache>/ex4d/store``)::

    <store>/cache/<stage>-<key>/   one folder per stage result (frames, depth, mesh, guide, generate),
                                   keyed by the content hash of everything it depends on; written to a
                                   temporary name and renamed when complete, so it is either whole or absent
    <store>/jobs/<type>-<key>/     job.json (the job definition, runnable with ``ex4d run``),
                                   state.json (queued / running / done / failed / cancelled / interrupted),
                                   result.json (the result event's payload, when done)
    <store>/logs/service.log       rotating log (1 MiB, plus 3 older files service.log.1 .. .3)

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
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..atomic import atomic_path, write_bytes
from ..errors import NOT_FOUND, Ex4dError
from .protocol import FORBIDDEN_PATH

log = logging.getLogger("ex4d_backend.service")

LOG_NAME = "service.log"
LOG_MAX_BYTES = 1 << 20
LOG_BACKUPS = 3
FINISHED_STATES = ("done", "failed", "cancelled", "interrupted")
META = "meta.json"  # written last into every stage folder


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
        for sub in ("cache", "jobs", "logs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        if allowed is None:
            allowed = [Path.home(), Path.cwd()]
        self.allowed = [Path(a).expanduser().resolve() for a in allowed]
        self._hashes: dict[tuple, str] = {}
        self._lock = threading.Lock()

    # -- inputs -------------------------------------------------------------------------------
    def check_input(self, path: str | os.PathLike, what: str = "input") -> Path:
        """The resolved path of an input; it must exist and lie inside an allowed folder or the store."""
        try:
            p = Path(path).expanduser()
            resolved = p.resolve()
        except (OSError, ValueError, RuntimeError) as exc:
            raise Ex4dError(f"unusable {what} path: {exc}", where=str(path)[:300]) from None
        self._check_inside(resolved, what, str(path))
        if not resolved.exists():
            raise Ex4dError(f"the {what} does not exist", where=str(path)[:300], hint="check the path", code=NOT_FOUND)
        if resolved.is_dir():  # an image sequence: each of its files must be inside too (symlinks)
            for entry in resolved.iterdir():
                if entry.is_symlink():
                    self._check_inside(entry.resolve(), what, str(entry))
        return resolved

    def _check_inside(self, resolved: Path, what: str, where: str) -> None:
        roots = [*self.allowed, self.root]
        if not any(resolved == r or resolved.is_relative_to(r) for r in roots):
            raise Ex4dError(
                f"the {what} lies outside the allowed folders",
                where=where[:300],
                hint="start the service with `ex4d serve --allow FOLDER` for the folder that holds it",
                code=FORBIDDEN_PATH,
            )

    def input_hash(self, path: Path) -> str:
        """Content hash of an input file or image-sequence folder (memoised by size and mtime)."""
        from ..footage import content_hash, list_image_sequence

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

    def stage_meta(self, stage: str, key: str) -> dict | None:
        """The stage's meta.json if the stage result is complete, else None."""
        return read_json(self.stage_dir(stage, key) / META)

    @contextlib.contextmanager
    def write_stage(self, stage: str, key: str, meta: dict) -> Iterator[Path]:
        """Yield a temporary folder to fill; on success ``meta.json`` is added and the folder renamed
        into place (replacing an older result only once the new one is complete)."""
        with atomic_path(self.stage_dir(stage, key)) as tmp:
            tmp.mkdir(parents=True)
            yield tmp
            _test_write_delay()
            write_json(tmp / META, meta)

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
        """A previous result whose files all still exist, else None."""
        result = read_json(job_dir / "result.json")
        if result is None:
            return None
        for name, value in result.items():
            if name.endswith(("_npy", "_pc2", "_mp4", "_npz", "_dir")) and isinstance(value, str):
                if not Path(value).exists():
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
        """Remove temporary siblings that a killed process left behind (never complete results), and
        put back a previous result that a process killed in the middle of a replace had moved aside
        (``atomic.replace`` renames the old folder to ``.<name>.old-<id>`` just before the new one)."""
        n = 0
        for pattern in ("cache/.*.partial-*", "jobs/.*.partial-*", "jobs/*/.*.partial-*"):
            for p in self.root.glob(pattern):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                n += 1
        for p in self.root.glob("cache/.*.old-*"):
            final = p.with_name(p.name[1:].rsplit(".old-", 1)[0])
            if final.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.replace(p, final)
                log.warning("restored %s, which an interrupted replace had moved aside", final.name)
            n += 1
        return n

    # -- log ----------------------------------------------------------------------------------
    def log_handler(self) -> logging.Handler:
        handler = logging.handlers.RotatingFileHandler(
            self.root / "logs" / LOG_NAME, maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS, encoding="utf-8"
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


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _test_write_delay() -> None:
    """Test hook: ``EX4D_SERVICE_WRITE_DELAY`` seconds of sleep inside every stage write (lets the tests
    kill the backend while a result is half written). Never set it in production."""
    delay = os.environ.get("EX4D_SERVICE_WRITE_DELAY")
    if delay:
        time.sleep(float(delay))
