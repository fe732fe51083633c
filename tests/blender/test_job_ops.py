"""The job operators (ex4d.render_guide, ex4d.generate, ex4d.check_backend, ex4d.cancel_job) in headless
Blender against a real ``ex4d serve`` subprocess on the CPU.

Ground truth: a card clip with exact, piecewise-constant depth and colours (a wall at z = 4, a card at
z = 2 covering columns [24, 40) and rows [12, 36) of a 64 x 48 image, focal 50 px). A camera translated by
t along x sees a point at depth z move by -f t / z pixels, so the wall strip uncovered right of the card
is known in closed form: the guide's mask must be exactly 0 there, the card and wall keep their colours.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import addon_module, backend_py

bpy = pytest.importorskip("bpy")

W, H, T, F = 64, 48, 6, 50.0
Z_WALL, Z_CARD = 4.0, 2.0
CARD = (24, 40, 12, 36)  # x0, x1, y0, y1 (pixel columns / rows, end exclusive)
WALL_RGB, CARD_RGB = (40, 90, 200), (220, 60, 30)
TX = 0.4  # the novel camera's translation along x at the last frame (Blender X = OpenCV x)

_MAKE_CLIP = """
from pathlib import Path
import numpy as np
from ex4d_backend.footage import write_png_sequence
w, h, t = ARGS["w"], ARGS["h"], ARGS["t"]
x0, x1, y0, y1 = ARGS["card"]
out = Path(ARGS["out"]); out.mkdir(parents=True, exist_ok=True); name = ARGS["name"]
frames = np.empty((t, h, w, 3), np.uint8); frames[:] = ARGS["wall_rgb"]
frames[:, y0:y1, x0:x1] = ARGS["card_rgb"]
if ARGS["noise"]:  # texture so that frames differ (the preview and the cache see distinct content)
    rng = np.random.default_rng(0)
    frames[:, : h // 6] = rng.integers(0, 255, (t, h // 6, w, 3), dtype=np.uint8)
depth = np.full((t, h, w), ARGS["z_wall"], np.float32); depth[:, y0:y1, x0:x1] = ARGS["z_card"]
write_png_sequence(out / f"{name}_frames", frames)
np.save(out / f"{name}_depth.npy", depth)
np.save(out / f"{name}_frames.npy", frames)
"""


def _make_clip(out: Path, name: str, w=W, h=H, t=T, card=CARD, noise=False) -> dict:
    """A card clip ``<out>/<name>_frames/`` with ``<name>_depth.npy``: all clips share one folder, so the
    backend (allowed to read the folder holding the inputs) is not restarted for each."""
    backend_py(
        _MAKE_CLIP, out=str(out), name=name, w=w, h=h, t=t, card=list(card), wall_rgb=list(WALL_RGB),
        card_rgb=list(CARD_RGB), z_wall=Z_WALL, z_card=Z_CARD, noise=noise,
    )  # fmt: skip
    return {"frames_dir": out / f"{name}_frames", "depth": out / f"{name}_depth.npy",
            "frames_npy": out / f"{name}_frames.npy",
            "width": w, "height": h, "n_frames": t}  # fmt: skip


@pytest.fixture(scope="session")
def card_clip(job_store) -> dict:
    return _make_clip(job_store.parent / "clips", "card")


@pytest.fixture
def ops(addon, job_store):
    # Every clip of this session lies under one folder: allowed once, the backend is not restarted for
    # each new clip folder (only where a test kills it or changes its Python).
    addon_module("backend").allow([str(job_store.parent)])
    mod = addon_module("ops_jobs")
    yield mod
    addon_module("runner").event_hooks.clear()


def setup_shot(sc, clip: dict, frame_start: int = 1, parented: bool = True):
    """Scene fields as Import Footage + Build DW-Mesh leave them, a source camera and a novel camera that
    moves by TX along X (through an animated parent empty when ``parented``)."""
    s = sc.ex4d
    w, h, n = clip["width"], clip["height"], clip["n_frames"]
    s.footage_path = str(clip["frames_dir"])
    s.depth_filepath = str(clip["depth"])
    s.depth_kind = "depth"
    s.focal_px = F
    s.processing_width, s.processing_height, s.n_frames = w, h, n
    sc.render.resolution_x, sc.render.resolution_y, sc.render.resolution_percentage = w, h, 100
    sc.frame_start, sc.frame_end = frame_start, frame_start + n - 1
    sc.ex4d_job.renderer = "cpu"
    lens = F * 36.0 / w  # fx = lens / sensor_width * W
    src = bpy.data.objects.new("EX4D Source", bpy.data.cameras.new("EX4D Source"))
    sc.collection.objects.link(src)
    src.rotation_euler = (math.pi / 2, 0.0, 0.0)
    src.data.lens = lens
    s.source_camera = src
    cam = bpy.data.objects.new("Novel", bpy.data.cameras.new("Novel"))
    sc.collection.objects.link(cam)
    cam.data.lens, cam.data.sensor_width = lens, 36.0
    mover = cam
    if parented:
        mover = bpy.data.objects.new("Rig", None)
        sc.collection.objects.link(mover)
        cam.parent = mover
    cam.rotation_euler = (math.pi / 2, 0.0, 0.0)
    for i in range(n):
        mover.location = (TX * i / (n - 1), 0.0, 0.0)
        mover.keyframe_insert("location", frame=frame_start + i)
    s.novel_camera = cam
    sc.camera = cam
    return cam


def read_png(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 of a PNG, read by Blender (rows top-down)."""
    img = bpy.data.images.load(str(path), check_existing=False)
    try:
        w, h = img.size
        px = np.empty(w * h * 4, np.float32)
        img.pixels.foreach_get(px)
        return np.round(px.reshape(h, w, 4)[::-1, :, :3] * 255).astype(np.uint8)
    finally:
        bpy.data.images.remove(img)


def strips_of(sc, kind: str) -> list:
    """The EX-4D strips of ``kind`` of scene ``sc``: in its results scene (issue 18: never in the main scene's
    F12 render) unless the artist put them in the scene itself."""
    compat = addon_module("compat")
    where = addon_module("results_scene").strips_scene(sc)
    return [s for s in compat.vse_strips_all(where) if s.get("ex4d_kind") == kind]


# ----------------------------------------------------------------------------------------------
def test_retime_indices(ops):
    # 6 clip frames from 49 generated (short clip: the last one repeats) and 49 clip frames from 5.
    assert addon_module("outputs").retime_indices([0, 1, 2, 3, 4, 5, 5, 5], 6) == [0, 1, 2, 3, 4, 5]
    src = np.linspace(0, 48, 5).astype(int).tolist()  # [0, 12, 24, 36, 48]
    idx = addon_module("outputs").retime_indices(src, 49)
    assert idx[0] == 0 and idx[11] == 0 and idx[12] == 1 and idx[47] == 3 and idx[48] == 4


def test_raw_camera_samples_give_the_backend_the_right_path(scene, ops):
    """The add-on sends raw, evaluated Blender values (a parent, a Track To constraint, an animated lens and
    lens shift); the backend's conversion of them points the camera at the tracked target on every frame
    and gives fx = lens / sensor * span and cx = W/2 - shift_x * span per frame (Blender's rule, written
    here). Catches unevaluated samples, a lens or shift sampled once, and a wrong sensor-fit rule."""
    sc = scene
    sc.render.resolution_x, sc.render.resolution_y = 96, 64
    sc.frame_start = 1
    target = bpy.data.objects.new("Target", None)
    sc.collection.objects.link(target)
    target.location = (0.3, 5.0, -0.2)
    rig = bpy.data.objects.new("Rig", None)
    sc.collection.objects.link(rig)
    cam = bpy.data.objects.new("Cam", bpy.data.cameras.new("Cam"))
    sc.collection.objects.link(cam)
    cam.parent = rig
    con = cam.constraints.new("TRACK_TO")
    con.target, con.track_axis, con.up_axis = target, "TRACK_NEGATIVE_Z", "UP_Y"
    for i, (x, lens, shift) in enumerate([(0.0, 30.0, 0.0), (0.5, 45.0, 0.05), (1.0, 60.0, 0.1)]):
        rig.location = (x, -0.2 * i, 0.1 * i)
        rig.keyframe_insert("location", frame=1 + i)
        cam.data.lens, cam.data.shift_x = lens, shift
        cam.data.keyframe_insert("lens", frame=1 + i)
        cam.data.keyframe_insert("shift_x", frame=1 + i)
    sampling = addon_module("sampling")
    for fit, (w, h) in [("AUTO", (96, 64)), ("HORIZONTAL", (96, 64)), ("VERTICAL", (96, 64)), ("AUTO", (48, 80))]:
        cam.data.sensor_fit = fit
        sc.render.resolution_x, sc.render.resolution_y = w, h
        raw = sampling.sample_all(sc, cam, [1, 2, 3])
        assert raw["shift_x"] == pytest.approx([0.0, 0.05, 0.1]) and raw["lens"] == pytest.approx([30, 45, 60])
        ref = backend_py(
            "import numpy as np\nfrom ex4d_backend.cameras import camera_path_from_blender\n"
            "r = ARGS['raw']\n"
            "p = camera_path_from_blender(np.array(r['matrix_world']), np.array(r['lens']), ARGS['w'], ARGS['h'],"
            " r['sensor_width'], r['sensor_height'], r['sensor_fit'], np.array(r['shift_x']), np.array(r['shift_y']))\n"
            "OUT = {'E': p.extrinsics.tolist(), 'K': p.intrinsics.tolist()}",
            raw=raw,
            w=w,
            h=h,
        )
        span = w if fit == "HORIZONTAL" or (fit == "AUTO" and w >= h) else h
        sensor = raw["sensor_height"] if fit == "VERTICAL" else raw["sensor_width"]
        k = np.array(ref["K"])
        np.testing.assert_allclose(k[:, 0, 0], np.array([30, 45, 60]) / sensor * span, rtol=1e-9)
        np.testing.assert_allclose(k[:, 0, 2], w / 2 - np.array([0.0, 0.05, 0.1]) * span, atol=1e-9)
        # OpenCV world = Blender world with X = x, Y = z, Z = -y (the backend's convention, written here)
        tgt_cv = np.array([0.3, 0.2, 5.0, 1.0])
        for ei in np.array(ref["E"]):
            p = ei @ tgt_cv
            assert p[2] > 0 and abs(p[0]) < 1e-6 and abs(p[1]) < 1e-6


def test_render_guide_card(scene, ops, card_clip, tmp_blend_dir):
    """render_guide against the backend: frame 0 = the footage, the uncovered wall strip masked exactly,
    the card and the wall where the closed form puts them; guide on the camera and in the VSE."""
    sc = scene
    cam = setup_shot(sc, card_clip, frame_start=1, parented=True)
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_blend_dir / "shot.blend"))
    t0 = time.monotonic()
    assert bpy.ops.ex4d.render_guide() == {"FINISHED"}
    secs = time.monotonic() - t0
    s = sc.ex4d
    assert s.guide_color_dir.startswith("//")  # relative to the .blend: the project folder can move
    color_dir = Path(bpy.path.abspath(s.guide_color_dir))
    assert color_dir.parent.parent.parent == tmp_blend_dir / "ex4d"  # //ex4d/<shot>/guide_<hash>/color
    assert color_dir.parent.parent.name.startswith("card_frames_")
    files = sorted(color_dir.glob("*.png"))
    assert [f.name for f in files] == [f"frame_{i:05d}.png" for i in range(1, T + 1)]
    frames = np.load(card_clip["frames_npy"])
    assert np.array_equal(read_png(files[0]), frames[0])
    # The last frame: the camera moved by TX.
    color = read_png(files[-1])
    mask = read_png(sorted(Path(bpy.path.abspath(s.guide_mask_dir)).glob("*.png"))[-1])[..., 0]
    x0, x1, y0, y1 = CARD
    card_edge = (x1 - 1) - F * TX / Z_CARD  # u of the card's last vertex column
    wall_first = x1 - F * TX / Z_WALL  # u of the first wall vertex right of the card
    card_left = x0 - F * TX / Z_CARD
    wall_end = (W - 2) - F * TX / Z_WALL  # the last wall vertex before the border ring
    centers = np.arange(W) + 0.5  # a rendered pixel i samples u = i + 0.5
    gap = (centers > card_edge) & (centers < wall_first)
    on_card = (centers > card_left + 1) & (centers < card_edge - 1)
    on_wall = (centers > wall_first + 1) & (centers < wall_end - 1)
    assert gap.sum() == 6 and on_card.sum() >= 10 and on_wall.sum() >= 15
    rows = slice(y0 + 2, y1 - 2)
    assert (mask[rows][:, gap] == 0).all()
    assert (color[rows][:, gap] == 0).all()
    assert (mask[rows][:, on_card] == 255).all() and (color[rows][:, on_card] == CARD_RGB).all()
    assert (mask[rows][:, on_wall] == 255).all() and (color[rows][:, on_wall] == WALL_RGB).all()
    # Shown on the novel camera and as one strip per camera (re-running replaces it).
    bgs = [b for b in cam.data.background_images if b.image is not None]
    assert cam.data.show_background_images and len(bgs) == 1 and bgs[0].image.source == "SEQUENCE"
    assert os.path.realpath(bpy.path.abspath(bgs[0].image.filepath)) == os.path.realpath(files[0])
    guides = strips_of(sc, "guide")
    assert len(guides) == 1
    g = guides[0]
    assert addon_module("compat").strip_frame_range(g) == (1, 1 + T)
    assert g["ex4d_camera_hash"] == s.camera_hash and g["ex4d_camera"] == "Novel"
    assert bpy.ops.ex4d.render_guide() == {"FINISHED"}
    assert len(strips_of(sc, "guide")) == 1
    assert len([b for b in cam.data.background_images if b.image is not None]) == 1
    print(f"\nrender_guide on {W}x{H}x{T}: {secs:.2f} s (first run, backend start included)")


