"""Backend jobs from Blender: ``ex4d.render_guide``, ``ex4d.generate``, ``ex4d.check_backend``, ``ex4d.cancel_job``.

Scripting contract (stable names and arguments):

- ``bpy.ops.ex4d.render_guide()``: the novel camera (``scene.ex4d.novel_camera``, else the scene camera when
  it is not the source camera), sampled on every clip frame with constraints, parents, drivers and lens
  animation, is sent to the backend; the colour guide comes back as a PNG sequence shown as the novel
  camera's background image and as a VSE strip (one per camera: re-running replaces it).
- ``bpy.ops.ex4d.generate(generator='EX4D'|'PREVIEW')`` (default: ``scene.ex4d.generator``): depth (if
  needed), guide and generation as ONE backend job; the frames land as a PNG sequence in
  ``<output_dir>/<shot>/<generator>_<camera hash>_s<seed>/`` and as a new image strip on a free VSE channel
  starting at the scene's first frame, with the job's settings as ``ex4d_*`` custom properties.
- ``bpy.ops.ex4d.check_backend()``: versions, devices, VRAM and models into the preferences' ``backend_info``.
- ``bpy.ops.ex4d.cancel_job()``: cancels the running job (as Esc does).

In the UI, render_guide, generate and check_backend are modal (a 0.1 s timer polls the backend; Blender
never waits on it); in background mode (``blender -b``, bpy as a module) they run to completion before
they return. Backend errors become ERROR reports "EX-4D: <message> -- <hint> [<code>]" (a script gets a
RuntimeError from ``bpy.ops``), also kept in ``scene.ex4d.last_error``.

Camera convention (replicated from ``ex4d_backend.cameras``, which the add-on must not import): the
backend's OpenCV world maps to Blender by ``CV_TO_BLENDER`` (X = x, Y = z, Z = -y); a Blender camera looks
down its local -Z with +Y up (``FLIP_YZ`` = diag(1, -1, -1, 1) turns its axes into OpenCV's x right,
y down, z forward). So the OpenCV world-to-camera matrix of a Blender camera is
``E = inv(inv(CV_TO_BLENDER) @ matrix_world @ FLIP_YZ)`` (scale removed from ``matrix_world``), and its
pixel intrinsics at the processing resolution W x H are ``fx = fy = lens / sensor * span``,
``cx = W/2 - shift_x * span``, ``cy = H/2 + shift_y * span``, where ``span`` is W (sensor fit HORIZONTAL,
or AUTO with W >= H) or H (VERTICAL, or AUTO with H > W), and ``sensor`` is ``sensor_height`` for
VERTICAL, else ``sensor_width``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import bpy
import numpy as np
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, PointerProperty, StringProperty

from . import backend, compat, data, props
from .backend_client import BackendError

FLIP_YZ = np.diag([1.0, -1.0, -1.0, 1.0])
GENERATORS = {"EX4D": "ex4d", "PREVIEW": "preview"}
GUIDE_KIND, RESULT_KIND = "guide", "generate"
# The stages a job goes through, in pipeline order ("Step n of N"), and their rough share of the time
# (the progress bar). Stages that come from the store report once ("from the store"); a stage not listed
# here is inserted where it shows up.
GUIDE_STAGES = ("inputs", "frames", "depth", "mesh", "camera", "render", "write")
STAGE_WEIGHT = {"depth": 2.0, "mesh": 3.0, "render": 3.0, "write": 1.5, "load": 3.0, "preview": 3.0,
                "condition": 2.0, "denoise": 40.0, "decode": 3.0}  # fmt: skip


def expected_stages(type_: str, params: dict) -> list[str]:
    """The stages a request is expected to report, in order."""
    if type_ == "render_guide":
        return list(GUIDE_STAGES)
    if type_ == "generate":
        if params.get("generator") == "preview":
            return [*GUIDE_STAGES, "load", "preview", "save"]
        return [*GUIDE_STAGES, "load", "condition", "denoise", "decode", "save"]
    return [type_]


TIMER_STEP = 0.1  # seconds between two polls of the backend in the UI

# Hooks for tests and pipelines: called as hook(job, event) for every event of the active job, after the
# job's state and the scene's progress fields were updated.
event_hooks: list[Callable[[Job, dict], None]] = []
_active_job: Job | None = None
last_backend_info: dict = {}


# ----------------------------------------------------------------------------------------------
# Camera conversion (see the module docstring)
# ----------------------------------------------------------------------------------------------
def blender_to_opencv_extrinsics(matrix_world) -> np.ndarray:
    """OpenCV world-to-camera matrices (N, 4, 4) from Blender camera ``matrix_world`` (N, 4, 4)."""
    m = np.array(matrix_world, dtype=np.float64).reshape(-1, 4, 4)
    rot = m[:, :3, :3]
    m[:, :3, :3] = rot / np.linalg.norm(rot, axis=-2, keepdims=True)  # cameras are rigid: drop scale
    return np.linalg.inv(np.linalg.inv(data.CV_TO_BLENDER) @ m @ FLIP_YZ)


def blender_intrinsics(
    lens: float,
    width: int,
    height: int,
    sensor_width: float = 36.0,
    sensor_height: float = 24.0,
    sensor_fit: str = "AUTO",
    shift_x: float = 0.0,
    shift_y: float = 0.0,
) -> np.ndarray:
    """3x3 pixel intrinsics of a Blender camera rendered at ``width`` x ``height`` (square pixels)."""
    fit = sensor_fit.upper()
    horizontal = fit == "HORIZONTAL" or (fit == "AUTO" and width >= height)
    span = float(width) if horizontal else float(height)
    sensor = sensor_height if fit == "VERTICAL" else sensor_width  # AUTO: sensor_width spans the long side
    f = lens / sensor * span
    return np.array([[f, 0.0, width / 2.0 - shift_x * span], [0.0, f, height / 2.0 + shift_y * span], [0.0, 0.0, 1.0]])


def camera_payload(scene, cam_obj, n_frames: int, width: int, height: int) -> tuple[dict, dict]:
    """The protocol's ``camera`` (OpenCV extrinsics + per-frame intrinsics at the processing size) for
    ``cam_obj`` on scene frames ``frame_start + i`` (i < n_frames), and the raw Blender samples."""
    frames = [scene.frame_start + i for i in range(n_frames)]
    raw = data.sample_camera(scene, cam_obj, frames)
    rw, rh = raw["resolution"]
    if rw and rh and abs(rw / rh - width / height) > 0.01 * (width / height):
        raise BackendError(
            "bad_input",
            f"the render resolution {rw}x{rh} has another aspect ratio than the footage ({width}x{height})",
            hint="set the scene's resolution to the footage's aspect ratio (Import Footage does it)",
        )
    ext = blender_to_opencv_extrinsics(raw["matrix_world"])
    ks = np.stack(
        [
            blender_intrinsics(
                lens,
                width,
                height,
                raw["sensor_width"],
                raw["sensor_height"],
                raw["sensor_fit"],
                raw["shift_x"],
                raw["shift_y"],
            )
            for lens in raw["lens"]
        ]
    )
    if not (np.isfinite(ext).all() and np.isfinite(ks).all()):
        raise BackendError(
            "bad_input", f"the camera '{cam_obj.name}' has a degenerate transform", hint="check its scale"
        )
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", cam_obj.name)[:64] or "camera"
    return {"opencv": {"extrinsics": ext.tolist(), "intrinsics": ks.tolist()}, "name": name}, raw


def novel_camera(context):
    """The camera to render from: ``scene.ex4d.novel_camera``, else the scene camera unless it is the source."""
    s = context.scene.ex4d
    cam = s.novel_camera
    if cam is None and context.scene.camera is not None and context.scene.camera != s.source_camera:
        cam = context.scene.camera
    if cam is None or cam.type != "CAMERA":
        raise BackendError(
            "bad_input",
            "no novel camera",
            hint="add one with Add Camera Preset, or set EX-4D > Novel Camera (the active camera if not the source)",
        )
    return cam


# ----------------------------------------------------------------------------------------------
# Outputs next to the .blend
# ----------------------------------------------------------------------------------------------
def output_root(context) -> Path:
    """``ex4d_job.output_dir`` (default ``//ex4d``) made absolute; for an unsaved .blend a relative folder
    lands in ``<temp>/ex4d_unsaved`` (save the file first to keep results next to it)."""
    out = context.scene.ex4d_job.output_dir or "//ex4d"
    if out.startswith("//") and not bpy.data.filepath:
        return Path(tempfile.gettempdir()) / "ex4d_unsaved" / out[2:].strip("/\\")
    return Path(bpy.path.abspath(out))


def shot_name(context) -> str:
    """A folder-safe name of the footage (file stem, or the image-sequence folder's name)."""
    path = bpy.path.abspath(context.scene.ex4d.footage_path).rstrip("/\\")
    stem = Path(path).stem if path else context.scene.name
    return bpy.path.clean_name(stem) or "shot"


def _install_dir(tmp: Path, final: Path) -> None:
    """Replace ``final`` by the complete folder ``tmp`` (the old one is removed only afterwards)."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _frame_files(folder: str | os.PathLike) -> list[Path]:
    return data.sorted_images(folder)


def copy_sequence(src_files: list[Path], dest: Path, first_frame: int) -> list[Path]:
    """Copy frames to ``dest/frame_<scene frame>.png`` (scene frame = first_frame + i), atomically."""
    tmp = dest.with_name(dest.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for i, f in enumerate(src_files):
        shutil.copyfile(f, tmp / f"frame_{first_frame + i:05d}{f.suffix.lower()}")
    _install_dir(tmp, dest)
    return _frame_files(dest)


def retime_indices(source_frames: list[int], n_clip: int) -> list[int]:
    """For each clip frame i, the generated frame to show: the first one made from clip frame i, else the
    last one made from an earlier clip frame (the generator samples ``num_frames`` of the clip)."""
    src = np.asarray(source_frames, dtype=np.int64)
    out = []
    for i in range(n_clip):
        j = int(np.searchsorted(src, i, side="left"))
        if j >= len(src) or src[j] != i:
            j = max(0, int(np.searchsorted(src, i, side="right")) - 1)
        out.append(j)
    return out


def _rel(path: str | os.PathLike) -> str:
    """``path`` relative to the saved .blend (``//...``) when it can be, so a moved project still works."""
    path = str(path)
    if bpy.data.filepath:
        try:
            return bpy.path.relpath(path)
        except ValueError:  # another drive (Windows)
            pass
    return path


def _relative_strip(strip) -> None:
    """Store an image strip's folder relative to the .blend."""
    directory = _rel(bpy.path.abspath(strip.directory).rstrip("/\\"))
    strip.directory = directory + ("" if directory.endswith(("/", "\\")) else "/")


def _load_sequence_image(files: list[Path], name: str) -> bpy.types.Image:
    """The image sequence starting at ``files[0]`` (reloaded if it is already loaded)."""
    path = str(files[0])
    for img in bpy.data.images:
        if img.source == "SEQUENCE" and os.path.realpath(bpy.path.abspath(img.filepath)) == os.path.realpath(path):
            img.reload()
            return img
    img = bpy.data.images.load(path, check_existing=False)
    img.source = "SEQUENCE"
    img.name = name
    img.filepath = _rel(path)
    return img


def show_on_camera(cam_obj, image: bpy.types.Image, frame_start: int, n_frames: int) -> None:
    """Show ``image`` (a sequence) as ``cam_obj``'s background, replacing an earlier EX-4D guide."""
    cam = cam_obj.data
    bg = None
    for b in cam.background_images:
        if b.image is not None and b.image.get("ex4d_kind") == GUIDE_KIND:
            bg = b
            break
    if bg is None:
        bg = cam.background_images.new()
    bg.image = image
    image["ex4d_kind"] = GUIDE_KIND
    data.configure_image_user(bg.image_user, image, frame_start, n_frames)
    bg.alpha = 1.0
    bg.show_background_image = True
    cam.show_background_images = True


def _remove_strips(scene, kind: str, camera: str) -> None:
    strips = compat.vse_strips(scene)
    for s in list(compat.vse_strips_all(scene)):
        if s.get("ex4d_kind") == kind and s.get("ex4d_camera") == camera:
            strips.remove(s)


# ----------------------------------------------------------------------------------------------
# Jobs
# ----------------------------------------------------------------------------------------------
class Job:
    """One backend request followed to its end: progress goes to ``scene.ex4d`` (``job_stage`` "Step n of
    N: stage (step/total)", ``job_progress`` 0..1 over the whole job, ``job_message``; in the UI also the
    status bar), the result to ``finish(job, result) -> report text``."""

    def __init__(
        self,
        context,
        type_: str,
        params: dict,
        paths: list[str],
        finish: Callable[[Job, dict], str],
        label: str = "",
        exclusive: bool = True,
    ):
        self.scene = context.scene
        self.exclusive = exclusive  # False: runs beside a job (hello), leaves the progress fields alone
        self.type, self.params, self.paths = type_, params, list(paths)
        self.finish_fn, self.label = finish, label or type_
        self.stages = expected_stages(type_, params)
        self.client = self.req = None
        self.events: list[dict] = []
        self.stage, self.stage_pos = "", -1  # the current stage and its index in self.stages
        self.fraction = 0.0
        self.state = "new"  # new -> running -> done | failed | cancelled
        self.report: tuple[str, str] | None = None  # (level, text) when finished
        self.cancel_requested = False
        self.timed_out = False
        self.killed = False  # a second cancel stopped the backend process
        self.started_at = self.finished_at = 0.0
        self._pending: list[dict] = []
        self._warm = None  # the hello sent to a new backend process before the job
        self.hello_seconds = 0.0  # time the new backend process took to answer it
        self._workspace = None

    # -- life cycle --------------------------------------------------------------------------
    def start(self, context) -> None:
        global _active_job
        self.client = backend.get_client(context, self.paths)
        backend.add_listener(self._on_event)
        self.started_at = time.monotonic()
        self._warm = backend.hello_if_new(self.client) if self.type != "hello" else None
        if self._warm is None:
            self.req = self.client.submit(self.type, self.params)
        self.state = "running"
        if not self.exclusive:
            return
        _active_job = self
        s = self.scene.ex4d
        s.job_running, s.job_stage, s.job_progress, s.job_message = True, f"{self.label}: starting", 0.0, ""
        s.last_error = ""
        if not bpy.app.background and getattr(context, "workspace", None) is not None:
            self._workspace = context.workspace  # the status bar shows "Step n of N: stage (Esc: cancel)"

    @property
    def done(self) -> bool:
        return self.state in ("done", "failed", "cancelled")

    def cancel(self) -> None:
        """Ask the backend to stop this job at its next step boundary. A second cancel (Esc twice) stops
        the backend process itself (a hung backend; it is restarted on the next request)."""
        if self.done:
            return
        if self.cancel_requested:
            if not self.killed and self.req is not None:
                self.killed = True
                self._set_status(f"{self.label}: stopping the backend", self.fraction, "")
                self.client.kill()
            return
        self.cancel_requested = True
        self._set_status(f"{self.label}: cancelling", self.fraction, "waiting for the next step boundary")
        if self.req is None:  # still saying hello: the job was never sent
            self.req = self._warm
            self.req.error = {"code": "cancelled", "message": "cancelled before it started"}
            self._finish_request()
            return
        try:
            self.client.cancel(self.req.id)
        except Exception as exc:  # noqa: BLE001 - a dead backend: the exit event ends the job
            print(f"EX-4D: cancel failed: {exc!r}")

    def _on_event(self, event: dict) -> None:
        if self.req is not None and event.get("id") == self.req.id:
            self._pending.append(event)

    def tick(self) -> bool:
        """Poll the backend (never blocks), apply new events; True when the job has finished."""
        if self.done:
            return True
        self.client.poll()
        if self.req is None:  # a new backend process: its hello first, then the job
            if not self._warm.done:
                return False
            try:
                backend.note_hello(self.client, self._warm)
            except BackendError as exc:
                self.req = self._warm  # fail the job with the hello's error
                self.req.error = self.req.error or {"code": exc.code, "message": exc.message, "hint": exc.hint}
                self._finish_request()
                return True
            self.hello_seconds = time.monotonic() - self.started_at
            self.req = self.client.submit(self.type, self.params)
            self.client.poll()
        while self._pending and not self.done:
            event = self._pending.pop(0)
            self.events.append(event)
            self._apply(event)
            for hook in list(event_hooks):
                hook(self, event)
        if not self.done and self.req.done and not self._pending:  # events consumed before we listened
            self._finish_request()
        return self.done

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
            time.sleep(0.01)

    # -- events ------------------------------------------------------------------------------
    def _apply(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "queued":
            self._set_status(f"{self.label}: queued ({event.get('position')})", 0.0, "waiting for another job")
        elif kind == "progress":
            stage = event.get("stage", "")
            if stage != self.stage:
                later = [i for i in range(self.stage_pos + 1, len(self.stages)) if self.stages[i] == stage]
                if later:  # stages skipped on the way count as done
                    self.stage_pos = later[0]
                else:
                    self.stage_pos += 1
                    self.stages.insert(self.stage_pos, stage)
                self.stage = stage
            step, total = int(event.get("step", 0)), int(event.get("total", 0))
            within = min(1.0, step / total) if total else 0.0
            weights = [STAGE_WEIGHT.get(st, 1.0) for st in self.stages]
            done = sum(weights[: self.stage_pos]) + weights[self.stage_pos] * within
            frac = max(self.fraction, min(1.0, done / sum(weights)))
            text = f"Step {self.stage_pos + 1} of {len(self.stages)}: {stage}"
            if total:
                text += f" ({step}/{total})"
            if self.cancel_requested:
                text = f"{self.label}: cancelling ({stage})"
            self._set_status(text, frac, event.get("message", ""))
        elif kind in ("result", "error"):
            self._finish_request()

    def _set_status(self, stage: str, fraction: float, message: str) -> None:
        self.fraction = fraction
        if not self.exclusive:
            return
        s = self.scene.ex4d
        s.job_stage, s.job_progress, s.job_message = stage, fraction, message[:200]
        if self._workspace is not None:
            try:
                self._workspace.status_text_set(f"EX-4D {stage} {int(fraction * 100)}%: {message[:80]}  (Esc: cancel)")
            except ReferenceError:  # the workspace went away (file loaded)
                self._workspace = None
        _redraw()

    def _finish_request(self) -> None:
        backend.remove_listener(self._on_event)
        self.finished_at = time.monotonic()
        req = self.req
        try:
            if req.error is not None:
                err = req.error
                code = err.get("code")
                if code == "cancelled" or self.killed or (self.cancel_requested and code != "backend_died"):
                    self.state = "cancelled"
                    why = "stopped: time limit reached" if self.timed_out else "cancelled"
                    if self.killed:
                        why += " (the backend was stopped; it restarts on the next request)"
                    self.report = ("WARNING", f"EX-4D: {self.label} {why}; nothing was added")
                elif err.get("code") == "backend_died":
                    self.state = "failed"
                    tail = [line for line in err.get("log_tail") or [] if line.strip()]
                    hint = "it is restarted on the next request"
                    if tail:
                        hint += f"; its last log line: {tail[-1].strip()[:200]}"
                    msg = f"the backend stopped during {self.label} ({err.get('message', '')})"
                    self.report = ("ERROR", backend.error_text({"code": "backend_died", "message": msg, "hint": hint}))
                else:
                    self.state = "failed"
                    self.report = ("ERROR", backend.error_text(err))
            else:
                try:
                    text = self.finish_fn(self, req.result or {})
                    self.state = "done"
                    self.report = ("INFO", text)
                except BackendError as exc:
                    self.state, self.report = "failed", ("ERROR", backend.error_text(exc))
                except Exception as exc:  # noqa: BLE001 - an add-on bug must still end the job cleanly
                    self.state, self.report = "failed", ("ERROR", f"EX-4D: could not use the result: {exc!r}")
        finally:
            self._reset_ui()

    def _reset_ui(self) -> None:
        global _active_job
        s = self.scene.ex4d
        if not self.exclusive:
            if self.state == "failed":
                s.last_error = self.report[1][:1000]
            return
        s.job_running = False
        if self.state == "done":
            s.job_stage, s.job_progress, s.job_message = f"{self.label}: done", 1.0, self.report[1][:200]
        else:
            s.job_stage, s.job_progress, s.job_message = "", 0.0, ""
            if self.state == "failed":
                s.last_error = self.report[1][:1000]
        if self._workspace is not None:
            try:
                self._workspace.status_text_set(None)
            except ReferenceError:
                pass
            self._workspace = None
        if _active_job is self:
            _active_job = None
        _redraw()


def active_job() -> Job | None:
    return _active_job


def _redraw() -> None:
    if bpy.app.background:
        return
    wm = bpy.context.window_manager
    for window in getattr(wm, "windows", []):
        for area in window.screen.areas:
            if area.type in {"VIEW_3D", "SEQUENCE_EDITOR", "PREFERENCES", "PROPERTIES"}:
                area.tag_redraw()


def _clip_info(context) -> tuple[dict, list[str], int, int, int]:
    """(params, paths, n_frames, width, height) of the scene's clip, probing the footage when
    Import Footage has not recorded its processing size."""
    params, paths = backend.clip_params(context)
    s = context.scene.ex4d
    w, h, n = s.processing_width, s.processing_height, s.n_frames
    if not (w and h and n):
        probe_params = {k: params[k] for k in ("footage", "max_side", "focal_px") if k in params}
        info = backend.run_blocking(context, "probe_footage", probe_params, paths, timeout=120)
        w, h, n = int(info["processing_width"]), int(info["processing_height"]), int(info["frame_count"])
        if s.max_frames:
            n = min(n, int(s.max_frames))
    params["renderer"] = context.scene.ex4d_job.renderer
    return params, paths, int(n), int(w), int(h)


# ----------------------------------------------------------------------------------------------
# Result handlers
# ----------------------------------------------------------------------------------------------
def _finish_guide(job: Job, result: dict) -> str:
    scene = job.scene
    s = scene.ex4d
    cam = bpy.data.objects.get(job.camera_name)
    n = int(result["n_frames"])
    src = _frame_files(backend.store_path(result["color_dir"]))[:n]
    mask = _frame_files(backend.store_path(result["mask_dir"]))[:n]
    dest = job.out_dir / f"guide_{result['camera_hash'][:10]}"
    files = copy_sequence(src, dest / "color", scene.frame_start)
    copy_sequence(mask, dest / "mask", scene.frame_start)
    image = _load_sequence_image(files, f"EX4D Guide {job.camera_name}")
    if cam is not None:
        show_on_camera(cam, image, scene.frame_start, n)
    _remove_strips(scene, GUIDE_KIND, job.camera_name)
    settings = {
        "kind": GUIDE_KIND,
        "camera": job.camera_name,
        "camera_hash": result["camera_hash"],
        "job": result.get("job", ""),
        "job_file": result.get("job_file", ""),
        "footage": job.params["footage"],
    }
    _relative_strip(data.add_image_strip(scene, f"EX4D Guide {job.camera_name}", files, scene.frame_start, settings))
    s.guide_color_dir = str(dest / "color")
    s.guide_mask_dir = str(dest / "mask")
    s.camera_hash = result["camera_hash"]
    return f"EX-4D: guide of '{job.camera_name}' ({n} frames) in {_seconds(job)} -> {dest}"


def _finish_generate(job: Job, result: dict) -> str:
    scene = job.scene
    n_clip = job.n_frames
    gen_files = _frame_files(backend.store_path(result["frames_dir"]))
    idx = retime_indices(result.get("source_frames") or list(range(len(gen_files))), n_clip)
    settings = dict(result.get("settings") or {})
    name = f"{settings.get('generator', 'gen')}_{result['camera_hash'][:10]}_s{settings.get('seed', 0)}"
    dest = job.out_dir / name
    files = copy_sequence([gen_files[min(j, len(gen_files) - 1)] for j in idx], dest, scene.frame_start)
    job_copy = ""
    if result.get("job_file") and os.path.isfile(result["job_file"]):
        job_copy = str(dest / "job.json")
        shutil.copyfile(result["job_file"], job_copy)
    meta = {
        "kind": RESULT_KIND,
        "camera": job.camera_name,
        "camera_hash": result["camera_hash"],
        "generator": settings.get("generator", ""),
        "model": "Wan-AI/Wan2.1-I2V-14B-480P + yihouxiang/EX-4D"
        if settings.get("generator") == "ex4d"
        else "preview (no model)",
        "seed": int(settings.get("seed", 0)),
        "steps": int(settings.get("steps", 0)),
        "cfg": float(settings.get("cfg", 0.0)),
        "shift": float(settings.get("shift", 0.0)),
        "prompt": settings.get("prompt", ""),
        "negative_prompt": settings.get("negative_prompt", ""),
        "width": int(result.get("width", 0)),
        "height": int(result.get("height", 0)),
        "num_frames": int(settings.get("num_frames", 0)),
        "settings": settings,
        "source_frames": result.get("source_frames", []),
        "job": result.get("job", ""),
        "job_file": job_copy or result.get("job_file", ""),
        "footage": job.params["footage"],
        "frames_dir": str(dest),
    }
    with open(dest / "settings.json", "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=1)
    strip = data.add_image_strip(scene, f"EX4D {name}", files, scene.frame_start, meta)
    _relative_strip(strip)
    job.strip_name = strip.name
    return (
        f"EX-4D: {len(files)} frames ({settings.get('generator')}) in {_seconds(job)} -> {dest} (strip '{strip.name}')"
    )


def _seconds(job: Job) -> str:
    text = f"{time.monotonic() - job.started_at:.1f} s"
    if job.hello_seconds:
        text += f" (backend start {job.hello_seconds:.1f} s)"
    return text


def _finish_hello(job: Job, info: dict) -> str:
    backend.note_hello(job.client, job.req)  # records it; a protocol mismatch is reported
    doctor = last_backend_info.get("doctor")
    last_backend_info.clear()
    last_backend_info.update(info)
    text = format_backend_info(info)
    if doctor:
        last_backend_info["doctor"] = doctor
        t = doctor.get("torch") or {}
        text += f"\nDoctor: torch {t.get('version')}, CUDA {t.get('cuda')}, nvdiffrast {doctor.get('nvdiffrast')}"
    pref = props.prefs()
    if pref is not None:
        pref.backend_info = text
    return "EX-4D: " + text.split("\n", 1)[0]


def format_backend_info(info: dict) -> str:
    """The preferences' lines: versions, devices with VRAM, models present and missing."""
    gib = 1024**3
    lines = [
        f"Backend {info.get('backend_version', '?')} (protocol {info.get('protocol', '?')}), "
        f"Python {info.get('python', '?')}, torch {info.get('torch') or 'missing'}, "
        f"CUDA {'yes' if info.get('cuda') else 'no'}"
    ]
    for d in info.get("devices") or []:
        lines.append(
            f"GPU {d.get('index')}: {d.get('name')}, {d.get('free_vram', 0) / gib:.1f} of "
            f"{d.get('total_vram', 0) / gib:.1f} GiB free"
        )
    if not info.get("devices"):
        lines.append("GPU: none (CPU only: the guide and the preview work, EX-4D generation needs a GPU)")
    models = info.get("models") or {}
    present = sorted(k for k, v in models.items() if v.get("present"))
    missing = sorted(k for k, v in models.items() if not v.get("present"))
    lines.append("Models present: " + (", ".join(present) or "none"))
    if missing:
        lines.append("Models missing: " + ", ".join(missing))
    if info.get("models_dir"):
        lines.append(f"Models folder: {info['models_dir']}")
    if info.get("store"):
        lines.append(f"Job store: {info['store']}")
    if info.get("torch_error"):
        lines.append(f"torch error: {info['torch_error']}")
    return "\n".join(lines)


def run_doctor(context, timeout: float = 300.0) -> dict:
    """``<backend python> -m ex4d_backend doctor --json`` (blocking; slower than ``hello``: it imports
    every package). Raises BackendError."""
    pref = props.prefs(context)
    python, where = props.find_backend_python(pref.backend_python if pref else "")
    if not python:
        raise BackendError("not_found", "backend Python not found", hint=where)
    try:
        proc = subprocess.run(
            [python, "-m", "ex4d_backend", "doctor", "--json"], capture_output=True, text=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BackendError("internal", f"ex4d doctor failed: {exc}", hint=f"backend Python: {python}") from exc
    try:
        return json.loads(proc.stdout)
    except ValueError as exc:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise BackendError("internal", "ex4d doctor gave no report", hint=" | ".join(tail)) from exc


# ----------------------------------------------------------------------------------------------
# Operators
# ----------------------------------------------------------------------------------------------
class _JobOperator:
    """Shared modal / blocking machinery: subclasses implement ``make_job(context) -> Job``."""

    _timer = None
    job: Job | None = None

    def make_job(self, context) -> Job:  # pragma: no cover - abstract
        raise NotImplementedError

    def _error(self, context, exc: Exception) -> set[str]:
        text = backend.error_text(exc) if isinstance(exc, BackendError) else f"EX-4D: {exc}"
        context.scene.ex4d.last_error = text[:1000]
        self.report({"ERROR"}, text)
        return {"CANCELLED"}

    exclusive = True

    def execute(self, context):
        if self.exclusive and _active_job is not None and not _active_job.done:
            self.report({"ERROR"}, f"EX-4D: a job is running ({_active_job.label}); wait or cancel it")
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
        wm = context.window_manager
        self._timer = wm.event_timer_add(TIMER_STEP, window=context.window)
        wm.modal_handler_add(self)
        return {"RUNNING_MODAL"}

    def invoke(self, context, event):
        return self.execute(context)

    def modal(self, context, event):
        if event.type == "ESC" and event.value == "PRESS":
            self.job.cancel()
            return {"RUNNING_MODAL"}  # Esc is ours while the job runs
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
        level, text = self.job.report or ("INFO", "EX-4D: done")
        self.report({level}, text)
        return {"FINISHED"} if self.job.state == "done" else {"CANCELLED"}


class EX4D_OT_render_guide(_JobOperator, bpy.types.Operator):
    """Render the colour/mask guide of the novel camera with the backend and show it (camera
    background and a VSE strip): the disoccluded regions, before spending GPU minutes"""

    bl_idname = "ex4d.render_guide"
    bl_label = "Render Guide"
    bl_options = {"REGISTER"}

    def make_job(self, context) -> Job:
        return guide_job(context)


class EX4D_OT_generate(_JobOperator, bpy.types.Operator):
    """Depth (if needed), guide and generation as one backend job; the frames land as a PNG sequence
    next to the .blend and as an image strip in the sequencer"""

    bl_idname = "ex4d.generate"
    bl_label = "Generate"
    bl_options = {"REGISTER"}

    generator: EnumProperty(
        name="Generator",
        items=[("EX4D", "EX-4D", "Wan2.1 + EX-4D (GPU)"), ("PREVIEW", "Preview", "Inpainting preview, no model (CPU)")],
        default="EX4D",
    )

    def make_job(self, context) -> Job:
        generator = self.generator if self.properties.is_property_set("generator") else context.scene.ex4d.generator
        return generate_job(context, generator)


def guide_job(context) -> Job:
    """The (not yet started) render_guide job of the scene's novel camera."""
    params, paths, n, w, h = _clip_info(context)
    cam = novel_camera(context)
    params["camera"], _raw = camera_payload(context.scene, cam, n, w, h)
    job = Job(context, "render_guide", params, paths, _finish_guide, label="Guide")
    job.camera_name, job.n_frames = cam.name, n
    job.out_dir = output_root(context) / shot_name(context)
    return job


def generate_job(context, generator: str) -> Job:
    """The (not yet started) generate job (``generator``: 'EX4D' or 'PREVIEW') of the scene's novel camera."""
    s, js = context.scene.ex4d, context.scene.ex4d_job
    params, paths, n, w, h = _clip_info(context)
    cam = novel_camera(context)
    params["camera"], _raw = camera_payload(context.scene, cam, n, w, h)
    params.update(
        {
            "generator": GENERATORS[generator],
            "steps": int(s.steps),
            "seed": int(s.seed),
            "prompt": s.prompt,
            "cfg": float(js.cfg),
            "shift": float(js.shift),
            "width": int(js.width),
            "height": int(js.height),
            "num_frames": int(js.num_frames),
            "vram_profile": _pref(context, "vram_profile", "full"),
            "device": _pref(context, "device", "auto"),
        }
    )
    if js.negative_prompt:
        params["negative_prompt"] = js.negative_prompt
    job = Job(context, "generate", params, paths, _finish_generate, label=f"Generate ({generator.lower()})")
    job.camera_name, job.n_frames = cam.name, n
    job.out_dir = output_root(context) / shot_name(context)
    return job


class EX4D_OT_check_backend(_JobOperator, bpy.types.Operator):
    """Start the backend and show its versions, GPU, VRAM and models in the preferences"""

    bl_idname = "ex4d.check_backend"
    bl_label = "Check Backend"
    bl_options = {"REGISTER"}
    exclusive = False  # hello is answered at once, even while a job runs

    doctor: BoolProperty(
        name="Full Report", description="Also run 'ex4d doctor --json' (slower; blocks)", default=False
    )

    def make_job(self, context) -> Job:
        return Job(context, "hello", {}, [], _finish_hello, label="Check backend", exclusive=False)

    def execute(self, context):
        if backend.busy_unwelcomed():
            self.report(
                {"WARNING"}, "EX-4D: the backend is busy with its first job; check it again when the job has finished"
            )
            return {"CANCELLED"}
        if self.doctor:  # an explicit request for the full report: blocks while doctor runs
            try:
                last_backend_info["doctor"] = run_doctor(context)
            except BackendError as exc:
                return self._error(context, exc)
        return super().execute(context)


class EX4D_OT_cancel_job(bpy.types.Operator):
    """Cancel the running EX-4D job (it stops at its next step boundary; nothing is added)"""

    bl_idname = "ex4d.cancel_job"
    bl_label = "Cancel Job"
    bl_options = {"REGISTER"}

    @classmethod
    def poll(cls, context):
        return _active_job is not None and not _active_job.done

    def execute(self, context):
        _active_job.cancel()
        self.report({"INFO"}, f"EX-4D: cancelling {_active_job.label}")
        return {"FINISHED"}


def _pref(context, name: str, default: str) -> str:
    pref = props.prefs(context)
    return getattr(pref, name, default) if pref is not None else default


# ----------------------------------------------------------------------------------------------
# Settings and the sub-panel
# ----------------------------------------------------------------------------------------------
class EX4D_JobSettings(bpy.types.PropertyGroup):
    """Job settings beyond ``scene.ex4d`` (``scene.ex4d_job``)."""

    width: IntProperty(
        name="Width", description="Generated width (px, multiple of 16)", default=512, min=16, max=4096, step=16
    )
    height: IntProperty(
        name="Height", description="Generated height (px, multiple of 16)", default=512, min=16, max=4096, step=16
    )
    num_frames: IntProperty(
        name="Frames",
        description="Generated frames (4k + 1), sampled over the clip (the reference: 49)",
        default=49,
        min=1,
        max=1000,
    )
    cfg: FloatProperty(name="CFG", default=5.0, min=0.0, max=100.0)
    shift: FloatProperty(name="Shift", default=5.0, min=0.0, max=100.0)
    negative_prompt: StringProperty(name="Negative Prompt", description="Empty: the reference's", default="")
    renderer: EnumProperty(
        name="Guide Renderer",
        items=[("auto", "Auto", "CUDA when available"), ("cpu", "CPU", ""), ("cuda", "CUDA", "")],
        default="auto",
    )
    output_dir: StringProperty(
        name="Output Folder",
        description="Where guides and results are written (// = next to the .blend; unsaved files: the temp folder)",
        default="//ex4d",
        subtype="DIR_PATH",
    )
    timeout: FloatProperty(
        name="Time Limit",
        description="Background mode: cancel a job after this many seconds (0: none)",
        default=0.0,
        min=0.0,
    )


class EX4D_PT_jobs(bpy.types.Panel):
    bl_label = "Generation Settings"
    bl_idname = "EX4D_PT_jobs"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "EX-4D"
    bl_parent_id = "EX4D_PT_main"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        js = context.scene.ex4d_job
        col = self.layout.column()
        row = col.row(align=True)
        row.prop(js, "width")
        row.prop(js, "height")
        col.prop(js, "num_frames")
        row = col.row(align=True)
        row.prop(js, "cfg")
        row.prop(js, "shift")
        col.prop(js, "negative_prompt")
        col.prop(js, "renderer")
        col.prop(js, "output_dir")
        job = _active_job
        if job is not None and not job.done:
            col.operator("ex4d.cancel_job", icon="CANCEL")


_panel_registered = False


def _register_panel() -> float | None:
    """Register the sub-panel once its parent (panels.py, registered after this module) exists."""
    global _panel_registered
    if not _panel_registered and hasattr(bpy.types, "EX4D_PT_main"):
        bpy.utils.register_class(EX4D_PT_jobs)
        _panel_registered = True
    return None


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


CLASSES = (EX4D_JobSettings, EX4D_OT_render_guide, EX4D_OT_generate, EX4D_OT_check_backend, EX4D_OT_cancel_job)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.ex4d_job = PointerProperty(type=EX4D_JobSettings)
    bpy.app.handlers.load_pre.append(_on_load_pre)
    bpy.app.handlers.load_post.append(_on_load_post)
    if hasattr(bpy.types, "EX4D_PT_main"):
        _register_panel()
    elif not bpy.app.background:
        bpy.app.timers.register(_register_panel, first_interval=0.2)


def unregister() -> None:
    global _panel_registered, _active_job
    if _active_job is not None and not _active_job.done:
        _active_job.cancel()
    _active_job = None
    if _on_load_pre in bpy.app.handlers.load_pre:
        bpy.app.handlers.load_pre.remove(_on_load_pre)
    if _on_load_post in bpy.app.handlers.load_post:
        bpy.app.handlers.load_post.remove(_on_load_post)
    if _panel_registered:
        bpy.utils.unregister_class(EX4D_PT_jobs)
        _panel_registered = False
    del bpy.types.Scene.ex4d_job
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
