"""Client of the EX-4D backend service (``python -m ex4d_backend serve``), for the Blender add-on.

Standard library only: no ``bpy``, no ``torch``, no ``ex4d_backend`` import, so it runs inside Blender's
Python and in plain test processes alike. The protocol is documented in ``ex4d_backend/PROTOCOL.md``.

Use from a Blender modal timer (never blocks)::

    client = BackendClient(python="/path/to/venv/bin/python", store="/path/to/store")
    req = client.submit("render_guide", {...})      # starts the backend if needed
    ...                                              # on every timer tick:
    client.poll()                                    # dispatches new events to their requests
    if req.progress: stage, step, total, message = req.progress
    if req.done: use req.result, or show req.error["message"] and req.error["hint"]
    client.cancel(req.id)                            # Esc

Use from scripts and background mode (blocks)::

    result = client.request("hello", timeout=60)     # raises BackendError with a stable code

A backend that died is restarted on the next ``submit``; requests that were in flight when it died
finish with an ``error`` whose code is ``backend_died`` (with the last lines of its stderr), also when
the next ``submit`` already restarted it.

Public API (stable; the add-on relies on it):

- ``BackendClient(python, *, store, allow, models_dir, extra_args, env, cwd, on_event)``: ``start()``,
  ``running``, ``pid``, ``restarts``, ``requests`` (id -> Request), ``submit(type, params, id=)``,
  ``poll()``, ``wait(req, timeout, on_event=)``, ``request(type, params, timeout=)``, ``cancel(target)``,
  ``close(timeout)``, ``kill()``, ``stderr_tail(n)``, ``send_raw(line)`` (tests), context manager.
- ``Request``: ``id``, ``type``, ``params``, ``state`` (sent / queued / running / done / failed),
  ``queue_position``, ``progress`` ((stage, step, total, message) or None), ``fraction``, ``logs``,
  ``result``, ``error`` (dict: code, message, hint, where, log_tail), ``done``, ``raise_for_error()``.
- ``BackendError(code, message, hint, where, log_tail)``; ``PROTOCOL_VERSION``;
  ``protocol_compatible(version)``; codes ``BACKEND_DIED``, ``TIMEOUT``, ``CANCELLED``.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

PROTOCOL_VERSION = "2.0"  # the major number must match the backend's
BACKEND_DIED = "backend_died"
TIMEOUT = "timeout"
CANCELLED = "cancelled"
INVALID_REQUEST = "invalid_request"
_STDERR_LINES = 200


class _Exit:
    """The reader thread's note that a backend process ended (never confused with an event it printed)."""

    def __init__(self, generation: int, returncode: int | None):
        self.generation, self.returncode = generation, returncode


def protocol_compatible(version: object) -> bool:
    """True when a backend's ``hello["protocol"]`` has this client's major version."""
    return isinstance(version, str) and version.split(".")[0] == PROTOCOL_VERSION.split(".")[0]


class BackendError(Exception):
    """An ``error`` event (or a client-side failure) as an exception with the protocol's fields."""

    def __init__(
        self,
        code: str,
        message: str,
        hint: str | None = None,
        where: str | None = None,
        log_tail: list[str] | None = None,
    ):
        super().__init__(message)
        self.code, self.message, self.hint, self.where = code, message, hint, where
        self.log_tail = list(log_tail or [])

    @classmethod
    def from_event(cls, error: dict) -> BackendError:
        return cls(
            error.get("code", "internal"),
            error.get("message", "unknown error"),
            error.get("hint"),
            error.get("where"),
            error.get("log_tail"),
        )

    def __str__(self) -> str:
        text = f"[{self.code}] {self.message}"
        if self.hint:
            text += f" -- {self.hint}"
        return text


