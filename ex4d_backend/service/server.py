"""The ``ex4d serve`` loop: requests on stdin, events on stdout (see ``PROTOCOL.md``).

Threads: the reader (the caller's thread) parses and validates each line and answers control requests
(``cancel``, ``jobs``, ``shutdown``) at once; one GPU worker runs one job at a time from a FIFO queue
(waiting jobs get ``queued`` events); one light worker answers ``hello`` and ``probe_footage`` so they
never wait behind a generation. Every outgoing event is validated against the protocol schema. No bad
request, bad input or failing job ends the process.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import BinaryIO

from .. import safe_io
from ..errors import CANCELLED, DEVICE, INTERNAL, IO_ERROR, Cancelled, Ex4dError, disk_full_error, is_disk_full
from . import jobs, protocol
from .jobstore import JobStore, TailHandler
from .resident import DEFAULT_KEEP_ALIVE_S, ResidentGenerator, free_memory

log = logging.getLogger("ex4d_backend.service")
_LEVELS = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning"}


_IMPORT_LOCK = threading.Lock()
_preloaded = False


def preload_heavy_modules() -> None:
    """Import torch (and what the jobs use) once, under a lock, before any request runs it.

    torch is not safe to import from two threads at once ("partially initialized module 'torch' has no
    attribute 'cuda'"), and the light worker (``hello``) and the GPU worker (jobs) would otherwise race
    on a fresh process. Every request waits here until the first import is complete."""
    global _preloaded
    with _IMPORT_LOCK:
        if _preloaded:
            return
        try:
            import torch  # noqa: F401

            from .. import dwmesh, render  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - a broken torch is reported by hello / the job itself
            log.warning("preloading torch failed: %s", exc)
        _preloaded = True


@dataclass
class Task:
    id: str
    type: str
    params: dict
    cancel: threading.Event = field(default_factory=threading.Event)


class _EventLogHandler(logging.Handler):
    """Forwards log records raised while a request runs as ``log`` events of that request."""

    def __init__(self, server: Server):
        super().__init__(logging.INFO)
        self.server = server

    def emit(self, record: logging.LogRecord) -> None:
        rid = getattr(self.server._current, "id", None)
        if rid is None or not record.name.startswith(("ex4d_backend", "py.warnings")):
            return
        try:
            level = _LEVELS.get(record.levelno, "error")
            text = record.getMessage().splitlines()[0] if record.getMessage() else ""  # never a traceback
            text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates
            self.server.emit({"id": rid, "event": "log", "level": level, "message": text[:2000]})
        except Exception:  # noqa: BLE001 - logging must never raise
            pass


class Server:
    """One service instance reading ``stdin`` and writing ``stdout`` (binary streams)."""

    def __init__(
        self,
        store: JobStore,
        stdin: BinaryIO,
        stdout: BinaryIO,
        *,
        models_dir: str | None = None,
        keep_generator_s: float = DEFAULT_KEEP_ALIVE_S,
    ):
        self.store = store
        self.resident = ResidentGenerator(keep_generator_s)  # used by the GPU worker alone
        self.stdin, self.stdout = stdin, stdout
        self.models_dir = models_dir
        self._out_lock = threading.Lock()
        self._cond = threading.Condition()
        self._queue: collections.deque[Task] = collections.deque()
        self._running: Task | None = None
        self._light: queue.Queue[Task | None] = queue.Queue()
        self._light_ids: set[str] = set()
        self._stopping = False
        self._current = threading.local()
        self.tail = TailHandler(30)
        self.interrupted: list[dict] = []

    # -- output -------------------------------------------------------------------------------
    def emit(self, event: dict) -> None:
        """Write one event line. An event that breaks the protocol (a bug: a schema violation, NaN in a
        result) is never sent: an ``internal`` error for the same id goes out instead."""
        event.setdefault("time", time.time())
        try:
            protocol.validate_event(event)
            data = (protocol.dumps(event) + "\n").encode()
        except Exception as exc:  # noqa: BLE001 - the service must never die on its own output
            if getattr(self._current, "emitting_fallback", False):
                return
            self._current.emitting_fallback = True
            try:
                log.error("refused to send an invalid %s event: %s", event.get("event"), str(exc)[:500])
                rid = event.get("id") if isinstance(event.get("id"), str) else None
                body = {"code": INTERNAL, "message": f"the backend produced an invalid event: {str(exc)[:300]}"}
                fallback = self.error_event(rid, {**body, "hint": "this is a bug: please report it with the log"})
                fallback["time"] = time.time()
                data = (protocol.dumps(fallback) + "\n").encode()
            finally:
                self._current.emitting_fallback = False
        with self._out_lock:
            try:
                self.stdout.write(data)
                self.stdout.flush()
            except (OSError, ValueError):
                pass  # the client went away; the reader sees EOF and shuts down

    def emit_error(self, rid: str | None, err: dict) -> None:
        self.emit(self.error_event(rid, err))

    def error_event(self, rid: str | None, err: dict) -> dict:
        body = {
            "code": err.get("code") if err.get("code") in protocol.ERROR_CODES else INTERNAL,
            "message": str(err.get("message") or "unknown error")[:2000],
            "where": err.get("where"),
            "hint": err.get("hint"),
            "log_tail": self.tail.tail(),
        }
        return {"id": rid, "event": "error", "error": body}

    # -- main loop ----------------------------------------------------------------------------
    def serve(self) -> int:
        self.store.clean_partials()
        self.interrupted = self.store.recover()
        for j in self.interrupted:
            log.warning("job %s was left unfinished by an earlier run: marked interrupted", j["job"])
        threading.Thread(target=preload_heavy_modules, name="preload", daemon=True).start()
        threading.Thread(target=self._gpu_worker, name="gpu-worker", daemon=True).start()
        threading.Thread(target=self._light_worker, name="light-worker", daemon=True).start()
        log.info(
            "ex4d serve ready (protocol %s, store %s, pid %d)", protocol.PROTOCOL_VERSION, self.store.root, os.getpid()
        )
        while not self._stopping:
            line = self.stdin.readline(protocol.MAX_LINE_BYTES + 1)
            if not line:
                log.info("stdin closed: shutting down")
                self._shutdown(None)
                break
            if len(line) > protocol.MAX_LINE_BYTES and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):  # drop the rest of the oversized line
                    line = self.stdin.readline(protocol.MAX_LINE_BYTES)
                line = b"x" * (protocol.MAX_LINE_BYTES + 1)
            if not line.strip():
                continue
            try:
                self._handle(line.strip())
            except Exception as exc:  # noqa: BLE001 - the service survives any request
                log.error("internal error on a request: %s", exc, exc_info=True)
                self.emit_error(None, {"code": INTERNAL, "message": f"{type(exc).__name__}: {exc}"})
        self._join()
        return 0

    def _handle(self, line: bytes) -> None:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self.emit_error(None, {"code": protocol.BAD_JSON, "message": "the line is not UTF-8", "hint": None})
            return
        try:
            req = protocol.parse_request(text)
        except protocol.ProtocolError as exc:
            log.info("refused a request: %s (%s)", exc.message, exc.code)
            self.emit_error(exc.id, exc.to_dict())
            return
        rid, type_, params = req["id"], req["type"], req["params"]
        if self._busy_id(rid):
            self.emit_error(
                rid,
                {
                    "code": protocol.DUPLICATE_ID,
                    "message": f"request id '{rid}' is still in use",
                    "hint": "use a new id for every request",
                },
            )
            return
        log.info("request %s: %s", rid, type_)
        if type_ == "cancel":
            self.emit({"id": rid, "event": "result", "result": self._cancel(params.get("target"))})
        elif type_ == "shutdown":
            self._shutdown(rid)
        elif type_ == "jobs":
            self.emit({"id": rid, "event": "result", "result": {"jobs": self.store.list_jobs()}})
        elif type_ in protocol.CONTROL_TYPES or type_ in protocol.LIGHT_TYPES:
            with self._cond:
                self._light_ids.add(rid)
            self._light.put(Task(rid, type_, params))
        else:
            with self._cond:
                task = Task(rid, type_, params)
                self._queue.append(task)
                waiting = self._running is not None or len(self._queue) > 1
                position = len(self._queue) if self._running is not None else len(self._queue) - 1
                if waiting:
                    self.emit({"id": rid, "event": "queued", "position": position})
                self._cond.notify_all()

    def _busy_id(self, rid: str) -> bool:
        with self._cond:
            return (
                (self._running is not None and self._running.id == rid)
                or any(t.id == rid for t in self._queue)
                or rid in self._light_ids
            )

    # -- control ------------------------------------------------------------------------------
    def _cancel(self, target: str | None) -> dict:
        with self._cond:
            running = self._running
            if target is None or (running is not None and running.id == target):
                if running is None:
                    return {"target": target, "state": "unknown"}
                running.cancel.set()
                log.info("cancelling %s at its next step", running.id)
                return {"target": running.id, "state": "cancelling"}
            for task in list(self._queue):
                if task.id == target:
                    self._queue.remove(task)
                    self.emit_error(
                        task.id, {"code": CANCELLED, "message": "cancelled before it started", "hint": None}
                    )
                    self._report_positions()
                    return {"target": target, "state": "dropped"}
        return {"target": target, "state": "unknown"}

    def _report_positions(self) -> None:
        for i, task in enumerate(self._queue):
            self.emit({"id": task.id, "event": "queued", "position": i + 1})

    def _shutdown(self, rid: str | None) -> None:
        with self._cond:
            self._stopping = True
            dropped = list(self._queue)
            self._queue.clear()
            if self._running is not None:
                self._running.cancel.set()
            self._cond.notify_all()
        for task in dropped:
            self.emit_error(task.id, {"code": CANCELLED, "message": "the service is shutting down", "hint": None})
        self._light.put(None)
        self._join()
        if rid is not None:
            self.emit({"id": rid, "event": "result", "result": {}})

    def _join(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._running is not None and time.monotonic() < deadline:
                self._cond.wait(0.1)

    # -- workers ------------------------------------------------------------------------------
    def _gpu_worker(self) -> None:
        while True:
            task = None
            with self._cond:
                while not self._queue and not self._stopping:
                    left = self.resident.seconds_left()  # None: nothing kept loaded, wait for work
                    if left == 0:
                        break
                    self._cond.wait(left)
                stopping = self._stopping
                if not stopping and self._queue:
                    task = self._queue.popleft()
                    self._running = task
                    self._report_positions()
            if stopping:
                self.resident.release()
                return
            if task is None:
                self.resident.expire()  # idle for keep_alive: close the kept generator (outside the lock)
                continue
            try:
                final = self._run(task)
            except BaseException as exc:  # noqa: BLE001 - the worker must outlive any job
                final = self.error_event(task.id, {"code": INTERNAL, "message": repr(exc)[:500], "hint": None})
            with self._cond:
                self._running = None
                self._cond.notify_all()
            self.emit(final)
            try:
                free_memory()  # after the result is out: the client never waits for the collection
            except Exception:  # noqa: BLE001
                pass

    def _light_worker(self) -> None:
        while True:
            task = self._light.get()
            if task is None:
                return
            try:
                final = self._run(task)
            except BaseException as exc:  # noqa: BLE001
                final = self.error_event(task.id, {"code": INTERNAL, "message": repr(exc)[:500], "hint": None})
            with self._cond:
                self._light_ids.discard(task.id)
            self.emit(final)

    def _run(self, task: Task) -> dict:
        """Run a task, emitting ``started`` and its progress; return its final event (result or error)."""
        self._current.id = task.id
        self.emit({"id": task.id, "event": "started"})
        preload_heavy_modules()
        step_delay = float(os.environ.get("EX4D_SERVICE_STEP_DELAY") or 0)  # test hook (see docs/service.md)
        last: dict = {}

        def progress(stage: str, step: int, total: int, message: str = "") -> None:
            if task.cancel.is_set():
                raise Cancelled()
            step, total = max(0, int(step)), max(0, int(total))
            if last.get("stage") == stage and step < last["step"]:
                step = last["step"]  # within a run of one stage, steps never go back
            last.update(stage=stage, step=step)
            self.emit(
                {
                    "id": task.id,
                    "event": "progress",
                    "stage": str(stage),
                    "step": step,
                    "total": total,
                    "message": str(message)[:500],
                }
            )
            if step_delay:
                time.sleep(step_delay)
            if task.cancel.is_set():
                raise Cancelled()

        t0 = time.monotonic()
        sandbox = safe_io.sandbox(self.store.read_roots(), task.cancel.is_set)
        try:
            sandbox.__enter__()
            if task.type == "hello":
                result = jobs.hello(self.store, self.models_dir, self.interrupted)
            elif task.type == "probe_footage":
                result = jobs.probe_footage(self.store, task.params)
            elif task.type in ("store_info", "store_clean"):
                result = getattr(jobs.info, task.type)(self.store, task.params)
            else:
                ctx = jobs.Context(self.store, progress, self.models_dir, task.id, resident=self.resident)
                result = jobs.run_job(task.type, task.params, ctx)
        except Ex4dError as exc:
            level = logging.INFO if exc.code == CANCELLED else logging.WARNING
            log.log(level, "request %s (%s) failed: %s", task.id, task.type, exc)
            err = exc.to_dict()
        except OSError as exc:
            if is_disk_full(exc):
                err = disk_full_error(exc, str(self.store.root)).to_dict()
                log.warning("request %s (%s) failed: %s", task.id, task.type, err["message"])
            elif exc.errno not in _IO_ERRNOS:
                err = self._crash(task, exc)
            else:
                log.error("request %s (%s) failed on the file system: %s", task.id, task.type, exc, exc_info=True)
                err = {
                    "code": IO_ERROR,
                    "message": f"the file system failed: {type(exc).__name__}: {str(exc)[:500]}",
                    "where": str(getattr(exc, "filename", None) or "")[:300] or None,
                    "hint": "check the disk and the permissions of the job store, then run the job again",
                }
        except MemoryError:
            log.error("request %s ran out of memory", task.id)
            err = {
                "code": DEVICE,
                "message": "out of memory",
                "hint": "use a shorter clip, a smaller max_side or a lower VRAM profile",
            }
        except Exception as exc:  # noqa: BLE001 - a bug in a job never ends the service
            name = type(exc).__name__
            if name == "OutOfMemoryError":
                log.error("request %s ran out of GPU memory: %s", task.id, exc)
                err = {
                    "code": DEVICE,
                    "message": f"out of GPU memory: {str(exc)[:300]}",
                    "hint": "use a lower VRAM profile, fewer frames or a smaller size",
                }
            else:
                err = self._crash(task, exc)
        else:
            log.info("request %s (%s) done in %.2f s", task.id, task.type, time.monotonic() - t0)
            return {"id": task.id, "event": "result", "result": result}
        finally:
            sandbox.__exit__(None, None, None)
            self._current.id = None
        return self.error_event(task.id, err)

    @staticmethod
    def _crash(task: Task, exc: BaseException) -> dict:
        """A bug: the traceback goes to the log file only (never to the client), an ``internal`` error out."""
        log.error("request %s (%s) crashed: %s", task.id, task.type, exc, exc_info=True)
        return {
            "code": INTERNAL,
            "message": f"{type(exc).__name__}: {str(exc)[:1000]}",
            "hint": "this is a bug: please report it with the log file",
        }


_IO_ERRNOS = {errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM, errno.ESTALE, errno.ENOTCONN}


def configure_logging(store: JobStore, server: Server, verbose: bool = False) -> None:
    """Root logging: the store's rotating file, the error tail, ``log`` events, and stderr."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
    stderr = logging.StreamHandler()
    stderr.setFormatter(logging.Formatter("ex4d serve: %(levelname)s %(message)s"))
    for handler in (store.log_handler(), server.tail, _EventLogHandler(server), stderr):
        root.addHandler(handler)
    logging.captureWarnings(True)
