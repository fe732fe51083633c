"""A moving source camera in real headless Blender (issue 15): a keyed, jittering "EX4D Source" sent to the
backend, the DW-mesh riding on it, the depth scale fitted to bundles, and the frame-0 check with Snap / Blend In.

Sources: a keyed jittering camera, bundles as Empties (``bundle_collection``), and a real camera solve: tracks
with exact synthetic markers solved by Blender's own ``clip.solve_camera`` (libmv) in a Clip Editor of the
headless window (bundles and the reconstruction are read-only in the API: only a solve makes them).

Ground truth: the Blender -> OpenCV formula written out here (``CV_TO_BLENDER``, ``FLIP_YZ`` literally), the
synthetic clip's exact depth, Blender's own ``world_to_camera_view``, and analytic bundles of a known scale.
"""

from __future__ import annotations

import math

import bpy
import numpy as np
import pytest
from bpy_extras.object_utils import world_to_camera_view
from conftest import addon_module, backend_py
from mathutils import Matrix, Vector

CV_TO_BLENDER = np.array([[1.0, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]])  # X = x, Y = z, Z = -y
FLIP_YZ = np.diag([1.0, -1.0, -1.0, 1.0])


def _opencv_extrinsics(mw: np.ndarray) -> np.ndarray:
    """Blender camera matrix_world -> OpenCV world-to-camera, literally: inv(inv(C) @ mw @ F)."""
    return np.linalg.inv(np.linalg.inv(CV_TO_BLENDER) @ mw @ FLIP_YZ)


def _import(clip, depth=None):
    assert bpy.ops.ex4d.import_footage(filepath=str(clip["frames_dir"]), focal_px=clip["focal_px"]) == {"FINISHED"}
    if depth is not None:
        bpy.context.scene.ex4d.depth_filepath = str(depth)


def _key_source(scene, offsets) -> bpy.types.Object:
    """Key EX4D Source on every clip frame at its imported pose moved by ``offsets[i]`` = (dx, dy, dz, rx, ry, rz)
    in its own axes (metres, degrees)."""
    src = scene.ex4d.source_camera
    mw0 = src.matrix_world.copy()
    for i, (dx, dy, dz, rx, ry, rz) in enumerate(offsets):
        rot = Matrix.Rotation(math.radians(rz), 4, "Z") @ Matrix.Rotation(math.radians(ry), 4, "Y")
        rot = rot @ Matrix.Rotation(math.radians(rx), 4, "X")
        src.matrix_world = mw0 @ Matrix.Translation((dx, dy, dz)) @ rot
        src.keyframe_insert("location", frame=scene.frame_start + i)
        src.keyframe_insert("rotation_euler", frame=scene.frame_start + i)
    return src


def _jitter(n: int) -> list:
    rng = np.random.default_rng(15)
    return [tuple(rng.uniform(-0.05, 0.05, 3)) + tuple(rng.uniform(-2.0, 2.0, 3)) for _ in range(n)]


class _Layout:
    """Records a panel's draw calls (labels, operators), checking that the properties it names exist."""

    def __init__(self, log):
        self.log, self.alert, self.active = log, False, True

    def row(self, **_kw):
        return _Layout(self.log)

    column = box = row

    def label(self, text="", icon="NONE", translate=True):  # noqa: ARG002
        self.log.append(("label", text))

    def prop(self, data, name, **_kw):
        assert name in data.bl_rna.properties, f"{data} has no property {name}"
        self.log.append(("prop", name))

    def operator(self, idname, **_kw):
        mod, name = idname.split(".")
        getattr(getattr(bpy.ops, mod), name).get_rna_type()
        self.log.append(("operator", idname))


def _panel_log() -> list:
    log: list = []
    bpy.types.EX4D_PT_source.draw(type("P", (), {"layout": _Layout(log)})(), bpy.context)
    return log


def _evaluated_mw(obj, frame: int) -> np.ndarray:
    bpy.context.scene.frame_set(frame)
    return np.array(obj.evaluated_get(bpy.context.evaluated_depsgraph_get()).matrix_world)


