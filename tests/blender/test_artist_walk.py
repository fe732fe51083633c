# ruff: noqa: F811 - the fixtures imported from test_job_ops are used as arguments
"""Issue 16's defects 1-10, each as an artist meets it, in real headless Blender against a real backend.

Each test names the defect it guards and the wrong code that makes it fail; every one of them failed on
commit 27cafcc (run against a checkout of it) and passes now. Ground truth: the card clip of
test_job_ops (a wall at z = 4, a card at z = 2, exact colours), closed-form image shifts, file contents.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import bpy
import numpy as np
import pytest
from conftest import ADDON, addon_module, backend_py
from test_job_ops import CARD_RGB, WALL_RGB, _make_clip, card_clip, ops, read_png, setup_shot, strips_of  # noqa: F401

W, H, T, F = 64, 48, 6, 50.0


def _abs(p: str) -> Path:
    return Path(bpy.path.abspath(p))


def _digest(folder: Path) -> dict:
    return {f.name: hashlib.sha1(f.read_bytes()).hexdigest() for f in sorted(folder.glob("frame_*.png"))}


# -- 1 -------------------------------------------------------------------------------------------------
def test_1_sequence_numbered_from_1001(scene, ops, card_clip, tmp_path):
    """Defect 1: a plate numbered plate.1001.png ... imports at its real size (the old code read the
    size after switching the image to SEQUENCE: 4 x 4 px, a 9000 mm lens) and shows frame 1001 first."""
    src = sorted(Path(card_clip["frames_dir"]).glob("*.png"))
    plate = tmp_path / "plate"
    plate.mkdir()
    for i, f in enumerate(src):
        shutil.copyfile(f, plate / f"plate.{1001 + i}.png")
    assert bpy.ops.ex4d.import_footage(filepath=str(plate), focal_px=F) == {"FINISHED"}
    r, s = scene.render, scene.ex4d
    assert (r.resolution_x, r.resolution_y) == (W, H)
    assert (s.processing_width, s.processing_height, s.n_frames) == (W, H, T)
    cam = s.source_camera
    assert cam.data.lens == pytest.approx(F * 36.0 / W)  # fx = lens / sensor_width * W
    bg = cam.data.background_images[0]
    assert bg.image.source == "SEQUENCE" and bg.image_user.frame_offset == 1000  # scene frame 1 -> file 1001


# -- 2 -------------------------------------------------------------------------------------------------
def test_2_result_strip_fits_a_wide_frame(scene, ops, job_store, tmp_blend_dir):
    """Defect 2: a 64 x 64 result in a 96 x 54 (16:9) scene fills the frame's height (fit_method FIT:
    scale 54/64); the old strip kept its pixel size (scale 1), a small square in the frame."""
    clip = _make_clip(job_store.parent / "clips", "wide", w=96, h=54, t=T, card=(36, 60, 14, 40))
    setup_shot(scene, clip, parented=False)
    js = scene.ex4d_job
    js.width, js.height, js.num_frames = 64, 64, 5
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_blend_dir / "wide.blend"))
    assert bpy.ops.ex4d.generate(generator="PREVIEW") == {"FINISHED"}
    (st,) = strips_of(scene, "generate")
    assert st.transform.scale_x == pytest.approx(54 / 64, rel=1e-3)
    assert st.transform.scale_y == pytest.approx(54 / 64, rel=1e-3)


# -- 3 -------------------------------------------------------------------------------------------------
def test_3_animated_lens_shift_reaches_the_guide(scene, ops, card_clip, tmp_blend_dir):
    """Defect 3: shift_x keyed 0 -> 0.25 over the clip. A lens shift moves the whole image by shift * W
    pixels without parallax, so the last guide frame is the source moved left by 16 px (exact colours).
    The old code sampled the shift once (0 at the first frame): its last guide frame is the source."""
    cam = setup_shot(scene, card_clip, parented=False)
    cam.animation_data_clear()  # a static camera at the source: only the shift moves
    cam.location = (0.0, 0.0, 0.0)
    for i in range(T):
        cam.data.shift_x = 0.25 * i / (T - 1)
        cam.data.keyframe_insert("shift_x", frame=scene.frame_start + i)
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_blend_dir / "shift.blend"))
    assert bpy.ops.ex4d.render_guide() == {"FINISHED"}
    last = read_png(sorted(_abs(scene.ex4d.guide_color_dir).glob("*.png"))[-1]).astype(int)
    src = np.load(card_clip["frames_npy"])[-1].astype(int)
    d = int(0.25 * W)
    # compare where the source is constant over 5 x 5 pixels (the guide interpolates between vertices and
    # masks the one-pixel occlusion band at the card's edge)
    pad = np.pad(src, ((2, 2), (2, 2), (0, 0)), mode="edge")
    const = np.ones((H, W), bool)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            const &= (pad[2 + dy : 2 + dy + H, 2 + dx : 2 + dx + W] == src).all(-1)
    const[:3], const[-3:], const[:, :3], const[:, -3:] = False, False, False, False  # the border ring
    ys, xs = np.nonzero(const[:, d:])  # guide pixel (y, x) shows source pixel (y, x + d)
    on_card = (src[ys, xs + d] == CARD_RGB).all(-1)
    assert on_card.sum() > 100 and (~on_card).sum() > 100
    bad = (last[ys, xs] != src[ys, xs + d]).any(-1)
    assert not bad.any(), list(zip(ys[bad], xs[bad], strict=True))


# -- 4 -------------------------------------------------------------------------------------------------
def test_4_results_never_overwrite_each_other(scene, ops, card_clip, job_store, tmp_blend_dir):
    """Defect 4: a second generation with another prompt and CFG goes to a new version folder and the
    first one's frames stay; identical settings again add no duplicate strip; two clips both named
    ``card_frames`` in different folders get different shot folders. The old code wrote every result of
    a camera and seed into one folder and named shots by the clip's name only."""
    setup_shot(scene, card_clip, parented=False)
    js = scene.ex4d_job
    js.width, js.height, js.num_frames = 64, 48, 5
    scene.ex4d.seed, scene.ex4d.steps = 5, 2
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_blend_dir / "versions.blend"))
    assert bpy.ops.ex4d.generate(generator="PREVIEW") == {"FINISHED"}
    (first,) = strips_of(scene, "generate")
    first_dir = _abs(first.directory)
    before = _digest(first_dir)
    scene.ex4d.prompt, js.cfg = "another prompt", 3.0
    assert bpy.ops.ex4d.generate(generator="PREVIEW") == {"FINISHED"}
    results = strips_of(scene, "generate")
    assert len(results) == 2
    dirs = {_abs(s.directory) for s in results}
    assert len(dirs) == 2 and first_dir in dirs and _digest(first_dir) == before
    assert sorted(d.name[-4:] for d in dirs) == ["v001", "v002"]
    assert bpy.ops.ex4d.generate(generator="PREVIEW") == {"FINISHED"}  # identical settings: reused
    assert len(strips_of(scene, "generate")) == 2
    job = json.loads((first_dir / "job.json").read_text())  # portable: relative to its folder
    assert not os.path.isabs(job["params"]["footage"])
    assert (first_dir / job["params"]["footage"]).resolve() == Path(card_clip["frames_dir"]).resolve()
    # two clips with the same name in two folders
    other = _make_clip(job_store.parent / "clips" / "elsewhere", "card")
    assert bpy.ops.ex4d.render_guide() == {"FINISHED"}
    guide_a = _abs(scene.ex4d.guide_color_dir)
    scene.ex4d.footage_path, scene.ex4d.depth_filepath = str(other["frames_dir"]), str(other["depth"])
    assert bpy.ops.ex4d.render_guide() == {"FINISHED"}
    guide_b = _abs(scene.ex4d.guide_color_dir)
    assert guide_a.parent.parent != guide_b.parent.parent  # <shot>/guide_<hash>/color


