"""The add-on's one job runner: every operator that talks to the backend runs its request through here.

A :class:`Job` has up to three phases, each cut in slices so that no main-thread call takes long:

1. ``prepare`` (optional): a generator run one slice per timer tick (camera sampling); it ends with
   ``return {params to add}``;
2. the backend request (``type``, ``params``), polled without blocking; a new backend process gets a
   ``hello`` beside it (the protocol's major version is checked; a ``require`` callback may refuse the
   job on what the hello says, e.g. no GPU for EX-4D generation);
3. ``finish(job, result)``: a report text, or a generator run one slice per tick that returns it.

In the UI the operator is modal (a 0.1 s timer ticks the job; Esc press cancels, a second Esc stops the
backend); in background mode (``blender -b``, bpy as a module) :meth:`Job.run_blocking` ticks it to the
end, honours ``scene.ex4d_job.timeout``, and prints progress lines on the console. Progress goes to
``scene.ex4d`` (``job_stage`` "Step n of N: stage (step/total)", ``job_progress``, ``job_message``) and
the status bar.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any

import bpy

from . import backend
from .backend_client import BackendClient, BackendError, Request

TIMER_STEP = 0.1  # seconds between two ticks in the UI
SLICE_BUDGET = 0.03  # seconds of work a slice aims at (prepare / finish generators check it)
# The stages a job goes through, in pipeline order ("Step n of N"), and their rough share of the time
# (the progress bar). A stage not listed is inserted where it shows up.
GUIDE_STAGES = ("inputs", "frames", "depth", "mesh", "camera", "render", "write")
WINDOW_LOOP = ("window", "preview", "condition", "denoise", "decode")  # once per window of a generate job
STAGE_WEIGHT = {"depth": 2.0, "mesh": 3.0, "render": 3.0, "write": 1.5, "load": 3.0, "preview": 3.0,
                "condition": 2.0, "denoise": 40.0, "decode": 3.0}  # fmt: skip

# Hooks for tests and pipelines: hook(job, event) for every event of the active job, after the job's
# state and the scene's progress fields were updated.
event_hooks: list[Callable[[Job, dict], None]] = []
_active_job: Job | None = None

Finish = Callable[["Job", dict], "str | Generator[None, None, str]"]


def expected_stages(type_: str, params: dict) -> list[str]:
    """The stages a request is expected to report, in order."""
    if type_ in ("render_guide", "build_dwmesh", "camera_preset"):
        return list(GUIDE_STAGES) if type_ == "render_guide" else ["inputs", "frames", "depth", "mesh", "camera"]
    if type_ == "generate":
        if params.get("generator") == "preview":
            return [*GUIDE_STAGES, "load", "window", "preview", "save"]
        return [*GUIDE_STAGES, "load", "window", "condition", "denoise", "decode", "save"]
    return [type_]


def active_job() -> Job | None:
    return _active_job


class Job:
    """One backend request followed to its end (see the module docstring). A subclass with
    ``uses_backend = False`` runs something else in its running phase (``farm.ProcessJob``: CLI processes)."""

    uses_backend = True

    def __init__(
        self,
        context,
        type_: str,
        params: dict,
        paths: list[str],
        finish: Finish,
        *,
        label: str = "",
        exclusive: bool = True,
        prepare: Iterator | None = None,
        require: Callable[[dict], None] | None = None,
    ):
        self.scene = context.scene
        self.exclusive = exclusive  # False: runs beside a job (hello), leaves the progress fields alone
        self.type, self.params, self.paths = type_, params, list(paths)
        self.finish_fn, self.label = finish, label or type_
        self.prepare, self.require = prepare, require
        self.stages = expected_stages(type_, params)
        self.client: BackendClient | None = None
        self.req: Request | None = None
        self.hello: Request | None = None
        self.events: list[dict] = []
        self.stage, self.stage_pos = "", -1
        self.fraction = 0.0
        self.state = "new"  # new -> preparing -> running -> finishing -> done | failed | cancelled
        self.report: tuple[str, str] | None = None  # (level, text) when finished
        self.report_level = "INFO"  # a finish step may raise it to "WARNING" (the job still succeeded)
        self.cancel_requested = self.timed_out = self.killed = False
        self.started_at = self.finished_at = 0.0
        self.hello_seconds = 0.0
        self.max_call = 0.0  # the longest tick (seconds): the main-thread budget check
        self.max_call_by_state: dict[str, float] = {}  # the same per phase (preparing, running, finishing)
        self.extra: dict[str, Any] = {}  # what operators keep on the job (camera name, output folder, ...)
        self._pending: list[dict] = []
        self._finishing: Generator | None = None
        self._workspace = None
        self._last_print = ""

    # -- life cycle --------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.state in ("done", "failed", "cancelled")

    def start(self, context) -> None:
        """Take the scene's progress fields (exclusive jobs) and begin; raises BackendError before that
        when the backend cannot be started."""
        global _active_job
        self.client = backend.get_client(context, self.paths) if self.uses_backend else None
        self.started_at = time.monotonic()
        self.state = "preparing" if self.prepare is not None else "running"
        if self.exclusive:
            _active_job = self
            s = self.scene.ex4d
            s.job_running, s.job_stage, s.job_progress, s.job_message = True, f"{self.label}: starting", 0.0, ""
            s.last_error = ""
            if not bpy.app.background and getattr(context, "workspace", None) is not None:
                self._workspace = context.workspace
        if self.state == "running":
            self._submit()

    def _submit(self) -> None:
        assert self.client is not None
        backend.add_listener(self._on_event)
        if self.type != "hello" and backend.needs_hello(self.client):
            self.hello = self.client.submit("hello", {})  # beside the job: checked when it answers
        elif self.require is not None and backend.last_hello:
            try:
                self.require(backend.last_hello)
            except BackendError as exc:
                self._fail(exc)
                return
        self.req = self.client.submit(self.type, self.params)

    def cancel(self) -> None:
        """Stop at the next step boundary; a second cancel stops the backend process (a hung backend; it
        is restarted on the next request)."""
        if self.done:
            return
        if self.cancel_requested:
            if not self.killed and self.req is not None and self.client is not None:
                self.killed = True
                self._set_status(f"{self.label}: stopping the backend", self.fraction, "")
                self.client.kill()
            return
        self.cancel_requested = True
        self._set_status(f"{self.label}: cancelling", self.fraction, "waiting for the next step boundary")
        if self.req is None or self.state == "finishing":  # nothing in the backend (yet / any more)
            self._end("cancelled", ("WARNING", f"EX-4D: {self.label} cancelled; nothing was added"))
            return
        try:
            assert self.client is not None
            self.client.cancel(self.req.id)
        except Exception as exc:  # noqa: BLE001 - a dead backend: its exit event ends the job
            print(f"EX-4D: cancel failed: {exc!r}")

    def _on_event(self, event: dict) -> None:
        if self.req is not None and event.get("id") == self.req.id:
            self._pending.append(event)

    def tick(self) -> bool:
        """One slice of work (never blocks); True when the job has ended."""
        t0, state = time.perf_counter(), self.state
        try:
            self._tick()
        finally:
            dt = time.perf_counter() - t0
            if dt > SLICE_BUDGET * 2 and os.environ.get("EX4D_SLICE_DEBUG"):
                print(f"EX-4D slow tick {dt * 1000:.0f} ms in {state}: {_where(self)}")
            self.max_call = max(self.max_call, dt)
            self.max_call_by_state[state] = max(self.max_call_by_state.get(state, 0.0), dt)
        return self.done

    def _tick(self) -> None:
        if self.done:
            return
        if self.state == "preparing":
            self._prepare_slice()
            return
        if self.state == "finishing":
            self._finish_slice()
            return
        assert self.client is not None and self.req is not None
        self.client.poll()
        if self.hello is not None and self.hello.done:
            hello, self.hello = self.hello, None
            if hello.error is not None:  # the process died or refused: the job cannot run either
                if not self.req.done:
                    self.client.cancel(self.req.id)
                backend.remove_listener(self._on_event)
                self._request_failed(hello.error)
                return
            try:
                backend.note_hello(self.client, hello)
                self.hello_seconds = time.monotonic() - self.started_at
                if self.require is not None:
                    self.require(backend.last_hello)
            except BackendError as exc:
                if not self.req.done:
                    self.client.cancel(self.req.id)
                self._fail(exc)
                return
        while self._pending and not self.done:
            event = self._pending.pop(0)
            self.events.append(event)
            self._apply(event)
            for hook in list(event_hooks):
                hook(self, event)
        if self.state == "running" and self.req.done and not self._pending and self.hello is None:
            self._request_done()

    def run_blocking(self, timeout: float = 0.0, grace: float = 60.0) -> None:
        """Background mode: tick until the job ends. ``timeout`` > 0: cancel after that many seconds, and
        stop the backend if the job has not ended ``grace`` seconds later."""
        deadline = time.monotonic() + timeout if timeout > 0 else None
        while not self.tick():
            now = time.monotonic()
            if deadline is not None and now > deadline and not self.cancel_requested:
                self.timed_out = True
                self.cancel()
            elif deadline is not None and now > deadline + grace:
                self.cancel()  # the second cancel stops the backend
            time.sleep(0.01 if self.state == "running" else 0.001)  # a worker thread may need the GIL

    # -- phases ------------------------------------------------------------------------------
    def _prepare_slice(self) -> None:
        assert self.prepare is not None
        try:
            next(self.prepare)
            return
        except StopIteration as stop:
            self.params.update(stop.value or {})
        except BackendError as exc:
            self._fail(exc)
            return
        self.prepare = None
        self.state = "running"
        try:
            self._submit()
        except BackendError as exc:
            self._fail(exc)

    def _request_done(self) -> None:
        backend.remove_listener(self._on_event)
        req = self.req
        assert req is not None
        if req.error is not None:
            self._request_failed(req.error)
            return
        self._use_result(req.result or {})

    def _use_result(self, result: dict) -> None:
        """Hand the request's result to ``finish`` (a text, or a generator run one slice per tick)."""
        try:
            out = self.finish_fn(self, result)
        except Exception as exc:  # noqa: BLE001 - an add-on bug must still end the job cleanly
            self._finish_error(exc)
            return
        if isinstance(out, str):
            self._end("done", (self.report_level, out))
        else:
            self._finishing = out
            self.state = "finishing"
            self._set_status(f"{self.label}: loading the result", max(self.fraction, 0.99), "")

    def _finish_slice(self) -> None:
        assert self._finishing is not None
        try:
            next(self._finishing)
        except StopIteration as stop:
            self._end("done", (self.report_level, str(stop.value or f"EX-4D: {self.label} done")))
        except Exception as exc:  # noqa: BLE001
            self._finish_error(exc)

    def _finish_error(self, exc: Exception) -> None:
        if isinstance(exc, BackendError):
            self._end("failed", ("ERROR", backend.error_text(exc)))
        else:
            self._end("failed", ("ERROR", f"EX-4D: could not use the result: {exc!r}"))

    def _fail(self, exc: BackendError) -> None:
        backend.remove_listener(self._on_event)
        self._end("failed", ("ERROR", backend.error_text(exc)))

    def _request_failed(self, err: dict) -> None:
        code = err.get("code")
        if code == "cancelled" or self.killed or (self.cancel_requested and code != "backend_died"):
            why = "stopped: time limit reached" if self.timed_out else "cancelled"
            if self.killed:
                why += " (the backend was stopped; it restarts on the next request)"
            self._end("cancelled", ("WARNING", f"EX-4D: {self.label} {why}; nothing was added"))
        elif code == "backend_died":
            tail = [line for line in err.get("log_tail") or [] if line.strip()]
            hint = "it is restarted on the next request"
            if tail:
                hint += f"; its last log line: {tail[-1].strip()[:200]}"
            msg = f"the backend stopped during {self.label} ({err.get('message', '')})"
            self._end("failed", ("ERROR", backend.error_text({"code": code, "message": msg, "hint": hint})))
        else:
            self._end("failed", ("ERROR", backend.error_text(err)))

    # -- progress ----------------------------------------------------------------------------
    def _apply(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "queued":
            self._set_status(f"{self.label}: queued ({event.get('position')})", 0.0, "waiting for another job")
        elif kind == "progress":
            stage = event.get("stage", "")
            if stage == "window":  # a generate job's window loop (issue 14): n of N
                self.window = (int(event.get("step", 0)), int(event.get("total", 0)))
            if stage != self.stage:
                later = [i for i in range(self.stage_pos + 1, len(self.stages)) if self.stages[i] == stage]
                if later:  # stages skipped on the way count as done
                    self.stage_pos = later[0]
                elif stage in WINDOW_LOOP and stage in self.stages:  # the next window: back to its stage
                    self.stage_pos = self.stages.index(stage)
                else:
                    self.stage_pos += 1
                    self.stages.insert(self.stage_pos, stage)
                self.stage = stage
            step, total = int(event.get("step", 0)), int(event.get("total", 0))
            within = min(1.0, step / total) if total else 0.0
            done_w, n_w = getattr(self, "window", (0, 0))
            if stage in WINDOW_LOOP and stage != "window" and n_w:  # this window's share of all windows
                within = min(1.0, (done_w + within) / n_w)
            weights = [STAGE_WEIGHT.get(st, 1.0) for st in self.stages]
            done = sum(weights[: self.stage_pos]) + weights[self.stage_pos] * within
            frac = max(self.fraction, min(1.0, done / sum(weights)))
            text = f"Step {self.stage_pos + 1} of {len(self.stages)}: {stage}"
            if total:
                text += f" ({step}/{total})"
            if self.cancel_requested:
                text = f"{self.label}: cancelling ({stage})"
            self._set_status(text, frac, event.get("message", ""))

    def _set_status(self, stage: str, fraction: float, message: str) -> None:
        self.fraction = fraction
        if not self.exclusive:
            return
        s = self.scene.ex4d
        s.job_stage, s.job_progress, s.job_message = stage, fraction, message[:200]
        line = f"EX-4D {self.label}: {stage} {int(fraction * 100)}%" + (f": {message[:80]}" if message else "")
        if bpy.app.background:
            if line != self._last_print:  # a farm's log: one line per change
                print(line, flush=True)
                self._last_print = line
        elif self._workspace is not None:
            try:
                self._workspace.status_text_set(line + "  (Esc: cancel)")
            except ReferenceError:  # the workspace went away (file loaded)
                self._workspace = None
        redraw()

    def _end(self, state: str, report: tuple[str, str]) -> None:
        global _active_job
        backend.remove_listener(self._on_event)
        for gen in (self.prepare, self._finishing):  # runs their ``finally`` (the scene frame is restored)
            if gen is not None and hasattr(gen, "close"):
                gen.close()
        self.prepare = self._finishing = None
        self.state, self.report = state, report
        self.finished_at = time.monotonic()
        s = self.scene.ex4d
        if not self.exclusive:
            if state == "failed":
                s.last_error = report[1][:1000]
            return
        s.job_running = False
        if state == "done":
            s.job_stage, s.job_progress, s.job_message = f"{self.label}: done", 1.0, report[1][:200]
        else:
            s.job_stage, s.job_progress, s.job_message = "", 0.0, ""
            if state == "failed":
                s.last_error = report[1][:1000]
        if bpy.app.background:
            print(report[1], flush=True)
        if self._workspace is not None:
            try:
                self._workspace.status_text_set(None)
            except ReferenceError:
                pass
            self._workspace = None
        if _active_job is self:
            _active_job = None
        redraw()

    def seconds(self) -> str:
        text = f"{time.monotonic() - self.started_at:.1f} s"
        if self.hello_seconds:
            text += f" (backend start {self.hello_seconds:.1f} s)"
        return text


def _where(job: Job) -> str:
    """Where a job's slice generator stopped (the innermost ``yield from``), for EX4D_SLICE_DEBUG."""
    gen: Any = job._finishing if job.state == "finishing" else job.prepare
    where = ""
    while gen is not None and getattr(gen, "gi_frame", None) is not None:
        where = f"{gen.gi_code.co_name}:{gen.gi_frame.f_lineno}"
        gen = gen.gi_yieldfrom
    return where or "-"


def redraw() -> None:
    if bpy.app.background:
        return
    wm = bpy.context.window_manager
    for window in getattr(wm, "windows", []):
        for area in window.screen.areas:
            if area.type in {"VIEW_3D", "SEQUENCE_EDITOR", "PREFERENCES", "PROPERTIES"}:
                area.tag_redraw()


def time_left(t0: float, budget: float = SLICE_BUDGET) -> bool:
    """For slice generators: True while the current slice may go on."""
    return time.perf_counter() - t0 < budget


def poll_message(cls: Any, text: str) -> None:
    """``Operator.poll_message_set`` (why the button is greyed out) from a mixin's ``poll``."""
    cls.poll_message_set(text)


class JobOperator:
    """Modal (UI) / blocking (background) machinery of every backend operator: subclasses implement
    ``make_job(context) -> Job``."""

    _timer = None
    job: Job | None = None
    exclusive = True

    @classmethod
    def poll(cls, context):
        if cls.exclusive and _active_job is not None and not _active_job.done:
            poll_message(cls, "An EX-4D job is running: wait for it or cancel it (Esc)")
            return False
        return context.scene is not None

    def make_job(self, context) -> Job:  # pragma: no cover - abstract
        raise NotImplementedError

    def _error(self, context, exc: Exception) -> set[str]:
        text = backend.error_text(exc) if isinstance(exc, BackendError) else f"EX-4D: {exc}"
        context.scene.ex4d.last_error = text[:1000]
        self.report({"ERROR"}, text)  # type: ignore[attr-defined]
        return {"CANCELLED"}

    def execute(self, context):
        if self.exclusive and _active_job is not None and not _active_job.done:
            self.report({"ERROR"}, f"EX-4D: a job is running ({_active_job.label}); wait or cancel it")  # type: ignore[attr-defined]
            return {"CANCELLED"}
        try:
            job = self.make_job(context)
            job.start(context)
        except (BackendError, OSError, ValueError) as exc:
            return self._error(context, exc)
        self.job = job
        if bpy.app.background or context.window_manager is None or context.window is None:
            job.run_blocking(timeout=context.scene.ex4d_job.timeout)
            return self._end()
        if job.done:
            return self._end()
        wm = context.window_manager
        self._timer = wm.event_timer_add(TIMER_STEP, window=context.window)
        wm.modal_handler_add(self)
        return {"RUNNING_MODAL"}

    def invoke(self, context, event):
        return self.execute(context)

    def modal(self, context, event):
        assert self.job is not None
        if event.type == "ESC":
            if event.value == "PRESS":
                self.job.cancel()
            return {"RUNNING_MODAL"}  # Esc is ours while the job runs (press and release)
        if event.type == "TIMER" or self.job.done:
            if self.job.tick():
                self._remove_timer(context)
                return self._end()
        return {"PASS_THROUGH"}  # the UI stays live

    def cancel(self, context):  # Blender ends the operator (file load, window closed)
        if self.job is not None and not self.job.done:
            self.job.cancel()
        self._remove_timer(context)

    def _remove_timer(self, context) -> None:
        if self._timer is not None:
            context.window_manager.event_timer_remove(self._timer)
            self._timer = None

    def _end(self) -> set[str]:
        assert self.job is not None
        level, text = self.job.report or ("INFO", "EX-4D: done")
        self.report({level}, text)  # type: ignore[attr-defined]
        return {"FINISHED"} if self.job.state == "done" else {"CANCELLED"}


@bpy.app.handlers.persistent
def _on_load_pre(*_args) -> None:
    """A new file is loaded: cancel the running job (its scene goes away)."""
    global _active_job
    job = _active_job
    if job is not None and not job.done:
        job.cancel()
        backend.remove_listener(job._on_event)
        job.state = "cancelled"
    _active_job = None


@bpy.app.handlers.persistent
def _on_load_post(*_args) -> None:
    """A file saved while a job ran must not show a job that no longer runs."""
    for sc in bpy.data.scenes:
        s = getattr(sc, "ex4d", None)
        if s is not None and s.job_running:
            s.job_running, s.job_stage, s.job_progress, s.job_message = False, "", 0.0, ""


def _same(a, b) -> bool:
    return getattr(a, "__module__", None) == b.__module__ and getattr(a, "__qualname__", None) == b.__qualname__


def add_handler(handlers: list, fn: Callable) -> None:
    """Append ``fn`` to a ``bpy.app.handlers`` list unless it (or a copy from a reloaded module) is there."""
    for h in list(handlers):
        if _same(h, fn):
            handlers.remove(h)
    handlers.append(fn)


def remove_handler(handlers: list, fn: Callable) -> None:
    for h in list(handlers):
        if _same(h, fn):
            handlers.remove(h)


def _handlers() -> tuple:
    return ((bpy.app.handlers.load_pre, _on_load_pre), (bpy.app.handlers.load_post, _on_load_post))


def register() -> None:
    for lst, fn in _handlers():
        add_handler(lst, fn)


def unregister() -> None:
    global _active_job
    if _active_job is not None and not _active_job.done:
        _active_job.cancel()
    _active_job = None
    for lst, fn in _handlers():
        remove_handler(lst, fn)