def test_keyed_source_round_trips_and_the_dwmesh_lines_up(scene, clip):
    """The source path the backend receives is the Blender camera's: the backend's extrinsics of the sent payload
    = inv(inv(C) @ matrix_world @ F) on every frame (fails on a frame offset, an unevaluated/static matrix, a
    missing source in the payload). The DW-mesh parented to the source lands on its pixels from the source
    camera of that frame at depth x scale (fails on a static mesh, a wrong local matrix, a lost scale)."""
    src_mod = addon_module("source_camera")
    data = addon_module("data")
    _import(clip, clip["depth"])
    n, w, h = clip["n_frames"], clip["width"], clip["height"]
    src = _key_source(scene, _jitter(n))
    st = scene.ex4d_source
    st.use_moving_source, st.scale_mode, st.manual_scale = True, "MANUAL", 1.7
    payload = data.run_to_end(src_mod.source_params(bpy.context, n))
    assert payload["depth_scale"] == pytest.approx(1.7)
    res = backend_py(
        """
import numpy as np
from ex4d_backend.pipeline.source import resolve_source
path, k = resolve_source(ARGS["spec"], ARGS["n"], np.array(ARGS["K"]), ARGS["w"], ARGS["h"])
OUT = {"E": path.extrinsics.tolist(), "K": np.asarray(k).tolist()}
""",
        spec=payload["source_camera"], n=n, K=clip["K"], w=w, h=h,
    )  # fmt: skip
    mws = [_evaluated_mw(src, scene.frame_start + i) for i in range(n)]
    np.testing.assert_allclose(np.array(res["E"]), [_opencv_extrinsics(m) for m in mws], atol=1e-5)
    k_back = np.array(res["K"]).reshape(-1, 3, 3)
    np.testing.assert_allclose(k_back, np.broadcast_to(clip["K"], k_back.shape), rtol=1e-5, atol=1e-4)

    assert bpy.ops.ex4d.build_dwmesh() == {"FINISHED"}, scene.ex4d.last_error
    mesh = scene.ex4d.dwmesh
    assert mesh.parent == src and np.allclose(np.array(mesh.matrix_parent_inverse), np.eye(4))
    assert st.fit_scale == pytest.approx(1.7)
    depth = np.load(clip["depth"]).astype(np.float64)
    v, u = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    for i in range(n):
        scene.frame_set(scene.frame_start + i)
        dg = bpy.context.evaluated_depsgraph_get()
        mw = np.array(mesh.evaluated_get(dg).matrix_world)
        co = data.evaluated_positions(mesh, dg).astype(np.float64) @ mw[:3, :3].T + mw[:3, 3]
        cam = src.evaluated_get(dg)
        pick = np.arange(0, len(co), 5)  # every 5th vertex (Blender's function is per point): all rows and columns
        ndc = np.array([tuple(world_to_camera_view(scene, cam, Vector(co[j]))) for j in pick])
        d = depth[i].copy()
        d[0, :] = d[-1, :] = d[:, 0] = d[:, -1] = 100.0  # the DW-mesh's border ring
        # pixel (col, row)'s vertex at image coordinate (col, row) (the reference's K: u = fx x / z + cx puts
        # the vertex of pixel i at u = i; docs/moving_camera.md's half-pixel note), the same on every frame
        np.testing.assert_allclose(ndc[:, 0] * w, u.ravel()[pick], atol=2e-3, err_msg=f"frame {i}")
        np.testing.assert_allclose((1.0 - ndc[:, 1]) * h, v.ravel()[pick], atol=2e-3, err_msg=f"frame {i}")
        np.testing.assert_allclose(ndc[:, 2], 1.7 * d.ravel()[pick], rtol=1e-5, err_msg=f"frame {i}")