# Pipeline order of the stages the backend reports (names of one step share a rank; the generation's
# write/save comes after its load, the guide's before).
RANKS = {"inputs": 0, "frames": 1, "depth": 2, "mesh": 3, "camera": 4, "render": 5, "guide": 5, "write": 6,
         "save": 6, "load": 7, "condition": 8, "preview": 8, "generate": 8, "denoise": 8, "decode": 8, "window": 8}  # fmt: skip


def _check_order(events: list[dict]) -> list[str]:
    """Stages in pipeline order, steps never decrease within a stage; returns the stages seen."""
    stages: list[str] = []
    last_step, last_rank, loaded = -1, -1, False
    for e in events:
        if e.get("event") != "progress":
            continue
        if not stages or e["stage"] != stages[-1]:
            stages.append(e["stage"])
            last_step = -1
            loaded = loaded or e["stage"] == "load"
            rank = RANKS[e["stage"]] + (3 if loaded and e["stage"] in ("write", "save") else 0)
            assert rank >= last_rank, f"stage {e['stage']} out of order: {stages}"
            last_rank = rank
        assert e["step"] >= last_step, (e, stages)
        last_step = e["step"]
    return stages


def test_generate_preview_end_to_end(scene, ops, card_clip, tmp_blend_dir):
    sc = scene
    setup_shot(sc, card_clip, frame_start=10, parented=False)
    sc.ex4d.seed, sc.ex4d.steps, sc.ex4d.prompt = 7, 3, "a red card in front of a blue wall"
    js = sc.ex4d_job
    js.width, js.height, js.num_frames = 64, 48, 5  # 4k + 1 frames sampled over the clip: 0, 1, 2, 3, 5
    js.frame_sampling = "reference"  # the reference's one linspace window (every frame: test_long_shot.py)
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_blend_dir / "gen.blend"))
    # Occupy channel 1 over the clip: the result must go to a free channel (of the results scene).
    strips = addon_module("compat").vse_strips(addon_module("results_scene").target(sc))
    if "length" in strips.bl_rna.functions["new_effect"].parameters:  # 5.0
        strips.new_effect(name="blocker", type="COLOR", channel=1, frame_start=5, length=25)
    else:
        strips.new_effect(name="blocker", type="COLOR", channel=1, frame_start=5, frame_end=30)
    seen: list[tuple] = []
    labels: list[str] = []
    addon_module("runner").event_hooks.append(
        lambda job, e: seen.append((dict(e), sc.ex4d.job_progress, sc.ex4d.job_running))
    )
    addon_module("runner").event_hooks.append(
        lambda job, e: labels.append(sc.ex4d.job_stage) if e["event"] == "progress" else None
    )
    assert bpy.ops.ex4d.generate(generator="PREVIEW") == {"FINISHED"}
    events = [e for e, _, _ in seen]
    stages = _check_order(events)
    assert stages[0] == "inputs" and "preview" in stages and stages[-1] in ("write", "save")
    assert events[-1]["event"] == "result"
    fractions = [f for e, f, _ in seen if e["event"] == "progress"]
    assert fractions == sorted(fractions) and all(r for _, _, r in seen[:-1])
    # "Step n of N: stage (step/total)", n counting up to N on the last stage.
    first, last = (
        re.match(r"Step (\d+) of (\d+): (\w+)", labels[0]),
        re.match(r"Step (\d+) of (\d+): (\w+)", labels[-1]),
    )
    assert first.groups()[0] == "1" and first.groups()[2] == "inputs"
    assert last.groups()[0] == last.groups()[1] and last.groups()[2] == stages[-1] and fractions[-1] > 0.95
    s = sc.ex4d
    assert not s.job_running and s.job_progress == 1.0 and s.last_error == ""
    results = strips_of(sc, "generate")
    assert len(results) == 1
    st = results[0]
    assert addon_module("compat").strip_frame_range(st) == (10, 10 + T)
    assert st.channel == 2
    assert st["ex4d_generator"] == "preview" and st["ex4d_seed"] == 7 and st["ex4d_steps"] == 3
    assert st["ex4d_prompt"] == "a red card in front of a blue wall"
    assert len(st["ex4d_camera_hash"]) >= 10 and st["ex4d_camera"] == "Novel"
    settings = json.loads(st["ex4d_settings"])
    assert settings["seed"] == 7 and settings["generator"] == "preview" and settings["num_frames"] == 5
    out = Path(bpy.path.abspath(st["ex4d_frames_dir"]))
    assert out.parent.parent == tmp_blend_dir / "ex4d" and out.parent.name.startswith("card_frames_")
    assert out.name.endswith("_v001")
    files = sorted(out.glob("frame_*.png"))
    assert [f.name for f in files] == [f"frame_{10 + i:05d}.png" for i in range(T)]
    assert read_png(files[0]).shape == (48, 64, 3)
    # Clip frame 4 was not generated: it holds the one made from clip frame 3.
    assert json.loads(st["ex4d_source_frames"]) == [0, 1, 2, 3, 5]
    assert files[4].read_bytes() == files[3].read_bytes() and files[5].read_bytes() != files[3].read_bytes()
    job = json.loads((out / st["ex4d_job_file"]).read_text())  # re-runnable with `ex4d run`
    assert job["type"] == "generate" and job["params"]["seed"] == 7
    # The same camera's guide has the same hash as the generation's.
    assert bpy.ops.ex4d.render_guide() == {"FINISHED"}
    assert s.camera_hash == st["ex4d_camera_hash"]
    # Save + reload: the strips keep their settings and find their frames through paths relative to
    # the .blend (the project folder can move).
    assert st.directory.startswith("//")
    name = st.name
    bpy.ops.wm.save_mainfile()
    bpy.ops.wm.open_mainfile(filepath=str(tmp_blend_dir / "gen.blend"))
    sc = bpy.context.scene
    (st,) = strips_of(sc, "generate")
    assert st.name == name and st["ex4d_seed"] == 7 and addon_module("compat").strip_frame_range(st)[0] == 10
    folder = Path(bpy.path.abspath(st.directory))
    assert folder == out and all((folder / e.filename).is_file() for e in st.elements)
    assert len(strips_of(sc, "guide")) == 1 and not sc.ex4d.job_running


