"""Backend jobs from Blender: ``ex4d.render_guide``, ``ex4d.generate``, ``ex4d.check_backend``, ``ex4d.cancel_job``.

Scripting contract (stable names and arguments):

- ``bpy.ops.ex4d.render_guide()``: the novel camera (``scene.ex4d.novel_camera``; there is no silent
  fallback to the scene camera), sampled on every clip frame with constraints, parents, drivers, lens and
  lens-shift animation, is sent RAW to the backend (which does the camera maths); the colour guide comes
  back as a PNG sequence shown as the novel camera's background image and as a VSE strip (one per camera:
  re-running replaces it). The report gives the guide's masked share (a WARNING when most is unseen).
- ``bpy.ops.ex4d.generate(generator='EX4D'|'PREVIEW')`` (default: ``scene.ex4d.generator``): depth (if
  needed), guide and generation as ONE backend job; the frames land as a PNG sequence in a new version
  folder ``<output_dir>/<shot>/<generator>_<camera hash>_v<NNN>/`` (never overwritten; the same settings
  again reuse their version and strip) and as an image strip on a free VSE channel, fitted to the frame,
  with the job's settings as ``ex4d_*`` custom properties.
- ``bpy.ops.ex4d.check_backend()``: versions, devices, VRAM and models into the preferences' ``backend_info``.
- ``bpy.ops.ex4d.cancel_job()``: cancels the running job (as Esc does).

All run through :mod:`.runner` (modal in the UI, blocking in background mode). Backend errors become
ERROR reports "EX-4D: <message> -- <hint> [<code>]" (a script gets a RuntimeError from ``bpy.ops``), also
kept in ``scene.ex4d.last_error``.
"""

from __future__ import annotations

import json
import subprocess
from types import SimpleNamespace

import bpy
from bpy.props import BoolProperty, EnumProperty

from . import (
    backend,
    data,
    history,
    history_ui,
    outputs,
    props,
    results_scene,
    runner,
    sampling,
    source_camera,
    stereo_ui,
    strips,
)
from .backend_client import BackendError
from .runner import Job

GENERATORS = {"EX4D": "ex4d", "PREVIEW": "preview"}
MASKED_WARNING = 0.5  # a guide with more than this share unseen (masked) is reported as a WARNING
last_backend_info: dict = {}


def _clip_frames(context) -> int:
    """The number of clip frames to sample the camera on: the imported clip's, else the scene's range (the
    backend says clearly when that is shorter than the clip). Never probes the footage on the main thread."""
    s = context.scene.ex4d
    n = s.n_frames or (context.scene.frame_end - context.scene.frame_start + 1)
    n = min(n, s.max_frames) if s.max_frames else n
    cap = preview_range_frames(context)
    return min(n, cap) if cap else n


def preview_range_frames(context) -> int:
    """Clip frames up to the end of the scene's preview range (0: the option is off, or no preview range)."""
    scene = context.scene
    if not (scene.ex4d_job.use_preview_range and scene.use_preview_range):
        return 0
    return max(1, scene.frame_preview_end - scene.frame_start + 1)


def _camera_job(
    context, type_: str, params: dict, paths: list, finish, label: str, require=None, job_cls: type[Job] = Job
) -> Job:
    cam = sampling.novel_camera(context)
    n = _clip_frames(context)
    params["renderer"] = context.scene.ex4d_job.renderer
    job = job_cls(context, type_, params, paths, finish, label=label, require=require,
              prepare=sampling.camera_job_prepare(context, cam, n))  # fmt: skip
    root, warning = outputs.output_root(context)
    job.extra.update(camera_name=cam.name, n_frames=n, out_dir=root / outputs.shot_name(context), warning=warning)
    return job


def guide_job(context) -> Job:
    """The (not yet started) render_guide job of the scene's novel camera."""
    params, paths = backend.clip_params(context)
    return stereo_ui.extend(context, _camera_job(context, "render_guide", params, paths, _finish_guide, "Guide"))


def require_ex4d_generator(info: dict) -> None:
    """Refuse EX-4D generation up front when the backend has no CUDA GPU or lacks the weights (it would
    render the guide, then fail at 'load')."""
    models = info.get("models") or {}
    missing = sorted(k for k, v in models.items() if (k == "ex4d" or k.startswith("wan")) and not v.get("present"))
    if not info.get("cuda"):
        raise BackendError(
            "device", "EX-4D generation needs a CUDA GPU and the backend has none",
            hint="use the Preview generator here, or run the backend on a GPU machine",
        )  # fmt: skip
    if missing:
        raise BackendError(
            "model_missing", "the EX-4D weights are missing: " + ", ".join(missing),
            hint="download them with `ex4d models download` (see the README), or use the Preview generator",
        )  # fmt: skip