def _wall_shot(scene, clip, depth_units: np.ndarray, s_true: float, name: str):
    """Footage with the depth map ``depth_units`` (T,) per frame (a wall), Empties on the wall at ``s_true`` x
    frame 0's distance, the source sliding along its own x axis (the wall's depth stays exact on every frame)."""
    n = clip["n_frames"]
    depth = np.broadcast_to(depth_units[:, None, None], (n, clip["height"], clip["width"])).astype(np.float32)
    wall = clip["dir"] / f"{name}.npy"  # beside the footage: a folder the running backend already may read
    np.save(wall, depth)
    _import(clip, wall)
    src = scene.ex4d.source_camera
    mw0 = src.matrix_world.copy()
    coll = bpy.data.collections.new("bundles")
    scene.collection.children.link(coll)
    for x in (-2.0, -0.7, 0.7, 2.0):
        for y in (-1.2, 0.0, 1.2):
            e = bpy.data.objects.new(f"b{x}{y}", None)
            coll.objects.link(e)
            e.location = mw0 @ Vector((x, y, -s_true * depth_units[0]))  # a Blender camera looks down its local -Z
    _key_source(scene, [(0.05 * i, 0.0, 0.0, 0.0, 0.0, 0.0) for i in range(n)])
    st = scene.ex4d_source
    st.use_moving_source, st.scale_mode, st.bundle_collection = True, "BUNDLES", coll
    return st


def test_bundles_fit_a_known_scale(scene, clip):
    """Empties on a wall at 2.5 x the depth map's distance: Build DW-Mesh fits 2.5 to 1 %, the panel's fit shows
    it and the mesh is scaled by it. Fails on bundles sent in the wrong convention, a missing fit, or an unscaled
    mesh."""
    s_true = 2.5
    st = _wall_shot(scene, clip, np.full(clip["n_frames"], 4.0), s_true, "wall_depth")
    assert bpy.ops.ex4d.build_dwmesh() == {"FINISHED"}, scene.ex4d.last_error
    assert st.fit_scale == pytest.approx(s_true, rel=0.01)
    assert st.fit_n_obs >= 8 and st.fit_residual < 0.01 and not st.fit_warnings
    mesh = scene.ex4d.dwmesh
    assert np.array(mesh.matrix_basis.to_scale()) == pytest.approx([s_true] * 3, rel=0.01)
    assert any(kind == "label" and x.startswith("Scale 2.5") for kind, x in _panel_log())


def test_per_frame_scale_keys_the_mesh(scene, clip):
    """A depth whose units drift per frame (the wall at 4 x (1 + 0.1 t) units, fixed in the world): the per-frame
    fit gives s_t = 2.5 / (1 + 0.1 t) and the DW-mesh's evaluated scale on frame t is s_t, so the wall stays put.
    Fails when the per-frame scales are ignored or keyed on the wrong frames."""
    n = clip["n_frames"]
    drift = 1.0 + 0.1 * np.arange(n)
    st = _wall_shot(scene, clip, 4.0 * drift, 2.5, "drifting_wall_depth")
    st.per_frame_scale = True
    assert bpy.ops.ex4d.build_dwmesh() == {"FINISHED"}, scene.ex4d.last_error
    mesh = scene.ex4d.dwmesh
    for i in range(n):
        got = Matrix(_evaluated_mw(mesh, scene.frame_start + i).tolist()).to_scale()
        assert np.array(got) == pytest.approx([2.5 / drift[i]] * 3, rel=0.01), f"frame {i}"


def _novel_turned(scene, degrees: float) -> bpy.types.Object:
    """A novel camera with the source's lens, turned ``degrees`` about its up axis on every frame, keyed."""
    src = scene.ex4d.source_camera
    cam = bpy.data.objects.new("turned", bpy.data.cameras.new("turned"))
    scene.collection.objects.link(cam)
    for key in ("lens", "sensor_fit", "sensor_width", "sensor_height", "shift_x", "shift_y", "clip_start"):
        setattr(cam.data, key, getattr(src.data, key))
    cam.data.clip_end = 1000.0
    start = Matrix(_evaluated_mw(src, scene.frame_start).tolist())
    for f in (scene.frame_start, scene.frame_end):
        scene.frame_set(f)
        cam.matrix_world = start @ Matrix.Rotation(math.radians(degrees), 4, "Y")
        cam.keyframe_insert("location", frame=f)
        cam.keyframe_insert("rotation_euler", frame=f)
    scene.ex4d.novel_camera = cam
    return cam


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    r = a[:3, :3].T @ b[:3, :3]
    return math.degrees(math.acos(max(-1.0, min(1.0, (np.trace(r) - 1.0) / 2.0))))