@pytest.mark.slow
def test_keep_model_loaded_preference(scene, ops, card_clip, tmp_blend_dir):
    """The backend keeps the generator loaded between generations for the preference's seconds; changing
    the preference restarts the backend with it, and 0 loads the generator for every generation."""
    pref = addon_module("props").prefs()
    sc = scene
    setup_shot(sc, card_clip, parented=False)
    sc.ex4d.steps = 2
    js = sc.ex4d_job
    js.width, js.height, js.num_frames = 64, 48, 5
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_blend_dir / "keep.blend"))
    loads: list[str] = []

    def hook(job, e):
        if e.get("event") == "progress" and e.get("stage") == "load":
            loads.append(e["message"])

    addon_module("runner").event_hooks.append(hook)
    seen = {}
    try:
        for seed, keep in ((1, 600), (2, 600), (3, 0), (4, 0)):
            pref.keep_model_loaded = keep
            sc.ex4d.seed = seed
            loads.clear()
            assert bpy.ops.ex4d.generate(generator="PREVIEW") == {"FINISHED"}
            seen[seed] = "reused" if loads == ["the generator was still loaded"] else "loaded"
            assert loads and (seen[seed] == "reused" or loads[0].startswith("loading")), loads
    finally:
        pref.keep_model_loaded = 600
    assert seen[2] == "reused" and seen[3] == "loaded" and seen[4] == "loaded", seen