# -- 6 -------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_6_a_saved_project_can_move(scene, ops, card_clip, tmp_path):
    """Defect 6: footage, depth, guide folders and strips are stored relative to the .blend: after the
    project folder is moved, render_guide works and writes into the moved folder. The old code stored
    absolute paths ("the footage does not exist" after the move). An unsaved file gets a warning."""
    setup_shot(scene, card_clip, parented=False)
    proj = tmp_path / "project"
    shutil.copytree(card_clip["frames_dir"], proj / "footage" / "plate")
    shutil.copyfile(card_clip["depth"], proj / "footage" / "depth.npy")
    bpy.ops.wm.save_as_mainfile(filepath=str(proj / "shot.blend"))
    assert bpy.ops.ex4d.import_footage(filepath=str(proj / "footage" / "plate"), focal_px=F) == {"FINISHED"}
    assert bpy.ops.ex4d.build_dwmesh(depth_filepath=str(proj / "footage" / "depth.npy")) == {"FINISHED"}
    scene.ex4d.novel_camera = bpy.data.objects["Novel"]
    assert bpy.ops.ex4d.render_guide() == {"FINISHED"}
    s = scene.ex4d
    for p in (s.footage_path, s.depth_filepath, s.guide_color_dir):
        assert p.startswith("//"), p
    bpy.ops.wm.save_mainfile()
    moved = tmp_path / "moved_project"
    shutil.move(str(proj), str(moved))
    bpy.ops.wm.open_mainfile(filepath=str(moved / "shot.blend"))
    sc = bpy.context.scene
    sc.ex4d.novel_camera.data.lens *= 1.05  # a new guide, not one from the store
    assert bpy.ops.ex4d.render_guide() == {"FINISHED"}, sc.ex4d.last_error
    assert moved in _abs(sc.ex4d.guide_color_dir).parents
    (st,) = strips_of(sc, "guide")
    assert moved in _abs(st.directory).parents and all((_abs(st.directory) / e.filename).is_file() for e in st.elements)
    bpy.ops.wm.read_homefile(use_empty=True)  # an unsaved file: a warning says where the results went
    setup_shot(bpy.context.scene, card_clip, parented=False)
    assert bpy.ops.ex4d.render_guide() == {"FINISHED"}
    assert "not saved" in bpy.context.scene.ex4d.last_warning