class Request:
    """One request in flight; its fields are updated by :meth:`BackendClient.poll`."""

    def __init__(self, id: str, type: str, params: dict):
        self.id, self.type, self.params = id, type, params
        self.state = "sent"  # sent -> queued -> running -> done | failed
        self.queue_position: int | None = None
        self.progress: tuple[str, int, int, str] | None = None  # (stage, step, total, message)
        self.logs: list[dict] = []
        self.result: dict | None = None
        self.error: dict | None = None  # {"code", "message", "hint", "where", "log_tail"}
        self.sent_at = time.monotonic()
        self.finished_at: float | None = None
        self._generation = 0  # which backend process it was sent to

    @property
    def done(self) -> bool:
        return self.state in ("done", "failed")

    @property
    def fraction(self) -> float:
        """Progress of the current stage in [0, 1] (0 when unknown)."""
        if not self.progress or not self.progress[2]:
            return 0.0
        return min(1.0, self.progress[1] / self.progress[2])

    def raise_for_error(self) -> dict:
        """The result, or :class:`BackendError` if the request failed."""
        if self.error is not None:
            raise BackendError.from_event(self.error)
        if self.result is None:
            raise BackendError("internal", "the request has not finished")
        return self.result

    def _apply(self, event: dict) -> None:
        if self.done:  # finished (e.g. a client-side timeout): late events never reopen a request
            return
        try:
            self._apply_event(event)
        except (TypeError, ValueError, AttributeError, KeyError):  # a malformed event: ignored, never raised
            pass

    def _apply_event(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "queued":
            self.state, self.queue_position = "queued", event.get("position")
        elif kind == "started":
            self.state, self.queue_position = "running", None
        elif kind == "progress":
            self.state = "running"
            self.progress = (
                event.get("stage", ""),
                int(event.get("step", 0)),
                int(event.get("total", 0)),
                event.get("message", ""),
            )
        elif kind == "log":
            self.logs.append(event)
        elif kind == "result":
            result = event.get("result")
            if result is not None and not isinstance(result, dict):
                raise TypeError("malformed result")
            self.state, self.result, self.finished_at = "done", result or {}, time.monotonic()
        elif kind == "error":
            error = event.get("error")
            if not isinstance(error, dict) or not isinstance(error.get("code"), str):
                error = {"code": "internal", "message": f"the backend sent a malformed error: {str(error)[:200]}"}
            error = {"message": "unknown error", "hint": None, "where": None, "log_tail": [], **error}
            self.state, self.error, self.finished_at = "failed", error, time.monotonic()


class BackendClient:
    """Starts and talks to one backend service process."""

    def __init__(
        self,
        python: str | os.PathLike = sys.executable,
        *,
        store: str | os.PathLike | None = None,
        allow: Iterable[str | os.PathLike] = (),
        models_dir: str | os.PathLike | None = None,
        extra_args: Iterable[str] = (),
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        on_event: Callable[[dict], None] | None = None,
    ):
        self.python = str(python)
        self.store = None if store is None else str(store)
        self.allow = [str(a) for a in allow]
        self.models_dir = None if models_dir is None else str(models_dir)
        self.extra_args = list(extra_args)
        self.env = env
        self.cwd = None if cwd is None else str(cwd)
        self.on_event = on_event
        self.requests: dict[str, Request] = {}
        self.restarts = 0
        self._proc: subprocess.Popen | None = None
        self._events: queue.Queue = queue.Queue()
        self._stderr: collections.deque[str] = collections.deque(maxlen=_STDERR_LINES)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._generation = 0

    # -- process ------------------------------------------------------------------------------
    def command(self) -> list[str]:
        cmd = [self.python, "-u", "-m", "ex4d_backend", "serve"]
        if self.store:
            cmd += ["--store", self.store]
        for a in self.allow:
            cmd += ["--allow", a]
        if self.models_dir:
            cmd += ["--models-dir", self.models_dir]
        return cmd + self.extra_args

    def start(self) -> None:
        """Start the backend process if it is not running (returns at once; does not wait for it)."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                return
            if self._proc is not None:
                self.restarts += 1
            env = dict(os.environ if self.env is None else self.env)
            env.setdefault("PYTHONUNBUFFERED", "1")
            env.setdefault("PYTHONIOENCODING", "utf-8")
            kwargs: dict[str, Any] = {}
            if os.name == "nt":
                kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)
            self._stderr.clear()
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=self.cwd,
                env=env,
                **kwargs,
            )
            self._generation += 1
            gen, proc = self._generation, self._proc
        threading.Thread(target=self._read_stdout, args=(proc, gen), daemon=True, name="ex4d-stdout").start()
        threading.Thread(target=self._read_stderr, args=(proc,), daemon=True, name="ex4d-stderr").start()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def stderr_tail(self, n: int = 30) -> list[str]:
        return list(self._stderr)[-n:]

    def _read_stdout(self, proc: subprocess.Popen, gen: int) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                self._stderr.append(f"(stdout) {line}")
                continue
            if isinstance(event, dict):
                self._events.put(event)
            else:
                self._stderr.append(f"(stdout, not an event) {line[:300]}")
        proc.wait()
        self._events.put(_Exit(gen, proc.returncode))

    def _read_stderr(self, proc: subprocess.Popen) -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            self._stderr.append(raw.decode("utf-8", "replace").rstrip())

    def close(self, timeout: float = 10.0) -> None:
        """Ask the backend to shut down; kill it if it does not exit within ``timeout`` seconds."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                self._write({"id": f"shutdown-{next(self._ids)}", "type": "shutdown", "params": {}})
                proc.stdin.close()  # type: ignore[union-attr]
            except (OSError, ValueError):
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.poll()

    def kill(self) -> None:
        """Kill the backend at once (tests; a hung backend)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)

    # -- requests -----------------------------------------------------------------------------
    def new_id(self, type_: str) -> str:
        return f"{type_}-{os.getpid()}-{next(self._ids)}"

    def submit(self, type_: str, params: dict | None = None, *, id: str | None = None) -> Request:
        """Send a request and return at once; follow it with :meth:`poll`. Restarts a dead backend."""
        req = Request(id or self.new_id(type_), type_, dict(params or {}))
        msg = {"id": req.id, "type": type_, "params": req.params, "protocol": PROTOCOL_VERSION}
        try:  # before anything is registered: a request that cannot be sent never waits for an answer
            data = json.dumps(msg, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise BackendError(
                INVALID_REQUEST,
                f"the params of {type_!r} cannot be sent as JSON: {str(exc)[:200]}",
                "send only str, int, float (finite), bool, None, lists and dicts with str keys",
            ) from None
        self.start()
        req._generation = self._generation
        self.requests[req.id] = req
        try:
            self._write_line(data)
        except (OSError, ValueError) as exc:
            req._apply(self._died_event(req.id, f"cannot write to the backend: {exc}"))
        return req

    def send_raw(self, line: str | bytes) -> None:
        """Write one raw line (tests: malformed input). A newline is added."""
        self.start()
        data = line.encode() if isinstance(line, str) else line
        with self._lock:
            assert self._proc is not None and self._proc.stdin is not None
            self._proc.stdin.write(data + b"\n")
            self._proc.stdin.flush()

    def _write(self, msg: dict) -> None:
        self._write_line(json.dumps(msg, separators=(",", ":")))

    def _write_line(self, text: str) -> None:
        data = (text + "\n").encode("utf-8", "backslashreplace")
        with self._lock:
            if self._proc is None or self._proc.stdin is None:
                raise OSError("the backend is not running")
            self._proc.stdin.write(data)
            self._proc.stdin.flush()

    def cancel(self, target: str | None = None) -> Request:
        """Cancel ``target`` (queued: dropped; running: stops at its next step boundary)."""
        return self.submit("cancel", {"target": target} if target else {})

    def poll(self, max_events: int = 1000) -> list[dict]:
        """Dispatch the events that arrived (non-blocking) and return them."""
        out: list[dict] = []
        for _ in range(max_events):
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            out.extend(self._dispatch(event))
        return out

    def _dispatch(self, event: dict | _Exit) -> list[dict]:
        if isinstance(event, _Exit):
            gen = event.generation
            msg = f"the backend exited (status {event.returncode})"
            events = [
                self._died_event(r.id, msg) for r in list(self.requests.values()) if not r.done and r._generation == gen
            ]
            for e in events:
                self._deliver(e)
            return events
        self._deliver(event)
        return [event]

    def _deliver(self, event: dict) -> None:
        rid = event.get("id")
        req = self.requests.get(rid) if isinstance(rid, str) else None
        if req is not None:
            req._apply(event)
        if self.on_event is not None:
            self.on_event(event)

    def _died_event(self, rid: str, message: str) -> dict:
        return {
            "id": rid,
            "event": "error",
            "error": {
                "code": BACKEND_DIED,
                "message": message,
                "hint": "the backend is restarted on the next request; see the log lines for the cause",
                "where": None,
                "log_tail": self.stderr_tail(),
            },
        }

    def wait(
        self,
        req: Request,
        timeout: float | None = None,
        *,
        on_event: Callable[[dict], None] | None = None,
        interval: float = 0.02,
    ) -> Request:
        """Block until ``req`` is done (or ``timeout`` seconds pass: the request gets a ``timeout`` error
        and is cancelled in the backend)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not req.done:
            try:
                event = self._events.get(timeout=interval)
            except queue.Empty:
                event = None
            if event is not None:
                for e in self._dispatch(event):
                    if on_event is not None and e.get("id") == req.id:
                        on_event(e)
            if deadline is not None and time.monotonic() > deadline and not req.done:
                if self.running:
                    try:
                        self._write({"id": self.new_id("cancel"), "type": "cancel", "params": {"target": req.id}})
                    except (OSError, ValueError):
                        pass
                req._apply(
                    {
                        "id": req.id,
                        "event": "error",
                        "error": {
                            "code": TIMEOUT,
                            "message": f"no answer from the backend within {timeout:g} s",
                            "hint": "the request was cancelled; raise the time limit for long jobs",
                            "where": None,
                            "log_tail": self.stderr_tail(),
                        },
                    }
                )
        return req

    def request(
        self,
        type_: str,
        params: dict | None = None,
        *,
        timeout: float | None = None,
        on_event: Callable[[dict], None] | None = None,
    ) -> dict:
        """Send a request and block until its result (raises :class:`BackendError`)."""
        req = self.submit(type_, params)
        return self.wait(req, timeout, on_event=on_event).raise_for_error()

    def __enter__(self) -> BackendClient:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