def test_cancel_mid_job(scene, ops, job_store, tmp_blend_dir):
    clip = _make_clip(job_store.parent / "clips", "cancel", w=128, h=96, t=24, card=(48, 80, 24, 72), noise=True)
    sc = scene
    setup_shot(sc, clip, parented=False)
    sc.ex4d_job.width, sc.ex4d_job.height, sc.ex4d_job.num_frames = 128, 96, 21
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_blend_dir / "cancel.blend"))
    seen: list[dict] = []

    def hook(job, event):
        seen.append(event)
        if (
            event.get("event") == "progress" and event["stage"] == "render" and not job.cancel_requested
        ):  # meshed inline
            assert bpy.ops.ex4d.cancel_job() == {"FINISHED"}
            assert sc.ex4d.job_running and "cancelling" in sc.ex4d.job_stage

    addon_module("runner").event_hooks.append(hook)
    assert bpy.ops.ex4d.generate(generator="PREVIEW") == {"CANCELLED"}
    assert seen[-1]["event"] == "error" and seen[-1]["error"]["code"] == "cancelled"
    assert not any(e.get("stage") == "preview" for e in seen)
    s = sc.ex4d
    assert not s.job_running and s.job_stage == "" and s.job_progress == 0.0 and s.last_error == ""
    assert addon_module("runner").active_job() is None and not strips_of(sc, "generate")
    assert not list((tmp_blend_dir / "ex4d").glob("*/preview_*"))
    assert bpy.ops.ex4d.cancel_job.poll() is False
    # The backend survived and serves the next request.
    assert bpy.ops.ex4d.check_backend() == {"FINISHED"}


