"""Farm submissions from Blender: ``ex4d.submit_farm``, ``ex4d.farm_refresh``, ``ex4d.farm_load``, ``ex4d.farm_cancel``.

Scripting contract (stable names and arguments):

- ``bpy.ops.ex4d.submit_farm(generator='EX4D'|'PREVIEW')``: the job Generate would run (same parameters,
  the novel camera sampled the same way), written as a job file (``outputs.write_job_file``, the writer of
  the local ``job.json`` too), collected into the farm project folder (``ex4d farm collect``: inputs copied
  under ``<project>/shots/<shot>/``, ``<project>/jobs/<job>.json`` with relative paths) and submitted
  (``ex4d farm submit --engine ray``, a detached driver process: it keeps running while the artist works,
  and after Blender closes). The submission (id, store, job file, result folder) is recorded in
  ``scene.ex4d_farm.submissions`` (saved in the .blend). With the engine ``openjd``: ``ex4d farm export
  --engine openjd`` into ``<project>/farm/<job>/`` and the template's path is reported (no submission).
- ``bpy.ops.ex4d.farm_refresh(index=-1)``: ``ex4d farm status ID --json`` of each unfinished submission
  (``index`` >= 0: that one); a finished one is loaded into the VSE exactly as a local generation
  (``ops_jobs._finish_generate``: a version folder ``_v<NNN>`` and a strip), when *Load When Done* is on.
  In the UI a timer refreshes every ``POLL_SECONDS`` while submissions are unfinished.
- ``bpy.ops.ex4d.farm_load(index)``: load a finished submission (again) into the VSE.
- ``bpy.ops.ex4d.farm_cancel(index)``: ``ex4d farm cancel ID``.

Every backend call is ``<backend python> -m ex4d_backend farm ...`` as a subprocess (``Proc``: output to log
files under ``<project>/farm/submit/``, polled from the job runner's tick, never waited on in the UI);
in background mode the operators block until their processes ended (the submit: until the submission id
is known).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
import types
from collections.abc import Generator
from pathlib import Path
from typing import Any

import bpy
from bpy.app.translations import pgettext_iface as iface_
from bpy.props import EnumProperty, IntProperty

from . import ops_jobs, outputs, props, runner
from .backend_client import BackendError
from .runner import Job

POLL_SECONDS = 3.0  # UI: seconds between two status checks of unfinished submissions
FINISHED = ("done", "failed", "cancelled", "exported")
SUBMISSION_LINE = re.compile(r"^submission (\S+):", re.M)  # the first line `ex4d farm submit` writes on stderr
_drivers: dict[str, subprocess.Popen] = {}  # submission id -> its `farm submit` driver (reaped on refresh)


# ----------------------------------------------------------------------------------------------
# Settings and processes
# ----------------------------------------------------------------------------------------------
def backend_cli(context) -> list[str]:
    """``[<backend python>, "-m", "ex4d_backend"]``; raises BackendError when there is no backend Python."""
    pref = props.prefs(context)
    python, where = props.find_backend_python(pref.backend_python if pref else "")
    if not python or not os.path.isfile(python):
        raise BackendError("not_found", "backend Python not found", hint=where)
    return [python, "-m", "ex4d_backend"]


def farm_settings(context) -> dict:
    """The preferences' farm settings, resolved: project folder (default: the .blend's folder), shared
    store (default: the Job Store, then ``$EX4D_STORE``, else the backend's default: ""), engine, Ray
    address, max retries."""
    pref = props.prefs(context)
    project = bpy.path.abspath(pref.farm_project_dir) if pref and pref.farm_project_dir else ""
    if not project:
        if not bpy.data.filepath:
            raise BackendError(
                "bad_input",
                "the .blend is not saved, so there is no farm project folder",
                hint="save the file, or set a Farm Project Folder in the add-on preferences",
            )
        project = os.path.dirname(bpy.data.filepath)
    store = ""
    if pref and pref.farm_store:
        store = bpy.path.abspath(pref.farm_store)
    elif pref and pref.store_dir:
        store = bpy.path.abspath(pref.store_dir)
    else:
        store = os.environ.get("EX4D_STORE", "")
    return {
        "project": str(Path(project).resolve()),
        "store": store,
        "engine": pref.farm_engine if pref else "ray",
        "address": pref.farm_ray_address.strip() if pref else "",
        "retries": int(pref.farm_max_retries) if pref else 3,
    }


class Proc:
    """A backend CLI process with its stdout/stderr in files (a pipe nobody reads could stall it; a detached
    driver outlives Blender). ``detach``: its own session (survives Blender and Ctrl-C in its terminal)."""

    def __init__(self, cmd: list[str], log_dir: Path, name: str, detach: bool = False):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.cmd, self.detach = cmd, detach
        self.out_path, self.err_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
        kwargs: dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0) | (
                getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0) if detach else 0
            )
        elif detach:
            kwargs["start_new_session"] = True
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            try:
                self.p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, **kwargs)
            except OSError as exc:
                raise BackendError("not_found", f"could not start the backend: {exc}", hint=cmd[0]) from exc

    @property
    def done(self) -> bool:
        return self.p.poll() is not None

    @property
    def rc(self) -> int | None:
        return self.p.poll()

    def out(self) -> str:
        return self.out_path.read_text(encoding="utf-8", errors="replace")

    def err(self) -> str:
        try:
            return self.err_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def error(self, what: str) -> BackendError:
        """The process's one clear error (``ex4d ...: error: ...`` on stderr, exit 2) or its last lines."""
        lines = [ln.strip() for ln in self.err().splitlines() if ln.strip()]
        errs = [ln.split(": error: ", 1)[1] for ln in lines if ": error: " in ln]
        if errs:
            message, _, hint = errs[-1].partition(" -- ")
            return BackendError("bad_input" if self.rc == 2 else "internal", f"farm {what}: {message}", hint=hint)
        tail = " | ".join(lines[-3:])[-400:]
        return BackendError("internal", f"farm {what} failed (exit {self.rc})", hint=f"{tail} (log: {self.err_path})")

    def terminate(self) -> None:
        if not self.done:
            self.p.terminate()


class ProcessJob(Job):
    """A runner job whose running phase is a chain of backend CLI processes: ``run_steps`` is a generator
    that yields a :class:`Proc` to wait for it (it is sent back when it has ended) or None to wait one tick,
    and returns the result handed to ``finish``. Prepare, finish slices, progress, modal / blocking,
    cancel: the runner's."""

    uses_backend = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._steps: Generator | None = None
        self.proc: Proc | None = None

    def run_steps(self) -> Generator[Proc | None, Proc | None, dict]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _submit(self) -> None:
        self._steps = self.run_steps()
        self._advance(first=True)

    def _advance(self, first: bool = False) -> None:
        assert self._steps is not None
        try:
            self.proc = next(self._steps) if first else self._steps.send(self.proc)
        except StopIteration as stop:
            self.proc = None
            self._use_result(stop.value or {})
        except BackendError as exc:
            self._fail(exc)
        except (OSError, ValueError, KeyError) as exc:
            self._fail(BackendError("internal", f"{self.label}: {exc!r}"))

    def _tick(self) -> None:
        if self.state == "running" and not self.done:
            if self.proc is None or self.proc.done:
                self._advance()
            return
        super()._tick()

    def cancel(self) -> None:
        if self.state == "running" and not self.done:
            if self.proc is not None and not self.proc.detach:
                self.proc.terminate()
            if self._steps is not None:
                self._steps.close()
            self._end("cancelled", ("WARNING", f"EX-4D: {self.label} cancelled"))
            return
        super().cancel()

    def status(self, text: str, fraction: float, message: str = "") -> None:
        self._set_status(text, fraction, message)


def _store_args(store: str) -> list[str]:
    return ["--store", store] if store else []


# ----------------------------------------------------------------------------------------------
# Submit
# ----------------------------------------------------------------------------------------------
class SubmitJob(ProcessJob):
    """Write the generate job, collect it into the project folder, submit it (or export it for OpenJD)."""

    def run_steps(self):
        x = self.extra
        cli, farm = x["cli"], x["farm"]
        project = Path(farm["project"])
        digest = hashlib.sha1(json.dumps([self.type, self.params], sort_keys=True).encode()).hexdigest()[:8]
        job_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{x['shot']}_{x['camera_name']}_{digest}")
        work = project / "farm" / "submit" / f"{job_name}_{time.strftime('%Y%m%d-%H%M%S')}"
        job_path = outputs.write_job_file(self.type, self.params, work)  # the job Generate runs, as a file
        self.status("Step 1 of 2: collect", 0.2, str(project))
        collect = yield Proc(
            cli + ["farm", "collect", str(job_path), str(project), "--shot", x["shot"], "--job-name", job_name],
            work, "collect",
        )  # fmt: skip
        assert collect is not None
        if collect.rc != 0:
            raise collect.error("collect")
        job_file = json.loads(collect.out().strip().splitlines()[-1])["job_file"]
        if farm["engine"] == "openjd":
            self.status("Step 2 of 2: export (OpenJD)", 0.6, job_file)
            dest = project / "farm" / job_name
            export = yield Proc(
                cli + ["farm", "export", "--engine", "openjd", job_file, str(dest), *_store_args(farm["store"])],
                work, "export",
            )  # fmt: skip
            assert export is not None
            if export.rc != 0:
                raise export.error("export")
            return {"engine": "openjd", "template": json.loads(export.out())["template"], "job_file": job_file}
        result_dir = project / "farm" / "results" / job_name
        cmd = cli + ["farm", "submit", job_file, "--engine", "ray", "--output", str(result_dir)]
        cmd += ["--max-retries", str(farm["retries"]), *_store_args(farm["store"])]
        if farm["address"]:
            cmd += ["--address", farm["address"]]
        self.status("Step 2 of 2: submit (Ray)", 0.6, farm["address"] or "a local Ray cluster")
        driver = Proc(cmd, work, "submit", detach=True)
        while True:
            m = SUBMISSION_LINE.search(driver.err())
            if m:
                break
            if driver.done:
                raise driver.error("submit")
            yield None
        _drivers[m[1]] = driver.p
        return {"engine": "ray", "id": m[1], "job_file": job_file, "result_dir": str(result_dir),
                "log": str(driver.err_path)}  # fmt: skip


def _finish_submit(job: Job, result: dict) -> str:
    x, scene = job.extra, job.scene
    item = scene.ex4d_farm.submissions.add()
    item.engine, item.job_file = result["engine"], result["job_file"]
    item.store = x["farm"]["store"]
    item.camera_name, item.n_frames, item.generator = x["camera_name"], int(x["n_frames"]), job.params["generator"]
    item.out_dir = outputs.rel(x["out_dir"])
    if result["engine"] == "openjd":
        item.state, item.message, item.progress = "exported", result["template"], 1.0
        return (
            f"EX-4D: OpenJD template written: {result['template']} (job {result['job_file']}); "
            "run it with `openjd run` or submit it to Deadline Cloud"
        )
    item.sub_id, item.result_dir, item.state = result["id"], result["result_dir"], "submitted"
    item.message = f"driver log: {result['log']}"
    ensure_timer()
    return (
        f"EX-4D: submitted {result['id']} to Ray ({result['job_file']}); the result loads into the sequencer "
        "when it is done (EX-4D > Farm)"
    )


# ----------------------------------------------------------------------------------------------
# Status, load, cancel
# ----------------------------------------------------------------------------------------------
def apply_status(item, st: dict) -> None:
    """A submission's state, progress (the mean of its steps') and message from ``farm status --json``."""
    steps = st.get("steps") or []
    fracs, message = [], ""
    for s in steps:
        done, total = (s.get("progress") or [0, 0])[:2]
        if s.get("state") == "done":
            fracs.append(1.0)
        else:
            fracs.append(min(1.0, done / total) if total else 0.0)
            if s.get("state") in ("running", "failed", "lost"):
                message = f"{s.get('id')}: {s.get('state')} {s.get('stage') or ''} {done}/{total}".rstrip()
                if s.get("attempt", 1) > 1:
                    message += f" (attempt {s['attempt']})"
                if s.get("state") == "failed" and s.get("error"):
                    message += " -- " + str(s["error"]).strip().splitlines()[-1][:200]
    item.state = str(st.get("state", "?"))
    item.progress = sum(fracs) / len(fracs) if fracs else 0.0
    item.message = message or item.state


def final_result(st: dict) -> dict | None:
    """The final step's ``ex4d run`` result (the generate result a local job returns), its frames read
    from the ``--output`` copy when present (the project folder) else from the shared store."""
    finals = [s for s in st.get("steps") or [] if s.get("final") and s.get("result")]
    if not finals:
        return None
    result = dict(finals[-1]["result"])
    if result.get("output_frames_dir") and Path(result["output_frames_dir"]).is_dir():
        result["frames_dir"] = result["output_frames_dir"]
    return result


class RefreshJob(ProcessJob):
    """``farm status --json`` of unfinished submissions; loads the finished ones into the VSE."""

    def run_steps(self):
        x = self.extra
        subs = self.scene.ex4d_farm.submissions
        for sid, proc in list(_drivers.items()):  # reap finished drivers
            if proc.poll() is not None:
                _drivers.pop(sid, None)
        loads = []
        for i in x["indices"]:
            item = subs[i]
            if item.engine != "ray" or not item.sub_id:
                continue
            if item.state in FINISHED and (item.loaded or not x["load"]) and not x["force"]:
                continue
            proc = yield Proc(
                x["cli"] + ["farm", "status", item.sub_id, "--json", *_store_args(item.store)],
                props.data_dir("farm_logs"), f"status_{item.sub_id}",
            )  # fmt: skip
            assert proc is not None
            item = self.scene.ex4d_farm.submissions[i]
            if proc.rc != 0:
                item.message = proc.error("status").message[:200]
                continue
            st = json.loads(proc.out())
            apply_status(item, st)
            if st.get("state") == "done" and x["load"] and (x["force"] or not item.loaded):
                result = final_result(st)
                if result is not None:
                    loads.append((i, result))
        return {"loads": loads}


def status_bar(scene) -> None:
    """The unfinished submissions' progress in the status bar (UI only; left alone while a job of the
    runner shows its own progress there); cleared when none is left."""
    if bpy.app.background or (runner.active_job() is not None and not runner.active_job().done):
        return
    subs = scene.ex4d_farm.submissions
    parts = [f"{subs[i].sub_id} {subs[i].state} {int(subs[i].progress * 100)}%" for i in _unfinished(scene)]
    text = str(iface_("EX-4D farm: {}")).format(", ".join(parts)) if parts else None
    for window in getattr(bpy.context.window_manager, "windows", []):
        try:
            window.workspace.status_text_set(text)
        except (AttributeError, ReferenceError):
            pass


def _finish_refresh(job: Job, result: dict):
    status_bar(job.scene)
    texts = []
    for i, res in result["loads"]:
        item = job.scene.ex4d_farm.submissions[i]
        job.extra.update(
            camera_name=item.camera_name, n_frames=item.n_frames, warning="",
            out_dir=Path(bpy.path.abspath(item.out_dir)),
        )  # fmt: skip
        text = yield from ops_jobs._finish_generate(job, res)  # exactly what a local generation does
        item = job.scene.ex4d_farm.submissions[i]
        item.loaded, item.strip_name = True, job.extra.get("strip_name", "")
        texts.append(text.replace(f" in {job.seconds()}", f" from farm submission {item.sub_id}"))
    if not texts:
        subs = job.scene.ex4d_farm.submissions
        states = [f"{subs[i].sub_id or subs[i].engine}: {subs[i].state}" for i in job.extra["indices"]]
        return "EX-4D: farm " + (", ".join(states) or "no submissions")
    return "\n".join(texts)


class CancelJob(ProcessJob):
    def run_steps(self):
        x = self.extra
        item = self.scene.ex4d_farm.submissions[x["index"]]
        proc = yield Proc(
            x["cli"] + ["farm", "cancel", item.sub_id, *_store_args(item.store)],
            props.data_dir("farm_logs"), f"cancel_{item.sub_id}",
        )  # fmt: skip
        assert proc is not None
        if proc.rc != 0:
            raise proc.error("cancel")
        item = self.scene.ex4d_farm.submissions[x["index"]]
        item.state, item.message = "cancelling", "cancel requested"
        return {"id": item.sub_id}


def refresh_job(context, indices: list[int], *, load: bool, force: bool = False) -> Job:
    job = RefreshJob(context, "farm_status", {}, [], _finish_refresh, label="Farm status", exclusive=False)
    job.extra.update(cli=backend_cli(context), indices=indices, load=load, force=force)
    return job


# ----------------------------------------------------------------------------------------------
# The UI's timer: refresh unfinished submissions while there are some
# ----------------------------------------------------------------------------------------------
_timer_job: Job | None = None


def _unfinished(scene) -> list[int]:
    farm = getattr(scene, "ex4d_farm", None)
    if farm is None:
        return []
    return [i for i, s in enumerate(farm.submissions) if s.engine == "ray" and s.sub_id and s.state not in FINISHED]


def _timer() -> float | None:
    global _timer_job
    if _timer_job is not None and not _timer_job.done:
        _timer_job.tick()
        return runner.TIMER_STEP
    _timer_job = None
    scenes: list[Any] = list(bpy.data.scenes)  # the add-on's property groups (ex4d_farm) are registered at run time
    for sc in scenes:
        indices = _unfinished(sc)
        if indices:
            ctx = types.SimpleNamespace(scene=sc, preferences=bpy.context.preferences)
            try:
                job = refresh_job(ctx, indices, load=sc.ex4d_farm.auto_load)
                job.start(ctx)
            except BackendError as exc:
                print(f"EX-4D: farm status failed: {exc}")
                return POLL_SECONDS
            _timer_job = job
            return runner.TIMER_STEP
    return None  # nothing unfinished: the timer stops (a new submission starts it again)


def ensure_timer() -> None:
    if bpy.app.background:  # scripts call ex4d.farm_refresh themselves
        return
    if not bpy.app.timers.is_registered(_timer):
        bpy.app.timers.register(_timer, first_interval=POLL_SECONDS, persistent=True)


@bpy.app.handlers.persistent
def _on_load_post(*_args) -> None:
    """A .blend with unfinished submissions: keep following them."""
    global _timer_job
    _timer_job = None
    if any(_unfinished(sc) for sc in bpy.data.scenes):
        ensure_timer()


# ----------------------------------------------------------------------------------------------
# Operators
# ----------------------------------------------------------------------------------------------
class EX4D_OT_submit_farm(ops_jobs._CameraJobOperator, bpy.types.Operator):
    """Collect the shot into the farm project folder and submit the job Generate would run to the farm
    engine of the preferences (Ray; OpenJD: export a template); the result loads into the sequencer when done"""

    bl_idname = "ex4d.submit_farm"
    bl_label = "Submit to Farm"
    bl_options = {"REGISTER"}

    generator: EnumProperty(  # type: ignore[valid-type]
        name="Generator",
        items=ops_jobs.GENERATOR_ITEMS,
        default="EX4D",
    )

    def make_job(self, context) -> Job:
        generator = ops_jobs.chosen_generator(self, context)
        cli, farm = backend_cli(context), farm_settings(context)
        job = ops_jobs.generate_job(context, generator, job_cls=SubmitJob, finish=_finish_submit, label="Farm submit")
        job.stages = ["camera", "collect", "submit"]
        job.extra.update(cli=cli, farm=farm, shot=outputs.shot_name(context))
        return job


class _SubmissionOperator(runner.JobOperator):
    exclusive = False
    index: IntProperty(name="Submission", description="Index in the scene's submissions", default=-1)  # type: ignore[valid-type]

    @classmethod
    def poll(cls, context):
        if context.scene is None or not context.scene.ex4d_farm.submissions:
            runner.poll_message(cls, "No farm submissions in this scene (Submit to Farm first)")
            return False
        return True

    def _item(self, context):
        subs = context.scene.ex4d_farm.submissions
        i = self.index if self.index >= 0 else len(subs) - 1
        if not 0 <= i < len(subs):
            raise ValueError(f"no farm submission {self.index}")
        return i, subs[i]


class EX4D_OT_farm_refresh(_SubmissionOperator, bpy.types.Operator):
    """Ask the farm for the state of the unfinished submissions; load the finished ones into the sequencer"""

    bl_idname = "ex4d.farm_refresh"
    bl_label = "Refresh Farm Status"
    bl_options = {"REGISTER"}

    def make_job(self, context) -> Job:
        subs = context.scene.ex4d_farm.submissions
        indices = [self._item(context)[0]] if self.index >= 0 else list(range(len(subs)))
        return refresh_job(context, indices, load=context.scene.ex4d_farm.auto_load)


class EX4D_OT_farm_load(_SubmissionOperator, bpy.types.Operator):
    """Load a finished farm submission into the sequencer (as a local generation: a version folder and a strip)"""

    bl_idname = "ex4d.farm_load"
    bl_label = "Load Farm Result"
    bl_options = {"REGISTER"}

    def make_job(self, context) -> Job:
        i, item = self._item(context)
        if item.engine != "ray":
            raise ValueError("an exported OpenJD job is run by the render manager: load its frames from there")
        return refresh_job(context, [i], load=True, force=True)


class EX4D_OT_farm_cancel(_SubmissionOperator, bpy.types.Operator):
    """Cancel a farm submission (its running steps stop, queued ones never start)"""

    bl_idname = "ex4d.farm_cancel"
    bl_label = "Cancel Farm Submission"
    bl_options = {"REGISTER"}

    @classmethod
    def poll(cls, context):
        if not super().poll(context):
            return False
        if not _unfinished(context.scene):
            runner.poll_message(cls, "No unfinished farm submission")
            return False
        return True

    def make_job(self, context) -> Job:
        i, item = self._item(context)
        if item.state in FINISHED or not item.sub_id:
            raise ValueError(f"submission {item.sub_id or i} is {item.state}: nothing to cancel")
        job = CancelJob(context, "farm_cancel", {}, [], lambda j, r: f"EX-4D: cancel requested for {r['id']}",
                        label="Farm cancel", exclusive=False)  # fmt: skip
        job.extra.update(cli=backend_cli(context), index=i)
        return job


CLASSES = (EX4D_OT_submit_farm, EX4D_OT_farm_refresh, EX4D_OT_farm_load, EX4D_OT_farm_cancel)


def register() -> None:
    props.register_classes(CLASSES)
    runner.add_handler(bpy.app.handlers.load_post, _on_load_post)


def unregister() -> None:
    global _timer_job
    runner.remove_handler(bpy.app.handlers.load_post, _on_load_post)
    if bpy.app.timers.is_registered(_timer):
        bpy.app.timers.unregister(_timer)
    _timer_job = None
    props.unregister_classes(CLASSES)
