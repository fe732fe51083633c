"""Where result strips live, so the default F12 render is never hijacked (issue 18, compositing).

``scene.ex4d_job.results_in``:
- ``'SCENE'`` (default): the strips go into their own sequencer scene ("EX4D Results", one per main scene,
  kept in ``scene.ex4d_job.results_scene``) whose resolution, frame rate and frame range follow the main
  scene's; the main scene gets no strips, so its F12 render is the 3D scene. Render the results scene (or
  add it as a scene strip) to get the results;
- ``'CHANNEL'``: in the main scene on the artist's channel (``results_channel``, the first free one at or
  above it). Then the main scene's F12 renders the sequencer (Blender's rule: strips + use_sequencer).

Also here: a result sequence as the novel camera's background image (beside the guide's), and the stereo
strips (per eye, side by side, and one multiview strip: the side-by-side frames with ``use_multiview`` and
``views_format 'STEREO_3D'``, display mode SIDEBYSIDE, which the VSE shows per eye in a stereo 3D scene).
"""

from __future__ import annotations

import bpy

from . import compat, strips

RESULTS_SCENE = "EX4D Results"
RESULT_BG_KIND = "result"  # the ``ex4d_kind`` of an image shown as a camera background for a result


def target(scene) -> bpy.types.Scene:
    """The scene result strips go into (see the module docstring), created and synced on first use."""
    js = scene.ex4d_job
    if js.results_in == "CHANNEL":
        return scene
    res = js.results_scene
    if res is None or res == scene:
        res = bpy.data.scenes.new(RESULTS_SCENE)
        res["ex4d_results_of"] = scene.name
        js.results_scene = res
    sync(scene, res)
    return res


def sync(main: bpy.types.Scene, res: bpy.types.Scene) -> None:
    """The results scene's output follows the main scene's: size, frame rate, frame range (widened only)."""
    r, m = res.render, main.render
    r.resolution_x, r.resolution_y, r.resolution_percentage = m.resolution_x, m.resolution_y, m.resolution_percentage
    r.fps, r.fps_base = m.fps, m.fps_base
    r.use_sequencer = True
    res.frame_start = min(res.frame_start, main.frame_start) if res.get("ex4d_synced") else main.frame_start
    res.frame_end = max(res.frame_end, main.frame_end) if res.get("ex4d_synced") else main.frame_end
    res["ex4d_synced"] = True
    if res.sequence_editor is None:
        res.sequence_editor_create()


def place(scene, strip) -> None:
    """In CHANNEL mode: move ``strip`` to the first free channel at or above ``results_channel``."""
    js = scene.ex4d_job
    if js.results_in != "CHANNEL" or js.results_channel <= 0:
        return
    start, end = strip.frame_final_start, strip.frame_final_end
    used = {
        s.channel
        for s in compat.vse_strips_all(scene)
        if s != strip and s.frame_final_start < end and s.frame_final_end > start
    }
    ch = js.results_channel
    while ch in used:
        ch += 1
    strip.channel = ch


def strips_scene(scene) -> bpy.types.Scene:
    """Where to LOOK for this scene's result strips (no scene is created)."""
    js = scene.ex4d_job
    if js.results_in == "CHANNEL" or js.results_scene is None:
        return scene
    return js.results_scene


def show_result_on_camera(cam_obj, image: bpy.types.Image, frame_start: int, n_frames: int) -> None:
    """Show ``image`` (a result sequence) as ``cam_obj``'s background, above the guide and replacing an
    earlier EX-4D result (compositing: line CG up with the result through the camera)."""
    strips.show_on_camera(cam_obj, image, frame_start, n_frames, kind=RESULT_BG_KIND, depth="FRONT")


def make_multiview(strip) -> None:
    """A side-by-side strip as one stereo strip: Blender splits it into the left and right views."""
    strip.use_multiview = True
    strip.views_format = "STEREO_3D"
    strip.stereo_3d_format.display_mode = "SIDEBYSIDE"
    strip.stereo_3d_format.use_sidebyside_crosseyed = False
    strip.stereo_3d_format.use_squeezed_frame = False


def use_stereo_views(scene: bpy.types.Scene) -> None:
    """Stereo 3D output (views 'left' and 'right') for the results scene, as the main scene has."""
    scene.render.use_multiview = True
    scene.render.views_format = "STEREO_3D"