@pytest.mark.slow
def test_time_limit_and_second_cancel_stop_the_job(scene, ops, job_store, tmp_blend_dir):
    """Background mode's time limit cancels the job; a second cancel (Esc twice) stops a backend that does
    not answer: the job ends cancelled, nothing is added, the next request gets a new backend."""
    clip = _make_clip(job_store.parent / "clips", "cancel", w=128, h=96, t=24, card=(48, 80, 24, 72), noise=True)
    sc = scene
    setup_shot(sc, clip, parented=False)
    sc.ex4d_job.width, sc.ex4d_job.height, sc.ex4d_job.num_frames = 128, 96, 21
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_blend_dir / "limit.blend"))
    sc.ex4d.seed = 99  # a job not in the store
    sc.ex4d_job.timeout = 0.01  # seconds
    assert bpy.ops.ex4d.generate(generator="PREVIEW") == {"CANCELLED"}
    assert not strips_of(sc, "generate") and not sc.ex4d.job_running
    sc.ex4d_job.timeout = 0.0
    backend = addon_module("backend")
    pids: list[int] = []

    def hook(job, event):
        if event.get("event") == "progress" and not pids:
            pids.append(job.client.pid)
            os.kill(job.client.pid, signal.SIGSTOP)  # a hung backend: it will not answer the cancel
            bpy.ops.ex4d.cancel_job()
            bpy.ops.ex4d.cancel_job()  # the second one stops it

    addon_module("runner").event_hooks.append(hook)
    sc.ex4d.seed = 98
    assert bpy.ops.ex4d.generate(generator="PREVIEW") == {"CANCELLED"}
    addon_module("runner").event_hooks.clear()
    assert pids and not strips_of(sc, "generate") and not sc.ex4d.job_running and sc.ex4d.last_error == ""
    assert bpy.ops.ex4d.check_backend() == {"FINISHED"} and backend.current_client().pid != pids[0]