def generate_job(context, generator: str, job_cls: type[Job] | None = None, finish=None, label: str = "") -> Job:
    """The (not yet started) generate job (``generator``: 'EX4D' or 'PREVIEW') of the scene's novel camera.
    ``job_cls``/``finish``: another runner of the same request (``farm.SubmitJob`` writes it as a job file
    for a farm instead of sending it to the local backend; no local GPU check then)."""
    s, js = context.scene.ex4d, context.scene.ex4d_job
    params, paths = backend.clip_params(context)
    params.update(
        {
            "generator": GENERATORS[generator],
            "steps": int(s.steps),
            "seed": int(s.seed),
            "prompt": s.prompt,
            "cfg": float(js.cfg),
            "shift": float(js.shift),
            "vram_profile": _pref(context, "vram_profile", "full"),
            "device": _pref(context, "device", "auto"),
            **shot_params(context),
        }
    )
    if js.negative_prompt:
        params["negative_prompt"] = js.negative_prompt
    if job_cls is not None:
        return _camera_job(context, "generate", params, paths, finish, label, None, job_cls)
    require = require_ex4d_generator if generator == "EX4D" else None
    job = _camera_job(context, "generate", params, paths, _finish_generate, f"Generate ({generator.lower()})", require)
    return stereo_ui.extend(context, job)  # issue 18: stereo eyes, EXR passes, the camera background


# -- long and wide shots (issue 14) ----------------------------------------------------------------
def shot_params(context) -> dict:
    """The generate request's size and window settings (PROTOCOL.md ``generate``): size ``auto`` (the
    footage's aspect) unless Width / Height are set, the window, chaining, overlap (0: the default) and frame sampling; the
    whole clip, or up to the end of the scene's preview range (``max_frames`` from the clip's start)."""
    js = context.scene.ex4d_job
    out: dict = {
        "num_frames": int(js.num_frames),
        "frame_sampling": js.frame_sampling,
        "chain_variant": js.chain_variant,
    }
    out["size"] = "auto"  # width / height 0: auto; one given: the other from the footage's aspect
    if js.width:
        out["width"] = int(js.width)
    if js.height:
        out["height"] = int(js.height)
    if js.overlap:
        out["overlap"] = int(js.overlap)
    if preview_range_frames(context):
        out["max_frames"] = _clip_frames(context)
    return out


def result_kinds(result: dict) -> list[tuple[str, str, str]]:
    """(strip kind, result folder, name suffix) of each result a generate job returned: the generated
    frames, and the full-resolution composite when there is one."""
    kinds = [(strips.RESULT_KIND, result["frames_dir"], "")]
    if result.get("composite_dir"):
        kinds.append((strips.COMPOSITE_KIND, result["composite_dir"], " composite"))
    return kinds


def _pref(context, name: str, default: str) -> str:
    pref = props.prefs(context)
    return getattr(pref, name, default) if pref is not None else default


def masked_share(per_frame: list, n: int) -> float:
    """The share of guide pixels the source never saw (mask 0) over the first ``n`` frames, from the
    backend's per-frame shares (``render_guide``'s ``masked_share``)."""
    shares = [float(v) for v in per_frame[:n]]
    return sum(shares) / len(shares) if shares else 0.0


# ----------------------------------------------------------------------------------------------
# Result handlers (generators: the runner runs them one slice per tick)
# ----------------------------------------------------------------------------------------------
def _finish_guide(job: Job, result: dict):
    scene, x = job.scene, job.extra
    s = scene.ex4d
    n = int(result["n_frames"])
    src = data.sorted_images(backend.store_path(result["color_dir"]))[:n]
    mask = data.sorted_images(backend.store_path(result["mask_dir"]))[:n]
    dest = x["out_dir"] / f"guide_{result['camera_hash'][:10]}"
    files = yield from outputs.copy_sequence(src, dest / "color", scene.frame_start)
    yield from outputs.copy_sequence(mask, dest / "mask", scene.frame_start)
    cam = bpy.data.objects.get(x["camera_name"])
    image = strips.load_sequence_image(files, f"EX4D Guide {x['camera_name']}")
    yield
    if cam is not None:
        strips.show_on_camera(cam, image, scene.frame_start, n)
    target = results_scene.target(scene)  # issue 18: strips never in the main scene's F12 render (a setting)
    strips.remove_strips(target, strips.GUIDE_KIND, x["camera_name"])
    yield
    settings = {"kind": strips.GUIDE_KIND, "camera": x["camera_name"], "camera_hash": result["camera_hash"],
                "job": result.get("job", ""), "footage": s.footage_path}  # fmt: skip
    results_scene.place(
        scene, strips.add_image_strip(target, f"EX4D Guide {x['camera_name']}", files, scene.frame_start, settings)
    )
    yield
    s.guide_color_dir = outputs.rel(dest / "color")
    s.guide_mask_dir = outputs.rel(dest / "mask")
    s.camera_hash = result["camera_hash"]
    share = masked_share(result.get("masked_share", []), n)
    text = f"EX-4D: guide of '{x['camera_name']}' ({n} frames, {share:.0%} unseen) in {job.seconds()} -> {dest}"
    notes = [x["warning"]] if x["warning"] else []
    frame0 = source_camera.note_guide(scene, result, x["camera_name"])  # issue 15: the novel camera's start
    if frame0:
        notes.append(frame0)
    if share > MASKED_WARNING:
        notes.append(f"{share:.0%} of the guide is unseen by the source: is '{x['camera_name']}' the intended camera?")
    s.last_warning = "; ".join(notes)
    if notes:
        job.report_level = "WARNING"
        text += " -- " + "; ".join(notes)
    return text


