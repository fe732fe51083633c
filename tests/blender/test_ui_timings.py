"""Defect 5 (issue 16): every main-thread call of the add-on stays within 100 ms, at 512 x 512 and at
1920 x 1080 (processing 1024 x 576), through the whole path.

What is timed is what Blender's main thread runs: an operator's execute (making and starting its job)
and every timer tick of the job runner (camera sampling, polling, building the DW-mesh object, copying
results), plus a backend restart for a new input folder and disabling the add-on. The old code sampled
the camera inside execute (0.3-0.8 s), built the DW-mesh object in one tick (0.2-0.8 s), probed the
footage blocking (3 s), restarted the backend synchronously (0.6 s) and waited for it on disable.
The DW-mesh object is the backend's viewport proxy (``viewport_proxy``, the default "Viewport Mesh Detail"):
the full 1024 x 576 mesh took one 314-718 ms slice in ``polygons.foreach_set("loop_start")``.
The timings are printed and recorded (``record_property``); README (Blender extension) keeps a run.
The 100 ms budget is asserted only in a measurement run (``EX4D_UI_BUDGET=1``): CI is not timed.
"""

from __future__ import annotations

# ruff: noqa: F811 - the fixtures imported from test_job_ops are used as arguments
import os
import time

import bpy
import pytest
from conftest import ADDON, addon_module
from test_job_ops import _make_clip, ops, setup_shot  # noqa: F401

BUDGET = 0.100  # s per main-thread call (the goal)
SIZES = {"512": (512, 512, 25, (192, 320, 128, 384)), "1080p": (1920, 1080, 8, (720, 1200, 270, 810))}


def _run(job, ctx, calls: dict, name: str) -> None:
    t0 = time.perf_counter()
    job.start(ctx)
    calls[f"{name}: start"] = time.perf_counter() - t0
    deadline = time.monotonic() + 300
    while not job.tick():
        assert time.monotonic() < deadline, f"{name} did not finish"
        time.sleep(0.005)
    assert job.state == "done", job.report
    for state, dt in job.max_call_by_state.items():
        calls[f"{name}: longest {state} tick"] = dt


@pytest.mark.slow
@pytest.mark.parametrize("size", sorted(SIZES))
def test_every_main_thread_call_is_short(scene, ops, job_store, tmp_blend_dir, size, record_property):
    w, h, t, card = SIZES[size]
    clip = _make_clip(job_store.parent / "clips", f"ui{size}", w=w, h=h, t=t, card=card)
    ops_scene = addon_module("ops_scene")
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_blend_dir / f"ui{size}.blend"))
    ctx = bpy.context
    calls: dict[str, float] = {}
    t0 = time.perf_counter()
    job = ops_scene.import_job(ctx, str(clip["frames_dir"]), 500.0 * w / 512)
    calls["import: execute"] = time.perf_counter() - t0
    _run(job, ctx, calls, "import")
    t0 = time.perf_counter()
    job = ops_scene.build_job(ctx, str(clip["depth"]))
    calls["build: execute"] = time.perf_counter() - t0
    _run(job, ctx, calls, "build")
    # the DW-mesh object is the viewport proxy (the default preference): s = 2 at 512², 3 at 1024 x 576
    (pw, ph), stride = ((512, 512), 2) if size == "512" else ((1024, 576), 3)
    lines = [len(set(range(0, n, stride)) | {n - 1}) for n in (pw, ph)]
    assert scene.ex4d.dwmesh["ex4d_viewport_stride"] == stride
    assert len(scene.ex4d.dwmesh.data.vertices) == lines[0] * lines[1]
    scene.ex4d_job.renderer = "cpu"
    _run(ops_scene.preset_job(ctx, "90"), ctx, calls, "preset")
    t0 = time.perf_counter()
    job = ops.guide_job(ctx)  # the camera is sampled over the ticks, not here
    calls["render_guide: execute"] = time.perf_counter() - t0
    _run(job, ctx, calls, "render_guide")
    js = scene.ex4d_job
    js.width, js.height, js.num_frames = 64, 64, 5
    scene.ex4d.steps = 1
    job = ops.generate_job(ctx, "PREVIEW")
    _run(job, ctx, calls, "generate")
    t0 = time.perf_counter()
    for _ in range(5):
        scene.frame_set(scene.frame_start + _ % t)  # scrubbing the DW-mesh
    calls["frame change (mean of 5)"] = (time.perf_counter() - t0) / 5
    backend = addon_module("backend")
    t0 = time.perf_counter()
    backend.get_client(ctx, [str(tmp_blend_dir / "elsewhere" / "x.mp4")])  # a new folder: restart
    calls["backend restart"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    bpy.ops.preferences.addon_disable(module=ADDON)
    calls["disable the add-on"] = time.perf_counter() - t0
    bpy.ops.preferences.addon_enable(module=ADDON)
    for k, v in calls.items():
        record_property(f"{size} {k}", round(v * 1000, 1))
    print(f"\nmain-thread calls at {w}x{h}x{t} (ms): " + ", ".join(f"{k} {v * 1000:.0f}" for k, v in calls.items()))
    slow = {k: round(v * 1000) for k, v in calls.items() if v > BUDGET}
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    share = max(1.0, load / cores)  # a CPU-bound call gets about 1/share of a core on a loaded machine
    record_property(f"{size} load average per core", round(load / cores, 2))
    if not os.environ.get("EX4D_UI_BUDGET"):
        # CI tests are not timed (a shared 2-core runner says nothing about an artist's machine): the path runs
        # end to end here, and `EX4D_UI_BUDGET=1` turns the 100 ms budget into an assertion (a measurement run).
        return
    if slow and load > 1.5 * cores and all(v < BUDGET * 1000 * share for v in slow.values()):
        pytest.skip(f"calls over {BUDGET * 1000:.0f} ms {slow} while the load average is {load:.1f} on {cores} cores")
    assert not slow, f"main-thread calls over {BUDGET * 1000:.0f} ms (load {load:.1f} on {cores} cores): {slow}"