# -- 7 -------------------------------------------------------------------------------------------------
def test_7_focal_is_kept_and_applied_by_the_build(scene, ops, card_clip):
    """Defect 7: import keeps a Focal (px) the artist set in the panel (the old import reset it to 500);
    changing it after a build flags the DW-mesh as out of date and leaves the source lens alone until the
    next build applies it to both (the old code changed the lens at once, without a rebuild)."""
    s = scene.ex4d
    s.focal_px = 80.0
    assert bpy.ops.ex4d.import_footage(filepath=str(card_clip["frames_dir"])) == {"FINISHED"}
    assert s.focal_px == pytest.approx(80.0)
    assert s.source_camera.data.lens == pytest.approx(80.0 * 36.0 / W)
    assert bpy.ops.ex4d.build_dwmesh(depth_filepath=str(card_clip["depth"])) == {"FINISHED"}
    assert not s.mesh_stale
    s.focal_px = 60.0
    assert s.mesh_stale and s.source_camera.data.lens == pytest.approx(80.0 * 36.0 / W)
    assert bpy.ops.ex4d.build_dwmesh() == {"FINISHED"}
    assert not s.mesh_stale and s.source_camera.data.lens == pytest.approx(60.0 * 36.0 / W)
    assert list(s.dwmesh["ex4d_K"])[0] == pytest.approx(60.0)


