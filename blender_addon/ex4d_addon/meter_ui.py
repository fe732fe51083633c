"""The disocclusion meter in Blender: the backend's ``meter`` request for the novel camera, kept live.

1. ``depsgraph_update_post``: a change of the novel camera (its transform, its camera data or its action)
   while "Live meter" is on arms a debounce (``DEBOUNCE_S``); updates during camera sampling, playback or
   another job's sampling, and frame changes, are ignored (``camera_changed``: not edits);
2. a timer (``bpy.app.timers``, every ``TICK_S``) starts the meter through the add-on's one job runner
   (``runner.Job``, non-exclusive: beside a running job, leaving its progress fields alone) once the camera
   has been still for ``DEBOUNCE_S``, and ticks it (sampling the camera in slices, polling the backend);
   a change while one runs starts another when it ends;
3. the result lands on the camera object as ID properties ``ex4d_meter_share`` (per clip frame, 0..1),
   ``ex4d_meter_hash`` and ``ex4d_meter_frame_start``, drawn on the Timeline / Dope Sheet (a bar per frame,
   green -> red, taller = more unseen) and in the N-panel (worst frame, threshold warning).

The live meter only runs once a DW-mesh exists (the depth is in the backend's store, so a camera change costs
the low-resolution pass alone, never a depth estimate); ``ex4d.update_meter`` runs it on demand. Every
main-thread call is timed (``stats["max_call"]``, seconds): the budget is 100 ms.
"""

from __future__ import annotations

import time
from typing import Any

import bpy
from bpy.app.handlers import persistent
from bpy.props import BoolProperty, FloatProperty, StringProperty

from . import backend, meter_math, ops_jobs, panel_base, props, runner, sampling
from .backend_client import BackendError
from .runner import Job

DEBOUNCE_S = 0.3
TICK_S = 0.05
SHARE_KEY, HASH_KEY, START_KEY = "ex4d_meter_share", "ex4d_meter_hash", "ex4d_meter_frame_start"
BAR_HEIGHT_PX = 14.0
QUEUED_TEXT = "the meter waits for the backend's running job"

stats = {"max_call": 0.0, "calls": 0, "requests": 0}  # main-thread timings (tests, the budget check)
_state: dict = {"due": None, "job": None, "scene": None, "timer": False}
_draw_handle = None