@pytest.mark.slow
def test_frame0_warning_and_snap(scene, clip):
    """A keyed, jittering moving source and a novel camera turned 16 degrees from it at frame 1: the guide's
    frame0_is_source is false and the panel warns; Snap keys frame 1 at the source pose, and the guide rendered
    again (with the source path and scale sent) starts at the source: no warning. Fails when the warning is not
    raised, the snap leaves the first frame off the source, or the guide's source path is not the camera's."""
    _import(clip, clip["depth"])
    src = _key_source(scene, _jitter(clip["n_frames"]))
    scene.ex4d_source.use_moving_source = True
    scene.ex4d_source.manual_scale = 1.3
    assert bpy.ops.ex4d.build_dwmesh() == {"FINISHED"}, scene.ex4d.last_error
    novel = _novel_turned(scene, 16.0)
    assert bpy.ops.ex4d.render_guide() == {"FINISHED"}, scene.ex4d.last_error
    assert "does not start at the source" in scene.ex4d_source.frame0_warning
    ops = [x for kind, x in _panel_log() if kind == "operator"]
    assert "ex4d.snap_to_source" in ops and "ex4d.blend_from_source" in ops
    assert bpy.ops.ex4d.snap_to_source() == {"FINISHED"}
    assert scene.ex4d_source.frame0_warning == ""
    f0 = scene.frame_start
    np.testing.assert_allclose(_evaluated_mw(novel, f0), _evaluated_mw(src, f0), atol=1e-6)
    assert _angle_deg(_evaluated_mw(novel, scene.frame_end), _evaluated_mw(src, f0)) == pytest.approx(
        16.0, abs=1e-3
    )  # the path's end kept
    assert bpy.ops.ex4d.render_guide() == {"FINISHED"}, scene.ex4d.last_error
    assert scene.ex4d_source.frame0_warning == ""
    assert "ex4d.snap_to_source" not in [x for kind, x in _panel_log() if kind == "operator"]


def test_blend_in_from_source(scene, clip):
    """Blend In over 3 frames: frame 1 is the source pose, frame 4 the designed path (16 degrees), frame 2 turned
    16 x smoothstep(1/3) degrees. Fails on a wrong weight, a blend that ends off the path, or an unkeyed start."""
    _import(clip)
    src = scene.ex4d.source_camera
    novel = _novel_turned(scene, 16.0)
    scene.ex4d_source.blend_frames = 3
    assert bpy.ops.ex4d.blend_from_source() == {"FINISHED"}
    f0 = scene.frame_start
    ms = _evaluated_mw(src, f0)
    angles = [_angle_deg(_evaluated_mw(novel, f0 + i), ms) for i in range(4)]
    w = 1 / 3
    assert angles[0] == pytest.approx(0.0, abs=1e-3) and angles[3] == pytest.approx(16.0, abs=1e-3)
    assert angles[1] == pytest.approx(16.0 * w * w * (3 - 2 * w), abs=1e-3)
    w2 = 2 / 3
    assert angles[2] == pytest.approx(16.0 * w2 * w2 * (3 - 2 * w2), abs=1e-3)


