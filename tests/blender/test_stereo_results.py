# ruff: noqa: F811  (pytest fixtures imported from test_job_ops)
"""Stereo 3D and compositing results in headless Blender against a real ``ex4d serve`` (issue 18).

Ground truth: the card clip of ``test_job_ops`` (a wall at z = 4, a card at z = 2, focal 50 px) seen by an
off-axis stereo pair of the novel camera: the card's image in the left eye sits fx b (1/2 - 1/C) pixels right
of its image in the right eye (Blender's off-axis formula, written here); results must live in the results
scene, never in the main scene's sequencer (so its F12 render stays the 3D scene).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import addon_module
from test_job_ops import CARD_RGB, Z_CARD, F, T, card_clip, ops, read_png, setup_shot, strips_of  # noqa: F401

bpy = pytest.importorskip("bpy")

B, C = 0.4, 8.0  # interocular, convergence distance (scene units)


def stereo_shot(sc, clip):
    cam = setup_shot(sc, clip, frame_start=1, parented=False)
    sc.render.use_multiview = True
    sc.render.views_format = "STEREO_3D"
    st = cam.data.stereo
    st.interocular_distance, st.convergence_distance = B, C
    st.convergence_mode, st.pivot = "OFFAXIS", "CENTER"
    return cam


def card_centre_u(img: np.ndarray) -> float:
    """Mean column of the card's pixels (its colour, exact in the guide)."""
    on = (img == CARD_RGB).all(-1)
    cols = np.nonzero(on)[1]
    return float(cols.mean())


def main_scene_has_no_strips(sc) -> bool:
    return not addon_module("compat").vse_strips_all(sc)


def test_render_guide_both_eyes_in_the_results_scene(scene, ops, card_clip, tmp_blend_dir):
    """Catches: stereo not sent (no eyes), the eyes' values not the camera's (wrong disparity: PARALLEL gives
    fx b / 2 = 10 px, a swapped pair a negative one), strips in the main scene (F12 would render them), the
    multiview strip not flagged STEREO_3D, the CHANNEL setting ignored."""
    sc = scene
    stereo_shot(sc, card_clip)
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_blend_dir / "stereo.blend"))
    assert bpy.ops.ex4d.render_guide() == {"FINISHED"}
    guide = Path(bpy.path.abspath(sc.ex4d.guide_color_dir)).parent
    want = F * B * (1.0 / Z_CARD - 1.0 / C)  # u_left - u_right, Blender's off-axis pair
    for i in range(T):
        left = read_png(sorted((guide / "left" / "color").glob("*.png"))[i])
        right = read_png(sorted((guide / "right" / "color").glob("*.png"))[i])
        assert abs(card_centre_u(left) - card_centre_u(right) - want) < 0.6, (i, want)
    sbs = read_png(sorted((guide / "sbs").glob("*.png"))[0])
    assert sbs.shape[1] == 2 * left.shape[1]
    res = sc.ex4d_job.results_scene
    assert res is not None and res.name.startswith("EX4D Results") and main_scene_has_no_strips(sc)
    assert res.render.use_sequencer and (res.render.resolution_x, res.render.resolution_y) == (64, 48)
    stereo = strips_of(sc, "guide_stereo")
    by_eye = {s["ex4d_eye"]: s for s in stereo}
    assert set(by_eye) == {"left", "right", "multiview"} and by_eye["left"].mute and by_eye["right"].mute
    mv = by_eye["multiview"]
    assert mv.use_multiview and mv.views_format == "STEREO_3D" and mv.stereo_3d_format.display_mode == "SIDEBYSIDE"
    assert res.render.use_multiview and len(strips_of(sc, "guide")) == 1
    # The artist's channel in the scene itself instead
    sc.ex4d_job.results_in, sc.ex4d_job.results_channel = "CHANNEL", 4
    assert bpy.ops.ex4d.render_guide() == {"FINISHED"}
    own = [s for s in addon_module("compat").vse_strips_all(sc) if s.get("ex4d_kind") == "guide"]
    assert len(own) == 1 and own[0].channel >= 4


def test_generate_both_eyes_exr_and_camera_background(scene, ops, card_clip, tmp_blend_dir):
    """Catches: only one eye generated, the right eye / side-by-side / EXR passes not written beside the
    result, the result not on the novel camera's background, strips in the main scene."""
    sc = scene
    cam = stereo_shot(sc, card_clip)
    sc.ex4d_job.export_exr = True
    js = sc.ex4d_job
    js.width, js.height, js.num_frames = 64, 48, 5
    sc.ex4d.steps = 2
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_blend_dir / "stereo_gen.blend"))
    assert bpy.ops.ex4d.generate(generator="PREVIEW") == {"FINISHED"}
    assert main_scene_has_no_strips(sc)
    (main,) = strips_of(sc, "generate")
    assert main["ex4d_eye"] == "left"
    dest = Path(bpy.path.abspath(main["ex4d_frames_dir"]))
    for sub in ("right", "sbs", "exr", "right/exr"):
        files = sorted((dest / sub).glob("frame_*"))
        assert len(files) == T, (sub, len(files))
    assert (
        read_png(sorted(dest.glob("frame_*.png"))[2]).tolist()
        != read_png(sorted((dest / "right").glob("frame_*.png"))[2]).tolist()
    )
    exr = bpy.data.images.load(str(sorted((dest / "exr").glob("*.exr"))[-1]), check_existing=False)
    px = np.empty(exr.size[0] * exr.size[1] * 4, np.float32)
    exr.pixels.foreach_get(px)
    alpha = px[3::4]
    assert set(np.unique(np.round(alpha, 3))) <= {0.0, 1.0} and 0 < alpha.mean() < 1  # the mask, with holes
    by_eye = {s["ex4d_eye"]: s for s in strips_of(sc, "generate_stereo")}
    assert set(by_eye) == {"right", "multiview"} and by_eye["multiview"].use_multiview
    kinds = {b.image.get("ex4d_kind") for b in cam.data.background_images if b.image is not None}
    assert kinds == {"guide", "result"} or kinds == {"result"}