# -- 8 -------------------------------------------------------------------------------------------------
def test_8_no_silent_scene_camera_and_a_masked_guide_warns(scene, ops, card_clip, tmp_blend_dir):
    """Defect 8: with no novel camera chosen, render_guide refuses (the old code rendered the scene camera
    silently); a guide that is mostly unseen (a camera turned 90 degrees away) is reported as a WARNING
    with its unseen share (the old code said "done")."""
    cam = setup_shot(scene, card_clip, parented=False)
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_blend_dir / "existing.blend"))
    scene.ex4d.novel_camera = None
    scene.camera = cam  # an existing scene with its own camera
    with pytest.raises(RuntimeError, match="Novel Camera"):
        bpy.ops.ex4d.render_guide()
    assert not strips_of(scene, "guide")
    scene.ex4d.novel_camera = cam
    cam.animation_data_clear()
    cam.rotation_euler = (np.pi / 2, 0.0, np.pi / 2)  # looking along -X: the footage is out of view
    assert bpy.ops.ex4d.render_guide() == {"FINISHED"}
    assert "unseen" in scene.ex4d.last_warning


# -- 9 -------------------------------------------------------------------------------------------------
def test_9_errors_carry_their_cause(scene, ops, card_clip, tmp_path):
    """Defect 9: a backend Python without ex4d_backend fails build_dwmesh with the backend's own last log
    line ("No module named ..."), where the old build said only "see the log lines" and showed none; a
    .blend whose DW-mesh files were cleaned from the store says so on open (the old one froze silently)."""
    pref = addon_module("props").prefs()
    assert bpy.ops.ex4d.import_footage(filepath=str(card_clip["frames_dir"]), focal_px=F) == {"FINISHED"}
    try:
        pref.backend_python = sys.executable  # the bpy venv: no ex4d_backend
        with pytest.raises(RuntimeError, match=r"No module named .*\[backend_died\]"):
            bpy.ops.ex4d.build_dwmesh(depth_filepath=str(card_clip["depth"]))
    finally:
        pref.backend_python = ""
    assert bpy.ops.ex4d.build_dwmesh(depth_filepath=str(card_clip["depth"])) == {"FINISHED"}
    obj = scene.ex4d.dwmesh
    mesh_dir = _abs(obj.modifiers[0].filepath).parent
    blend = tmp_path / "cleaned.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(blend))
    aside = tmp_path / "aside"
    shutil.move(str(mesh_dir), str(aside))  # what `ex4d store clean` does to it
    try:
        bpy.ops.wm.open_mainfile(filepath=str(blend))
        s = bpy.context.scene.ex4d
        assert "Build DW-Mesh again" in s.last_error and s.mesh_stale
    finally:
        shutil.move(str(aside), str(mesh_dir))


