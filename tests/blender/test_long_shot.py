"""``ex4d.generate`` on a shot longer than one window (issue 14's Blender part), in headless Blender
against a real ``ex4d serve`` with the preview generator: every clip frame comes back, one strip per result
kind (generated frames, full-resolution composite) at the clip's start, fitted to the render size, and the
status shows "window n of N"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import addon_module
from test_job_ops import _make_clip, read_png, setup_shot, strips_of

bpy = pytest.importorskip("bpy")

T_LONG = 13  # window 9, overlap 1 -> windows [0, 9) and [4, 13)
WINDOW = 9
START = 10  # the clip's first scene frame


@pytest.fixture(scope="module")
def long_clip(job_store) -> dict:
    return _make_clip(job_store.parent / "clips", "long", t=T_LONG, noise=True)


@pytest.fixture
def ops(addon, job_store):
    addon_module("backend").allow([str(job_store.parent)])
    yield addon_module("ops_jobs")
    addon_module("runner").event_hooks.clear()


@pytest.mark.slow
def test_a_two_window_shot_gives_one_strip_per_kind_over_the_whole_clip(scene, ops, long_clip, tmp_blend_dir):
    """A 13-frame clip, window 9, default size (auto) and sampling (every frame): the generated strip and
    the composite strip each hold 13 frames, start at the clip's first scene frame (strip frame k = scene
    frame START + k), are fitted to the render size (FIT); the generated frames are at the auto size of a
    4:3 clip (736 x 544, the documented rule), the composite at the guide's 64 x 48; the status bar message
    named window 2 of 2. Wrong code (a linspace sample of the clip, one strip only, a strip at frame 1,
    the old 512 x 512 default) fails here."""
    sc = scene
    setup_shot(sc, long_clip, frame_start=START, parented=False)
    sc.ex4d.steps = 2
    js = sc.ex4d_job
    js.num_frames = WINDOW
    assert (js.width, js.height, js.frame_sampling, js.chain_variant) == (0, 0, "windows", "given")
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_blend_dir / "long.blend"))
    messages: list[str] = []
    addon_module("runner").event_hooks.append(
        lambda job, e: messages.append(sc.ex4d.job_message) if e["event"] == "progress" else None
    )
    assert bpy.ops.ex4d.generate(generator="PREVIEW") == {"FINISHED"}
    assert any(m.startswith("window 2 of 2:") for m in messages), messages[-5:]
    (gen,) = strips_of(sc, "generate")
    (comp,) = strips_of(sc, "composite")
    for st in (gen, comp):
        assert st.frame_final_start == START and st.frame_final_duration == T_LONG
        names = [e.filename for e in st.elements]
        assert names == [f"frame_{START + k:05d}.png" for k in range(T_LONG)]
    assert json.loads(gen["ex4d_source_frames"]) == list(range(T_LONG))
    assert gen["ex4d_frame_sampling"] == "windows" and gen.channel != comp.channel
    gen_dir, comp_dir = Path(bpy.path.abspath(gen.directory)), Path(bpy.path.abspath(comp.directory))
    assert comp_dir == gen_dir / "composite"
    assert read_png(gen_dir / gen.elements[0].filename).shape == (544, 736, 3)
    assert read_png(comp_dir / comp.elements[-1].filename).shape == (48, 64, 3)
    # fit_method FIT: the image scaled to fit the 64 x 48 render frame (the generation 736 x 544 by
    # min(64 / 736, 48 / 544), the composite, at the guide's size, by 1).
    assert gen.transform.scale_x == pytest.approx(64 / 736, rel=1e-4) == gen.transform.scale_y
    assert comp.transform.scale_x == pytest.approx(1.0) == comp.transform.scale_y
    plan = json.loads(gen["ex4d_plan"])
    assert plan["windows"] == [[0, 9, 0, 0], [4, 13, 5, 5]]