def _timed(fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            stats["max_call"] = max(stats["max_call"], time.perf_counter() - t0)
            stats["calls"] += 1

    wrapper.__name__, wrapper.__qualname__, wrapper.__module__ = fn.__name__, fn.__qualname__, fn.__module__
    return wrapper


class EX4D_MeterSettings(bpy.types.PropertyGroup):
    live: BoolProperty(  # type: ignore[valid-type]
        name="Live Meter",
        default=True,
        description="Measure the share of each frame the source never saw whenever the novel camera changes",
    )
    threshold: FloatProperty(  # type: ignore[valid-type]
        name="Warn Above",
        default=0.4,
        min=0.01,
        max=1.0,
        subtype="FACTOR",
        description="Frames with more than this share unseen are listed in the warning and drawn red",
    )
    show_timeline: BoolProperty(name="Show on Timeline", default=True)  # type: ignore[valid-type]
    status: StringProperty(name="Meter Status", default="")  # type: ignore[valid-type]
    seconds: FloatProperty(name="Meter Seconds", default=0.0)  # type: ignore[valid-type]


# ----------------------------------------------------------------------------------------------
# Reading the stored meter
# ----------------------------------------------------------------------------------------------
def shares_of(cam_obj) -> list[float]:
    """The stored per-clip-frame shares of a camera object ([] when never metered)."""
    if cam_obj is None:
        return []
    v = cam_obj.get(SHARE_KEY)
    return [float(x) for x in v] if v is not None else []


def summary(scene) -> dict:
    """What the panel shows for the scene's novel camera: shares, frame_start, worst (frame, share), warning."""
    cam = scene.ex4d.novel_camera
    shares = shares_of(cam)
    start = int(cam.get(START_KEY, scene.frame_start)) if cam is not None else scene.frame_start
    th = float(scene.ex4d_meter.threshold)
    return {
        "shares": shares,
        "frame_start": start,
        "worst": meter_math.worst(shares, start),
        "warning": meter_math.warning_text(shares, th, start),
    }


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------
def meter_job(context) -> Job:
    """The (not yet started) meter job of the scene's novel camera (params as render_guide's)."""
    params, paths = backend.clip_params(context)
    cam = sampling.novel_camera(context)
    n = ops_jobs._clip_frames(context)
    params["renderer"] = context.scene.ex4d_job.renderer
    job = Job(context, "meter", params, paths, _finish, label="Meter", exclusive=False,
              prepare=sampling.camera_job_prepare(context, cam, n))  # fmt: skip
    job.extra.update(camera_name=cam.name, frame_start=context.scene.frame_start)
    return job


def _finish(job: Job, result: dict) -> str:
    scene = job.scene
    cam = bpy.data.objects.get(job.extra["camera_name"])
    shares = [float(v) for v in result["masked_share"]]
    if cam is not None:
        cam[SHARE_KEY] = shares
        cam[HASH_KEY] = str(result["camera_hash"])
        cam[START_KEY] = int(job.extra["frame_start"])
    m = scene.ex4d_meter
    m.seconds = time.monotonic() - job.started_at
    frame, share = meter_math.worst(shares, int(job.extra["frame_start"]))
    m.status = f"{len(shares)} frames metered in {m.seconds:.1f} s; worst: frame {frame}, {share:.0%} unseen"
    _tag_redraw()
    return f"EX-4D: meter of '{job.extra['camera_name']}': {m.status}"


def _can_start(scene) -> bool:
    active = runner.active_job()
    if active is not None and not active.done and active.state == "preparing":
        return False  # it is sampling a camera (frame changes): wait
    return scene.ex4d.novel_camera is not None and bool(scene.ex4d.footage_path)


def start(context) -> Job | None:
    """Start the meter now (the timer ticks it); None when it cannot start (the reason in the status)."""
    m = context.scene.ex4d_meter
    try:
        job = meter_job(context)
        job.start(context)
    except (BackendError, OSError, ValueError) as exc:
        m.status = backend.error_text(exc) if isinstance(exc, BackendError) else f"EX-4D: {exc}"
        return None
    stats["requests"] += 1
    m.status = "metering..."
    _state["job"], _state["scene"] = job, context.scene
    _ensure_timer()
    return job


@_timed
def _tick() -> float | None:
    """The timer: tick the running meter job, start a due one; None (stop) when idle."""
    job: Job | None = _state["job"]
    if job is not None:
        try:
            job.tick()
        except ReferenceError:  # the scene went away (file loaded)
            job = _state["job"] = None
        if job is not None and not job.done and job.events and job.events[-1].get("event") == "queued":
            try:
                m = job.scene.ex4d_meter
                if m.status != QUEUED_TEXT:
                    m.status = QUEUED_TEXT
            except ReferenceError:
                pass
        if job is not None and job.done:
            if job.state != "done" and job.report:
                try:
                    job.scene.ex4d_meter.status = job.report[1][:300]
                except ReferenceError:
                    pass
            job = _state["job"] = None
    due = _state["due"]
    if job is None and due is not None and time.monotonic() >= due:
        scene = bpy.context.scene
        if scene is not None and _can_start(scene):
            _state["due"] = None
            start(bpy.context)
            job = _state["job"]
    if _state["job"] is None and _state["due"] is None:
        _state["timer"] = False
        return None
    return TICK_S


def _ensure_timer() -> None:
    if not _state["timer"]:
        _state["timer"] = True
        if not bpy.app.timers.is_registered(_tick):
            bpy.app.timers.register(_tick, first_interval=TICK_S)


def schedule(delay: float = DEBOUNCE_S) -> None:
    """(Re)arm the debounce: the meter starts once nothing changed for ``delay`` seconds."""
    _state["due"] = time.monotonic() + delay
    _ensure_timer()


def _ignoring() -> bool:
    job = _state["job"]
    if job is not None and job.state == "preparing":
        return True
    active = runner.active_job()
    if active is not None and not active.done and active.state == "preparing":
        return True
    return any(getattr(s, "is_animation_playing", False) for s in bpy.data.screens)


def camera_changed(cam_obj, depsgraph) -> bool:
    """Whether the depsgraph's updates are an edit of ``cam_obj``: its transform, its camera data or its action.
    A batch that also updates the scene itself (a frame change: animation re-evaluated) counts only for a
    change of the camera data."""
    cam_data = cam_obj.data
    ad = cam_obj.animation_data
    action = ad.action if ad is not None else None
    moved = data_changed = scene_changed = False
    for upd in depsgraph.updates:
        idd = getattr(upd.id, "original", upd.id)
        if isinstance(idd, bpy.types.Scene):
            scene_changed = True
        elif idd == cam_obj and upd.is_updated_transform:
            moved = True
        elif idd == cam_data and upd.is_updated_geometry:
            data_changed = True
        elif action is not None and idd == action:
            moved = True
    return data_changed or (moved and not scene_changed)


@persistent
@_timed
def _on_depsgraph(scene, depsgraph=None) -> None:
    if depsgraph is None or scene is None or not hasattr(scene, "ex4d_meter"):
        return
    m = scene.ex4d_meter
    cam = scene.ex4d.novel_camera
    if not m.live or cam is None or scene.ex4d.dwmesh is None or _ignoring():
        return
    if camera_changed(cam, depsgraph):
        schedule()


@persistent
def _on_load_pre(*_args) -> None:
    """A new file: the running meter's scene goes away (its result would land nowhere)."""
    job = _state["job"]
    if job is not None and not job.done:
        job.cancel()
    _state.update(due=None, job=None, scene=None)


# ----------------------------------------------------------------------------------------------
# Drawing: the timeline bar
# ----------------------------------------------------------------------------------------------
def _tag_redraw() -> None:
    if bpy.app.background:
        return
    for window in getattr(bpy.context.window_manager, "windows", []):
        for area in window.screen.areas:
            if area.type in {"DOPESHEET_EDITOR", "VIEW_3D"}:
                area.tag_redraw()


def _draw_timeline() -> None:
    context = bpy.context
    scene, region = context.scene, context.region
    if scene is None or region is None or not hasattr(scene, "ex4d_meter") or not scene.ex4d_meter.show_timeline:
        return
    info = summary(scene)
    if not info["shares"]:
        return
    import gpu
    from gpu_extras.batch import batch_for_shader

    v2d: Any = region.view2d
    pos, col = meter_math.bar_geometry(
        info["shares"], scene.ex4d_meter.threshold, info["frame_start"],
        lambda f: v2d.view_to_region(f, 0, clip=False)[0], 0.0, BAR_HEIGHT_PX,
    )  # fmt: skip
    shader: Any = gpu.shader.from_builtin("SMOOTH_COLOR")
    batch = batch_for_shader(shader, "TRIS", {"pos": pos, "color": col})
    gpu.state.blend_set("ALPHA")
    shader.bind()
    batch.draw(shader)
    gpu.state.blend_set("NONE")


# ----------------------------------------------------------------------------------------------
# Operator and panel
# ----------------------------------------------------------------------------------------------
class EX4D_OT_update_meter(bpy.types.Operator):
    """Measure now how much of each frame the source never saw from the novel camera (the disocclusion meter)"""

    bl_idname = "ex4d.update_meter"
    bl_label = "Update Meter"
    bl_options = {"REGISTER"}

    def execute(self, context):
        try:
            job = meter_job(context)
            job.start(context)
        except (BackendError, OSError, ValueError) as exc:
            text = backend.error_text(exc) if isinstance(exc, BackendError) else f"EX-4D: {exc}"
            context.scene.ex4d_meter.status = text[:300]
            self.report({"ERROR"}, text)
            return {"CANCELLED"}
        stats["requests"] += 1
        if bpy.app.background or context.window is None:
            job.run_blocking(timeout=context.scene.ex4d_job.timeout)
            level, text = job.report or ("INFO", "EX-4D: meter done")
            self.report({level}, text)
            return {"FINISHED"} if job.state == "done" else {"CANCELLED"}
        _state["job"], _state["scene"] = job, context.scene
        _ensure_timer()
        return {"FINISHED"}


class EX4D_PT_meter(panel_base.SubPanel, bpy.types.Panel):
    bl_idname = "EX4D_PT_meter"
    bl_label = "Disocclusion Meter"
    bl_options: set[str] = set()  # open by default

    def draw(self, context):
        layout = self.layout
        m = context.scene.ex4d_meter
        row = layout.row(align=True)
        row.prop(m, "live")
        row.prop(m, "show_timeline", text="", icon="TIME")
        layout.prop(m, "threshold", slider=True)
        layout.operator("ex4d.update_meter", icon="FILE_REFRESH")
        info = summary(context.scene)
        if info["shares"]:
            frame, share = info["worst"]
            layout.label(text=f"Worst: frame {frame}, {share:.0%} unseen", translate=False)
            if info["warning"]:
                col = layout.column()
                col.alert = True
                col.label(text=info["warning"][:80], icon="ERROR", translate=False)
        elif context.scene.ex4d.dwmesh is None:
            layout.label(text="Build the DW-mesh for a live meter", icon="INFO")
        if m.status:
            layout.label(text=m.status[:80], translate=False)


_classes = (EX4D_MeterSettings, EX4D_OT_update_meter, EX4D_PT_meter)


def register() -> None:
    global _draw_handle
    props.register_classes(_classes)
    scene_type: Any = bpy.types.Scene
    scene_type.ex4d_meter = bpy.props.PointerProperty(type=EX4D_MeterSettings)
    runner.add_handler(bpy.app.handlers.depsgraph_update_post, _on_depsgraph)
    runner.add_handler(bpy.app.handlers.load_pre, _on_load_pre)
    if not bpy.app.background and _draw_handle is None:
        _draw_handle = bpy.types.SpaceDopeSheetEditor.draw_handler_add(_draw_timeline, (), "WINDOW", "POST_PIXEL")


def unregister() -> None:
    global _draw_handle
    if _draw_handle is not None:
        bpy.types.SpaceDopeSheetEditor.draw_handler_remove(_draw_handle, "WINDOW")
        _draw_handle = None
    if bpy.app.timers.is_registered(_tick):
        bpy.app.timers.unregister(_tick)
    job = _state["job"]
    if job is not None and not job.done:
        job.cancel()
    _state.update(due=None, job=None, scene=None, timer=False)
    runner.remove_handler(bpy.app.handlers.depsgraph_update_post, _on_depsgraph)
    runner.remove_handler(bpy.app.handlers.load_pre, _on_load_pre)
    scene_type: Any = bpy.types.Scene
    del scene_type.ex4d_meter
    props.unregister_classes(_classes)