def test_backend_dies_mid_job(scene, ops, card_clip, tmp_blend_dir):
    sc = scene
    setup_shot(sc, card_clip, parented=False)
    sc.ex4d_job.width, sc.ex4d_job.height, sc.ex4d_job.num_frames = 64, 48, 5
    sc.ex4d.seed = 12345  # not in the store yet
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_blend_dir / "died.blend"))
    keep = bpy.data.objects.new("Imported", None)
    sc.collection.objects.link(keep)
    backend = addon_module("backend")
    killed: list[int] = []

    def hook(job, event):
        if event.get("event") == "progress" and event["stage"] == "camera" and not killed:
            killed.append(job.client.pid)
            os.kill(job.client.pid, signal.SIGKILL)

    addon_module("runner").event_hooks.append(hook)
    with pytest.raises(RuntimeError, match=r"backend exited.*\[backend_died\]"):
        bpy.ops.ex4d.generate(generator="PREVIEW")
    addon_module("runner").event_hooks.clear()
    s = sc.ex4d
    assert killed and "backend_died" in s.last_error and not s.job_running and s.job_progress == 0.0
    assert not strips_of(sc, "generate") and addon_module("runner").active_job() is None
    # Nothing already in the scene is lost; the next request restarts the backend and succeeds.
    assert "Imported" in bpy.data.objects and s.novel_camera is not None and s.footage_path
    client = backend.current_client()
    restarts = client.restarts
    assert bpy.ops.ex4d.generate(generator="PREVIEW") == {"FINISHED"}
    assert backend.current_client() is client and client.restarts == restarts + 1 and client.pid != killed[0]
    assert len(strips_of(sc, "generate")) == 1


def test_check_backend(scene, ops, card_clip):
    """check_backend fills the preferences, also beside the first job of a new backend process (the
    backend's import race is fixed: no hello-first handshake), and that job succeeds."""
    props, backend = addon_module("props"), addon_module("backend")
    setup_shot(scene, card_clip, parented=False)
    backend.shutdown(wait=True)
    params, paths = backend.clip_params(bpy.context)
    params["camera"] = {"preset": "30"}
    params["force"] = True
    client, req = backend.submit(bpy.context, "render_guide", params, paths)
    assert bpy.ops.ex4d.check_backend() == {"FINISHED"}
    client.wait(req, 120)
    assert req.error is None, req.error
    info = ops.last_backend_info
    assert info["protocol"].split(".")[0] == backend.PROTOCOL_VERSION.split(".")[0] and info["torch"]
    text = props.prefs().backend_info
    assert text.startswith("Backend ") and "Models present:" in text and "GPU" in text
    assert info["backend_version"] in text and info["torch"] in text


def test_errors_become_reports(scene, ops, card_clip):
    sc = scene
    with pytest.raises(RuntimeError, match=r"Import footage first"):  # poll with its message
        bpy.ops.ex4d.render_guide()
    cam = setup_shot(sc, card_clip)
    sc.ex4d.novel_camera = None
    with pytest.raises(RuntimeError, match=r"Novel Camera"):
        bpy.ops.ex4d.render_guide()
    sc.ex4d.novel_camera = cam
    sc.ex4d.depth_filepath = str(card_clip["depth"]) + ".missing.npy"
    with pytest.raises(RuntimeError, match=r"\[not_found\]") as exc:
        bpy.ops.ex4d.render_guide()
    assert " -- " in str(exc.value)  # the hint
    assert "[not_found]" in sc.ex4d.last_error and not sc.ex4d.job_running
    sc.ex4d.depth_filepath = str(card_clip["depth"])
    sc.render.resolution_x = 100  # another aspect ratio than the footage: the backend says so
    with pytest.raises(RuntimeError, match=r"aspect ratio"):
        bpy.ops.ex4d.render_guide()