# -- 10 ------------------------------------------------------------------------------------------------
def test_10_smaller_defects(scene, ops, card_clip, capfd):
    """Defect 10: one "EX4D Footage" material however often the mesh is built (the old code added .001
    copies); turning on Lock Interface is said (it was silent); background build honours the time limit
    (it ignored it) and prints progress on the console (it printed none); EX-4D generation on a backend
    without a GPU is refused before any work (the old one rendered the guide, then failed at "load");
    an Esc release does not cancel (the old build cancelled on any Esc event); handlers are never added
    twice."""
    scene.render.use_lock_interface = False
    assert bpy.ops.ex4d.import_footage(filepath=str(card_clip["frames_dir"]), focal_px=F) == {"FINISHED"}
    assert bpy.ops.ex4d.build_dwmesh(depth_filepath=str(card_clip["depth"])) == {"FINISHED"}
    assert bpy.ops.ex4d.build_dwmesh() == {"FINISHED"}
    assert [m.name for m in bpy.data.materials if m.name.startswith("EX4D Footage")] == ["EX4D Footage"]
    out = capfd.readouterr().out
    assert "EX-4D DW-mesh: Step" in out  # progress lines for a farm's log
    assert scene.render.use_lock_interface and "Lock Interface" in out  # said, not silent
    # the time limit (background mode): a forced rebuild stopped after 10 ms
    runner = addon_module("runner")
    job = addon_module("ops_scene").build_job(bpy.context)
    job.params["force"] = True
    job.start(bpy.context)
    job.run_blocking(timeout=0.01)
    assert job.state == "cancelled" and "time limit" in job.report[1]
    # an Esc release is not a cancel
    op = type("H", (runner.JobOperator,), {"report": lambda self, *a: None})()
    op.job = addon_module("ops_scene").build_job(bpy.context)
    op.job.start(bpy.context)
    ctx = SimpleNamespace(scene=scene, window_manager=bpy.context.window_manager)
    assert op.modal(ctx, SimpleNamespace(type="ESC", value="RELEASE")) == {"RUNNING_MODAL"}
    state, deadline = {"PASS_THROUGH"}, time.monotonic() + 60
    while state not in ({"FINISHED"}, {"CANCELLED"}) and time.monotonic() < deadline:
        state = op.modal(ctx, SimpleNamespace(type="TIMER", value="NOTHING"))
        time.sleep(0.01)
    assert state == {"FINISHED"} and not op.job.cancel_requested
    # EX-4D generation refused up front on this CPU-only backend
    cam = bpy.data.objects.new("Novel", bpy.data.cameras.new("Novel"))
    scene.collection.objects.link(cam)
    cam.matrix_world = scene.ex4d.source_camera.matrix_world
    scene.ex4d.novel_camera = cam
    stages: list[str] = []
    runner.event_hooks.append(lambda j, e: stages.append(e.get("stage", "")))
    with pytest.raises(RuntimeError, match=r"CUDA GPU|weights are missing"):
        bpy.ops.ex4d.generate(generator="EX4D")
    assert "render" not in stages and not strips_of(scene, "guide")
    # handlers once, also when a module registers again
    runner.register()
    addon_module("mesh_object").register()
    for lst in (bpy.app.handlers.load_post, bpy.app.handlers.load_pre, bpy.app.handlers.frame_change_pre):
        names = [f"{h.__module__}.{h.__name__}" for h in lst if h.__module__.startswith(ADDON)]
        assert len(names) == len(set(names)), names


def test_defaults_equal_the_backends(addon):
    """The add-on's copies of the generation defaults equal the backend's constants (issue 12: a copy is
    allowed only with this proof). Fails when either side changes alone."""
    props = addon_module("props")
    ref = backend_py(
        "try:\n    from ex4d_backend.constants import GEN_DEFAULTS\n"
        "except ImportError:\n    from ex4d_backend.service.jobs import GEN_DEFAULTS\n"
        "from ex4d_backend.generation.conditioning import REFERENCE_PROMPT\n"
        "from ex4d_backend.cameras import REFERENCE_FOCAL_PX\n"
        "OUT = {**GEN_DEFAULTS, 'prompt': REFERENCE_PROMPT, 'focal_px': REFERENCE_FOCAL_PX}"
    )
    assert (
        props.DEFAULT_STEPS == ref["steps"] and props.DEFAULT_CFG == ref["cfg"] and props.DEFAULT_SHIFT == ref["shift"]
    )
    assert props.DEFAULT_SIZE_MODE == ref["size"] and props.DEFAULT_NUM_FRAMES == ref["num_frames"]
    assert props.DEFAULT_CHAIN_VARIANT == ref["chain_variant"] and props.DEFAULT_FRAME_SAMPLING == ref["frame_sampling"]
    assert props.DEFAULT_PROMPT == ref["prompt"] and props.DEFAULT_FOCAL_PX == ref["focal_px"]
    sc = bpy.context.scene
    assert sc.ex4d.steps == ref["steps"] and sc.ex4d_job.cfg == ref["cfg"] and sc.ex4d.prompt == ref["prompt"]