def _finish_generate(job: Job, result: dict):
    """One strip per result kind (generated frames; the composite at the guide's resolution), both fitted
    to the render size, strip frame k at scene frame ``clip start + k`` (``frame_sampling`` reference: the
    frame made from clip frame k, ``source_frames``)."""
    scene, x = job.scene, job.extra
    idx = outputs.retime_indices(result.get("source_frames") or list(range(int(result["n_frames"]))), x["n_frames"])
    settings = dict(result.get("settings") or {})
    prefix = f"{settings.get('generator', 'gen')}_{result['camera_hash'][:10]}"
    dest, existing = outputs.version_dir(x["out_dir"], prefix, result.get("job", ""))
    kinds = result_kinds(result)
    folders = {strips.RESULT_KIND: dest, strips.COMPOSITE_KIND: dest / "composite"}
    if existing:
        loaded = [
            st
            for st in strips.strips_where(results_scene.strips_scene(scene))
            if st.get("ex4d_kind") in folders and strips.strip_folder(st) == str(folders[st.get("ex4d_kind")].resolve())
        ]
        if loaded:
            job.extra["strip_name"] = loaded[0].name
            return f"EX-4D: this result is already loaded: strip '{loaded[0].name}' ({dest})"
    files: dict[str, list] = {}
    for kind, folder, _ in kinds:
        if existing and folders[kind].is_dir():
            files[kind] = data.sorted_images(folders[kind])
            continue
        src = data.sorted_images(backend.store_path(folder))
        if not src:
            continue
        files[kind] = yield from outputs.copy_sequence(
            [src[min(j, len(src) - 1)] for j in idx], folders[kind], scene.frame_start
        )
    job_copy = outputs.portable_job_file(result.get("job_file", ""), dest) if result.get("job_file") else None
    meta = {
        "kind": strips.RESULT_KIND,
        "camera": x["camera_name"],
        "camera_hash": result["camera_hash"],
        "generator": settings.get("generator", ""),
        "model": "Wan-AI/Wan2.1-I2V-14B-480P + yihouxiang/EX-4D"
        if settings.get("generator") == "ex4d"
        else "preview (no model)",
        "version": dest.name.rsplit("_v", 1)[1],
        "seed": int(settings.get("seed", 0)),
        "steps": int(settings.get("steps", 0)),
        "cfg": float(settings.get("cfg", 0.0)),
        "shift": float(settings.get("shift", 0.0)),
        "prompt": settings.get("prompt", ""),
        "negative_prompt": settings.get("negative_prompt", ""),
        "width": int(result.get("width", 0)),
        "height": int(result.get("height", 0)),
        "num_frames": int(settings.get("num_frames", 0)),
        "frame_sampling": settings.get("frame_sampling", "reference"),
        "settings": settings,
        "source_frames": result.get("source_frames", []),
        "plan": result.get("plan", {}),
        "job": result.get("job", ""),
        "job_file": job_copy.name if job_copy else "",
        "footage": scene.ex4d.footage_path,
        "frames_dir": outputs.rel(dest),
    }
    if strips.COMPOSITE_KIND in files:
        meta["composite_dir"] = outputs.rel(folders[strips.COMPOSITE_KIND])
        meta["composite_size"] = result.get("composite_size") or []
    history.record_version(dest, meta, scene, history_ui.backend_python(job))  # sidecar, thumbnail
    (dest / "settings.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    yield
    names = []
    for kind, _, suffix in kinds:
        if kind in files:
            strip = strips.add_image_strip(
                results_scene.target(scene),
                f"EX4D {dest.name}{suffix}",
                files[kind],
                scene.frame_start,
                {**meta, "kind": kind},
            )
            results_scene.place(scene, strip)
            names.append(strip.name)
    job.extra["strip_name"] = names[0]
    job.extra["strip_names"] = names
    n = len(files[strips.RESULT_KIND])
    text = f"EX-4D: {n} frames ({settings.get('generator')}) in {job.seconds()} -> {dest} (strips {', '.join(names)})"
    if x["warning"]:
        job.report_level = "WARNING"
        text += f" -- {x['warning']}"
    scene.ex4d.last_warning = x["warning"]
    history_ui.after_generate(SimpleNamespace(scene=scene))  # the Shot History list shows the new version
    return text


def _finish_hello(job: Job, info: dict) -> str:
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
    """``<backend python> -m ex4d_backend doctor --json`` (blocking; an explicit request for the full
    report). Raises BackendError."""
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
class _CameraJobOperator(runner.JobOperator):
    @classmethod
    def poll(cls, context):
        if not super().poll(context):
            return False
        s = context.scene.ex4d
        if not s.footage_path:
            runner.poll_message(cls, "Import footage first")
            return False
        if s.novel_camera is None:
            runner.poll_message(cls, "Choose a Novel Camera (or add one with Add Camera Preset)")
            return False
        return True


class EX4D_OT_render_guide(_CameraJobOperator, bpy.types.Operator):
    """Render the colour/mask guide of the novel camera with the backend and show it (camera
    background and a VSE strip): the disoccluded regions, before spending GPU minutes"""

    bl_idname = "ex4d.render_guide"
    bl_label = "Render Guide"
    bl_options = {"REGISTER"}

    def make_job(self, context) -> Job:
        return guide_job(context)


GENERATOR_ITEMS = [
    ("EX4D", "EX-4D", "Wan2.1 + EX-4D (GPU)"),
    ("PREVIEW", "Preview", "Inpainting preview, no model (CPU)"),
]


def chosen_generator(op, context) -> str:
    """The operator's ``generator`` when the caller set it, else the scene's choice."""
    return op.generator if op.properties.is_property_set("generator") else context.scene.ex4d.generator


class EX4D_OT_generate(_CameraJobOperator, bpy.types.Operator):
    """Depth (if needed), guide and generation as one backend job; the frames land as a PNG sequence
    next to the .blend and as an image strip in the sequencer"""

    bl_idname = "ex4d.generate"
    bl_label = "Generate"
    bl_options = {"REGISTER"}

    generator: EnumProperty(  # type: ignore[valid-type]
        name="Generator",
        items=GENERATOR_ITEMS,
        default="EX4D",
    )

    def make_job(self, context) -> Job:
        generator = chosen_generator(self, context)
        return generate_job(context, generator)


class EX4D_OT_check_backend(runner.JobOperator, bpy.types.Operator):
    """Start the backend and show its versions, GPU, VRAM and models in the preferences"""

    bl_idname = "ex4d.check_backend"
    bl_label = "Check Backend"
    bl_options = {"REGISTER"}
    exclusive = False  # hello is answered at once, even while a job runs

    doctor: BoolProperty(  # type: ignore[valid-type]
        name="Full Report", description="Also run 'ex4d doctor --json' (slower; blocks)", default=False
    )

    def make_job(self, context) -> Job:
        return Job(context, "hello", {}, [], _finish_hello_checked, label="Check backend", exclusive=False)

    def execute(self, context):
        if self.doctor:  # an explicit request for the full report: blocks while doctor runs
            try:
                last_backend_info["doctor"] = run_doctor(context)
            except BackendError as exc:
                return self._error(context, exc)
        return super().execute(context)


def _finish_hello_checked(job: Job, info: dict) -> str:
    assert job.client is not None and job.req is not None
    backend.note_hello(job.client, job.req)  # records it; a protocol mismatch is reported
    return _finish_hello(job, info)


class EX4D_OT_cancel_job(bpy.types.Operator):
    """Cancel the running EX-4D job (it stops at its next step boundary; nothing is added)"""

    bl_idname = "ex4d.cancel_job"
    bl_label = "Cancel Job"
    bl_options = {"REGISTER"}

    @classmethod
    def poll(cls, context):
        job = runner.active_job()
        if job is None or job.done:
            runner.poll_message(cls, "No EX-4D job is running")
            return False
        return True

    def execute(self, context):
        job = runner.active_job()
        assert job is not None
        job.cancel()
        self.report({"INFO"}, f"EX-4D: cancelling {job.label}")
        return {"FINISHED"}


CLASSES = (EX4D_OT_render_guide, EX4D_OT_generate, EX4D_OT_check_backend, EX4D_OT_cancel_job)


def register() -> None:
    props.register_classes(CLASSES)


def unregister() -> None:
    props.unregister_classes(CLASSES)