def test_modal_path_never_blocks(scene, ops, job_store, tmp_blend_dir):
    """What the modal operator's timer does: Job.tick() polls without waiting (each call returns in
    milliseconds while the backend works), the progress fields move, and check_backend is answered while
    the job runs; the finished job shows its result like the blocking path."""
    clip = _make_clip(job_store.parent / "clips", "tick", w=96, h=64, t=12, card=(36, 60, 16, 48))
    sc = scene
    setup_shot(sc, clip, parented=False)
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_blend_dir / "tick.blend"))
    job = ops.guide_job(bpy.context)
    job.start(bpy.context)
    assert addon_module("runner").active_job() is job and sc.ex4d.job_running
    with pytest.raises(RuntimeError, match="job is running"):  # one job at a time (poll)
        bpy.ops.ex4d.render_guide()
    ticks, progress = [], []
    checked = False
    while True:
        t0 = time.perf_counter()
        finished = job.tick()
        if not finished:
            ticks.append(time.perf_counter() - t0)
            progress.append(sc.ex4d.job_progress)
            if not checked and job.stage:
                assert bpy.ops.ex4d.check_backend() == {"FINISHED"}  # beside the running job
                checked = True
        else:
            break
        time.sleep(0.01)
    assert job.state == "done", job.report
    assert checked and len(ticks) >= 3 and max(ticks) < 0.05, (len(ticks), max(ticks))
    assert progress == sorted(progress) and 0.0 < progress[-1] <= 1.0
    assert not sc.ex4d.job_running and sc.ex4d.job_progress == 1.0 and addon_module("runner").active_job() is None
    assert len(strips_of(sc, "guide")) == 1 and Path(bpy.path.abspath(sc.ex4d.guide_color_dir)).is_dir()


@pytest.mark.skipif(not os.environ.get("EX4D_BENCH"), reason="benchmark: set EX4D_BENCH=1")
def test_bench_render_guide_512(scene, ops, job_store, tmp_blend_dir):
    """render_guide on a 512 x 512 x 49 clip on the CPU: first run (frames, mesh, guide computed) and a
    second camera (frames, depth and mesh from the store)."""
    clip = _make_clip(job_store.parent / "clips", "bench", w=512, h=512, t=49, card=(192, 320, 128, 384))
    sc = scene
    cam = setup_shot(sc, clip, parented=False)
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_blend_dir / "bench.blend"))
    stamps: list[tuple[str, float]] = []
    addon_module("runner").event_hooks.append(
        lambda job, e: stamps.append((e.get("stage", e["event"]), time.monotonic()))
    )

    def run() -> str:
        stamps.clear()
        t0 = time.monotonic()
        assert bpy.ops.ex4d.render_guide() == {"FINISHED"}
        t1 = time.monotonic()
        per: dict[str, float] = {}
        prev, prev_stage = t0, "backend start"
        for stage, t in stamps:  # the time up to an event belongs to the stage reported before it
            per[prev_stage] = per.get(prev_stage, 0.0) + t - prev
            prev, prev_stage = t, stage
        per["add-on (copy, load, strip)"] = t1 - prev
        return f"{t1 - t0:.1f} s (" + ", ".join(f"{k} {v:.1f}" for k, v in per.items() if v >= 0.05) + ")"

    first = run()
    cam.data.lens *= 1.1  # another camera: the guide is rendered again, the DW-mesh comes from the store
    second = run()
    print(f"\nrender_guide 512x512x49 CPU: first {first}; new camera {second}")


class _ModalHarness:
    """The operator's modal machinery outside a window (headless Blender has none): ``modal`` is called
    with fake events, exactly as the window manager would call it."""

    def __new__(cls, ops):
        class Harness(addon_module("runner").JobOperator):
            def __init__(self):
                self.reports = []

            def report(self, level, text):
                self.reports.append((level, text))

        return Harness()


def _drive(op, ctx, *, esc_at: tuple[str, ...] = (), limit: float = 120.0):
    from types import SimpleNamespace

    timer, esc = SimpleNamespace(type="TIMER", value="NOTHING"), SimpleNamespace(type="ESC", value="PRESS")
    mouse = SimpleNamespace(type="MOUSEMOVE", value="NOTHING")
    state, deadline = {"RUNNING_MODAL"}, time.monotonic() + limit
    while state not in ({"FINISHED"}, {"CANCELLED"}) and time.monotonic() < deadline:
        assert op.modal(ctx, mouse) == {"PASS_THROUGH"}  # other events go on to the UI
        if op.job.stage in esc_at and not op.job.cancel_requested:
            assert op.modal(ctx, esc) == {"RUNNING_MODAL"}
        state = op.modal(ctx, timer)
        time.sleep(0.01)
    return state


