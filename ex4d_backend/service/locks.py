"""Exclusive per-stage locks in a shared job store, across threads, processes and machines.

A lock is the file ``<store>/locks/<stage>-<key>.lock``, created with ``O_CREAT | O_EXCL`` (atomic on
local file systems and on NFSv3+), holding JSON ``{pid, host, token, started, pid_start}``. While held, a
heartbeat thread touches its mtime every ``stale_after / 4`` s. A lock is *stale*, and may be broken, when
its mtime is older than ``stale_after`` (its holder stopped beating: a dead or frozen machine) or when its
owner is on this host and dead (SIGKILL, a crash: broken at once, without waiting). Breaking renames the
stale file to a unique name and checks that the renamed file is the one judged stale (same inode and
token) before deleting it, so two waiters that both see a stale lock never both take it; a live lock
taken by mistake is put back.

Within one process the lock is re-entrant for the thread that holds it (``write_stage``'s commit inside
``stage_lock`` of the same stage); another thread of the same process waits like another process does.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import Cancelled, Ex4dError

HOST = socket.gethostname()
_LOCAL = threading.Lock()
_HELD: dict[str, tuple[int, int, str]] = {}  # lock path -> (thread id, depth, token) held by this process


def _proc_start(pid: int) -> str | None:
    """The start time of a process (clock ticks since boot, field 22 of /proc/<pid>/stat), where known:
    a pid reused by a new process then no longer counts as the lock's owner."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


_SELF_START = _proc_start(os.getpid())


def pid_alive(pid: object, start: object = None) -> bool:
    """Whether process ``pid`` of this host runs (and, if ``start`` is given and knowable, is the same process)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        pass
    if isinstance(start, str):
        now = _proc_start(pid)
        if now is not None and now != start:
            return False
    return True


def owner_record() -> dict:
    """Who holds a lock or writes a partial result: this process on this host."""
    return {"pid": os.getpid(), "host": HOST, "pid_start": _SELF_START}


def owner_dead(owner: dict | None) -> bool:
    """True only when ``owner`` is known to be a process of this host that no longer runs."""
    if not isinstance(owner, dict) or owner.get("host") != HOST:
        return False
    return not pid_alive(owner.get("pid"), owner.get("pid_start"))


def _read(path: Path) -> tuple[dict | None, os.stat_result | None]:
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            data = fh.read(4096)
    except OSError:
        return None, None
    try:
        info = json.loads(data)
    except ValueError:
        info = None
    return (info if isinstance(info, dict) else None), st


def is_stale(info: dict | None, st: os.stat_result, stale_after: float, now: float | None = None) -> bool:
    """A lock file's holder stopped beating (mtime too old) or is a dead process of this host."""
    age = (time.time() if now is None else now) - st.st_mtime
    if age > stale_after:
        return True
    return info is not None and owner_dead(info)  # an empty file: a holder between create and write


class StageLock:
    """One lock file; see the module docstring. Use :meth:`hold` as a context manager."""

    def __init__(self, path: Path, *, stale_after: float = 30.0, poll: float = 0.1):
        if stale_after <= 0 or poll <= 0:
            raise ValueError("stale_after and poll must be positive")
        self.path = path
        self.stale_after = float(stale_after)
        self.poll = float(poll)

    # -- state --------------------------------------------------------------------------------
    def live(self) -> bool:
        """A live (non-stale) lock exists (held by anyone, this process included)."""
        info, st = _read(self.path)
        return st is not None and not is_stale(info, st, self.stale_after)

    # -- acquire / release --------------------------------------------------------------------
    def _try_create(self, token: str) -> bool:
        record = {**owner_record(), "token": token, "started": time.time()}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, json.dumps(record).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _break_if_stale(self) -> None:
        info, st = _read(self.path)
        if st is None or not is_stale(info, st, self.stale_after):
            return
        aside = self.path.with_name(f".{self.path.name}.broken-{uuid.uuid4().hex[:12]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # someone else broke it first
        info2, st2 = _read(aside)
        same = st2 is not None and st2.st_ino == st.st_ino and st2.st_dev == st.st_dev
        if same or st2 is None:
            with contextlib.suppress(OSError):
                os.unlink(aside)
            return
        # We moved a fresh lock that replaced the stale one in between: put it back if nobody took the slot.
        try:
            os.link(aside, self.path)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            os.unlink(aside)

    def _owns(self, token: str) -> bool:
        info, _ = _read(self.path)
        return info is not None and info.get("token") == token

    def _beat(self, token: str, stop: threading.Event) -> None:
        interval = self.stale_after / 4
        while not stop.wait(interval):
            if not self._owns(token):
                return  # broken by someone who judged us stale (a frozen host): nothing left to keep alive
            with contextlib.suppress(OSError):
                os.utime(self.path)

    @contextlib.contextmanager
    def hold(self, cancelled: Callable[[], bool] | None = None) -> Iterator[None]:
        key = str(self.path)
        me = threading.get_ident()
        with _LOCAL:
            mine = _HELD.get(key)
            if mine is not None and mine[0] == me:
                _HELD[key] = (me, mine[1] + 1, mine[2])
                reentered = True
            else:
                reentered = False
        if reentered:
            try:
                yield
            finally:
                with _LOCAL:
                    tid, depth, token = _HELD[key]
                    _HELD[key] = (tid, depth - 1, token)
            return

        token = uuid.uuid4().hex
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            with _LOCAL:  # threads of this process take turns at the file, so the registry stays exact
                if key not in _HELD and self._try_create(token):
                    _HELD[key] = (me, 1, token)
                    break
            if key not in _HELD:
                self._break_if_stale()
            if cancelled is not None and cancelled():
                raise Cancelled()
            time.sleep(self.poll)
        stop = threading.Event()
        beat = threading.Thread(target=self._beat, args=(token, stop), name=f"lock-{self.path.name}", daemon=True)
        beat.start()
        try:
            yield
        finally:
            stop.set()
            beat.join(timeout=5)
            with _LOCAL:
                _HELD.pop(key, None)
                if self._owns(token):
                    with contextlib.suppress(OSError):
                        os.unlink(self.path)


def lock_path(root: Path, stage: str, key: str) -> Path:
    """``<root>/locks/<stage>-<key>.lock``; ``stage`` and ``key`` must be plain file-name parts."""
    for part, what in ((stage, "stage"), (key, "key")):
        if not part or len(part) > 200 or any(c in part for c in "/\\\0") or part.startswith("."):
            raise Ex4dError(f"unusable lock {what} {part[:60]!r}", where="stage_lock", code="internal")
    return root / "locks" / f"{stage}-{key}.lock"


__all__ = ["HOST", "StageLock", "is_stale", "lock_path", "owner_dead", "owner_record", "pid_alive"]