def _solve_clip(clip_data, points: np.ndarray, centres: np.ndarray) -> bpy.types.MovieClip:
    """The footage as a Movie Clip with one track per point (``points`` (M, 3) in the first camera's OpenCV
    axes, the camera at ``centres`` (T, 3), no rotation): markers at the exact projections with the clip's
    focal length, then Blender's own camera solve (``clip.solve_camera`` in a Clip Editor of the headless
    window)."""
    w, h, f = clip_data["width"], clip_data["height"], clip_data["focal_px"]
    mc = bpy.data.movieclips.load(str(clip_data["video"]), check_existing=True)
    mc.frame_start = bpy.context.scene.frame_start
    tc = mc.tracking.camera
    tc.sensor_width = 36.0
    tc.focal_length_pixels = f
    tc.principal_point_pixels = (w / 2, h / 2)
    tc.k1 = tc.k2 = tc.k3 = 0.0
    for j, p in enumerate(points):
        track = mc.tracking.tracks.new(name=f"p{j}", frame=1)
        for t, c in enumerate(centres):
            x = p - c
            track.markers.insert_frame(t + 1, co=((f * x[0] / x[2] + w / 2) / w, 1.0 - (f * x[1] / x[2] + h / 2) / h))
    obj = mc.tracking.objects.active
    obj.keyframe_a, obj.keyframe_b = 1, len(centres)
    win = bpy.context.window_manager.windows[0]
    area = win.screen.areas[0]
    old = area.type
    area.type = "CLIP_EDITOR"
    area.spaces.active.clip = mc
    try:
        with bpy.context.temp_override(window=win, area=area, space_data=area.spaces.active, edit_movieclip=mc):
            assert bpy.ops.clip.solve_camera() == {"FINISHED"}
    finally:
        area.type = old
    assert mc.tracking.reconstruction.is_valid and mc.tracking.reconstruction.average_error < 0.01
    return mc