def test_modal_operator_escape_cancels_and_finishes(scene, ops, job_store, tmp_blend_dir):
    from types import SimpleNamespace

    # A clip of its own (nothing in the store) and large enough that Esc lands while the job works.
    clip = _make_clip(job_store.parent / "clips", "modal", w=128, h=96, t=24, card=(48, 80, 24, 72), noise=True)
    sc = scene
    setup_shot(sc, clip, parented=False)
    sc.ex4d_job.width, sc.ex4d_job.height, sc.ex4d_job.num_frames = 128, 96, 21
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_blend_dir / "modal.blend"))
    ctx = SimpleNamespace(scene=sc, window_manager=bpy.context.window_manager)
    op = _ModalHarness(ops)
    op.job = ops.generate_job(bpy.context, "PREVIEW")
    op.job.start(bpy.context)
    assert _drive(op, ctx, esc_at=("frames", "depth", "render")) == {"CANCELLED"}
    assert op.reports[-1][0] == {"WARNING"} and "cancelled" in op.reports[-1][1]
    assert op.job.events[-1]["error"]["code"] == "cancelled"
    assert not strips_of(sc, "generate") and not sc.ex4d.job_running and addon_module("runner").active_job() is None
    op = _ModalHarness(ops)
    op.job = ops.guide_job(bpy.context)
    op.job.start(bpy.context)
    assert _drive(op, ctx) == {"FINISHED"}
    assert op.reports[-1][0] == {"INFO"} and len(strips_of(sc, "guide")) == 1


FAKE_BACKEND = """
import json, sys
for line in sys.stdin:
    req = json.loads(line)
    if req["type"] == "hello":
        out = {"id": req["id"], "event": "result", "result": {"protocol": "3.0", "backend_version": "9"}}
    else:
        out = {"id": req["id"], "event": "error", "error": {"code": "internal", "message": "fake"}}
    print(json.dumps(out), flush=True)
"""


def test_broken_backend_python_is_reported(scene, ops, card_clip, tmp_path):
    """A backend Python that does not exist, one without ex4d_backend (it exits at once: the report quotes
    its error), a backend of another protocol major version; then the right one works again."""
    import sys

    props = addon_module("props")
    pref = props.prefs()
    sc = scene
    setup_shot(sc, card_clip, parented=False)
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_path / "broken.blend"))
    try:
        pref.backend_python = str(tmp_path / "no" / "python")
        with pytest.raises(RuntimeError, match=r"does not exist.*\[not_found\]"):
            bpy.ops.ex4d.render_guide()
        pref.backend_python = sys.executable  # the bpy venv: not the backend (misses its packages)
        with pytest.raises(RuntimeError, match=r"No module named .*\[backend_died\]"):
            bpy.ops.ex4d.render_guide()
        fake = tmp_path / "fake.py"
        fake.write_text(FAKE_BACKEND)
        wrapper = tmp_path / "python"
        wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{fake}"\n')
        wrapper.chmod(0o755)
        pref.backend_python = str(wrapper)
        with pytest.raises(RuntimeError, match=r"protocol 3\.0.*\[protocol\]"):
            bpy.ops.ex4d.render_guide()
        assert not sc.ex4d.job_running and "[protocol]" in sc.ex4d.last_error
    finally:
        pref.backend_python = ""
    assert bpy.ops.ex4d.render_guide() == {"FINISHED"}


def test_script_chain_with_preset(scene, ops, clip, tmp_blend_dir):
    """The scripting contract end to end in background mode: import_footage -> build_dwmesh ->
    add_camera_preset('90') -> render_guide -> generate('PREVIEW'), each returning when done. The guide of
    the keyed preset camera matches the backend's own guide for the preset path (same mask within 1 %)."""
    backend = addon_module("backend")
    sc = scene
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_blend_dir / "chain.blend"))
    assert bpy.ops.ex4d.import_footage(filepath=str(clip["frames_dir"]), focal_px=clip["focal_px"]) == {"FINISHED"}
    assert bpy.ops.ex4d.build_dwmesh(depth_filepath=str(clip["depth"])) == {"FINISHED"}, sc.ex4d.last_error
    assert bpy.ops.ex4d.add_camera_preset(preset="90") == {"FINISHED"}, sc.ex4d.last_error
    assert bpy.ops.ex4d.render_guide() == {"FINISHED"}
    files = sorted(Path(bpy.path.abspath(sc.ex4d.guide_mask_dir)).glob("*.png"))
    ours = np.stack([read_png(f)[..., 0] for f in files])
    params, paths = backend.clip_params(bpy.context)
    ref = backend.run_blocking(bpy.context, "render_guide", {**params, "camera": {"preset": "90"}}, paths, 120)
    theirs = np.stack([read_png(f)[..., 0] for f in sorted(Path(ref["mask_dir"]).glob("*.png"))])  # the exact guide
    assert ours.shape == theirs.shape
    assert (ours != theirs).mean() < 0.01 and (theirs == 0).any()
    color0 = read_png(sorted(Path(bpy.path.abspath(sc.ex4d.guide_color_dir)).glob("*.png"))[0])
    assert np.array_equal(color0, np.load(clip["frames_npy"])[0])
    sc.ex4d_job.width, sc.ex4d_job.height, sc.ex4d_job.num_frames = 64, 48, 5
    assert bpy.ops.ex4d.generate(generator="PREVIEW") == {"FINISHED"}
    (st,) = strips_of(sc, "generate")
    assert addon_module("compat").strip_frame_range(st) == (sc.frame_start, sc.frame_start + clip["n_frames"])
    assert sc.ex4d.dwmesh is not None  # what build_dwmesh made is still there