def test_camera_solve_is_followed_and_its_bundles_fit_the_scale(scene, clip):
    """A real camera solve (Blender's libmv on exact synthetic tracks: points on two fronto-parallel planes at
    z = 6 and 10, the camera sliding in its image plane, so the depth map of every frame is exact):
    ``import_footage(use_camera_solve=True)`` makes EX4D Source follow it (Camera Solver constraint), the payload's
    source path is the solve's cameras (the literal formula on the reconstruction's own matrices), and the fit to
    the solve's bundles finds the solve's scale (its baseline / the true baseline) to 1 %. Fails on a static
    source, a frame offset in the marker -> clip-frame mapping, bundles in the wrong convention, or a lost fit."""
    n, w, h, f = clip["n_frames"], clip["width"], clip["height"], clip["focal_px"]
    rng = np.random.default_rng(7)
    pts = []
    for z, (u0, u1) in ((6.0, (8.0, 24.0)), (10.0, (40.0, 56.0))):
        u, v = rng.uniform(u0, u1, 16), rng.uniform(6.0, 42.0, 16)
        pts.append(np.c_[(u - w / 2) / f * z, (v - h / 2) / f * z, np.full(16, z)])
    centres = np.c_[np.linspace(0.0, 0.5, n), np.linspace(0.0, 0.25, n), np.zeros(n)]
    mc = _solve_clip(clip, np.concatenate(pts), centres)
    depth = np.empty((n, h, w), np.float32)
    depth[:, :, : w // 2], depth[:, :, w // 2 :] = 6.0, 10.0  # the two planes (the points keep to their halves)
    planes = clip["dir"] / "planes_depth.npy"
    np.save(planes, depth)
    res = bpy.ops.ex4d.import_footage(filepath=str(clip["video"]), focal_px=f, use_camera_solve=True)
    assert res == {"FINISHED"}
    scene.ex4d.depth_filepath = str(planes)
    src = scene.ex4d.source_camera
    st = scene.ex4d_source
    assert st.use_moving_source and st.clip == mc and st.scale_mode == "BUNDLES"
    assert any(c.type == "CAMERA_SOLVER" and c.clip == mc for c in src.constraints)
    rec = {int(c.frame): np.array(c.matrix) for c in mc.tracking.reconstruction.cameras}
    mws = [_evaluated_mw(src, scene.frame_start + i) for i in range(n)]
    for i in range(n):  # the constraint puts the camera where the solve has it (the reconstruction's matrices)
        np.testing.assert_allclose(mws[i], rec[i + 1], atol=1e-5)
    payload = addon_module("data").run_to_end(addon_module("source_camera").source_params(bpy.context, n))
    assert len(payload["depth_scale"]["bundles"]) == 32 and payload["depth_scale"]["bundles"][0]["frames"] == list(
        range(n)
    )
    got = np.array(payload["source_camera"]["blender"]["matrix_world"])
    np.testing.assert_allclose([_opencv_extrinsics(m) for m in got], [_opencv_extrinsics(m) for m in mws], atol=1e-5)
    assert bpy.ops.ex4d.build_dwmesh() == {"FINISHED"}, scene.ex4d.last_error
    baseline_solve = np.linalg.norm(mws[-1][:3, 3] - mws[0][:3, 3])
    sigma = baseline_solve / np.linalg.norm(centres[-1] - centres[0])  # the solve's units per true unit
    assert st.fit_scale == pytest.approx(sigma, rel=0.01), (st.fit_scale, sigma, st.fit_warnings)
    assert scene.ex4d.dwmesh.parent == src


def test_locked_off_camera_holds_the_source_pose(scene, clip):
    """Add Locked-off Camera on frame 3 of a jittering source: the new novel camera's pose on every frame is the
    source's of frame 3 and its lens the source's; the guide from it does not start at the source (frame 1 is
    elsewhere), which the backend reports. Fails on an animated/jittering copy, the wrong frame, or another lens."""
    _import(clip, clip["depth"])
    src = _key_source(scene, _jitter(clip["n_frames"]))
    scene.ex4d_source.use_moving_source = True
    held = scene.frame_start + 2
    assert bpy.ops.ex4d.add_locked_off_camera(frame=held) == {"FINISHED"}
    cam = scene.ex4d.novel_camera
    assert cam.name.startswith("EX4D Locked-off") and cam.data.lens == pytest.approx(src.data.lens)
    want = _evaluated_mw(src, held)
    for i in range(clip["n_frames"]):
        np.testing.assert_allclose(_evaluated_mw(cam, scene.frame_start + i), want, atol=1e-6)
    assert bpy.ops.ex4d.render_guide() == {"FINISHED"}, scene.ex4d.last_error
    assert "does not start at the source" in scene.ex4d_source.frame0_warning


def test_preset_follows_the_moving_source(scene, clip):
    """Add Camera Preset '30' with a jittering moving source (scale 1.3): the keyed novel camera is the reference's
    30-degree path relative to the source on every frame, E_novel[t] = E_preset[t] @ E_src[t] (docs/moving_camera.md,
    composed here literally; E_preset from the backend's reference preset at frame 0's depth x scale). Fails when
    the preset ignores the source (a static orbit) or its scale, or on a frame offset."""
    _import(clip, clip["depth"])
    n, w, h = clip["n_frames"], clip["width"], clip["height"]
    src = _key_source(scene, _jitter(n))
    st = scene.ex4d_source
    st.use_moving_source, st.scale_mode, st.manual_scale = True, "MANUAL", 1.3
    mws = [_evaluated_mw(src, scene.frame_start + i) for i in range(n)]
    assert bpy.ops.ex4d.add_camera_preset(preset="30") == {"FINISHED"}, scene.ex4d.last_error
    novel = scene.ex4d.novel_camera
    res = backend_py(
        """
import numpy as np
from ex4d_backend import cameras
d0 = np.load(ARGS["depth"])[0].astype(np.float64) * ARGS["s"]
OUT = {"E": cameras.preset_path("30", ARGS["n"], np.array(ARGS["K"]), d0, ARGS["w"], ARGS["h"]).extrinsics.tolist()}
""",
        depth=str(clip["depth"]), s=1.3, n=n, K=clip["K"], w=w, h=h,
    )  # fmt: skip
    for i in range(n):
        e_novel = np.array(res["E"][i]) @ _opencv_extrinsics(mws[i])
        want = CV_TO_BLENDER @ np.linalg.inv(e_novel) @ FLIP_YZ
        np.testing.assert_allclose(_evaluated_mw(novel, scene.frame_start + i), want, atol=2e-5, err_msg=f"frame {i}")
