"""Shot history and depth tools in headless Blender against a real ``ex4d serve`` (preview generator, CPU).

Ground truth: the version folders and sidecars on disk, the clip's own generated frames (the thumbnail is
the middle one), the scene settings the versions were made with, and the mesh-relevant settings changed
by the test itself.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import addon_module
from test_job_ops import card_clip, ops, read_png, setup_shot, strips_of  # noqa: F401 (fixtures)

bpy = pytest.importorskip("bpy")


def _generate(sc, seed: int) -> None:
    sc.ex4d.seed = seed
    assert bpy.ops.ex4d.generate(generator="PREVIEW") == {"FINISHED"}, sc.ex4d.last_error


def test_two_generates_are_two_versions_with_history(scene, ops, card_clip, tmp_blend_dir):  # noqa: F811
    """Two generates give v001 and v002, each with its sidecar next to it (the settings it was made with),
    a thumbnail equal to its middle frame and a re-runnable job file; the list shows both; re-run fills
    the first one's settings back in; delete asks first (invoke) and then moves only that version to the
    trash. Fails if a second generate overwrites the first, if the sidecar holds the scene's later
    settings, if the thumbnail is another frame, or if delete touches the other version."""
    sc = scene
    setup_shot(sc, card_clip, frame_start=1, parented=False)
    sc.ex4d.steps, sc.ex4d.prompt = 2, "history one"
    sc.ex4d_job.width, sc.ex4d_job.height, sc.ex4d_job.num_frames = 64, 48, 5
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_blend_dir / "hist.blend"))
    _generate(sc, 11)
    sc.ex4d.prompt, sc.ex4d.steps = "history two", 3
    _generate(sc, 22)
    history, history_ui = addon_module("history"), addon_module("history_ui")
    assert history.wait_thumbnails(60)
    assert bpy.ops.ex4d.history_refresh() == {"FINISHED"}
    versions = sc.ex4d_history.versions
    assert [v.name.rsplit("_v", 1)[1] for v in versions] == ["001", "002"]
    shot = Path(versions[0].path).parent
    assert shot == history_ui.shot_dir(bpy.context)
    for v, seed, steps, prompt in zip(versions, (11, 22), (2, 3), ("history one", "history two"), strict=True):
        folder = Path(v.path)
        side = json.loads((shot / f"{folder.name}.json").read_text())
        assert (side["seed"], side["steps"], side["prompt"], side["generator"]) == (seed, steps, prompt, "preview")
        assert side["width"] == 64 and side["height"] == 48 and side["cfg"] == pytest.approx(sc.ex4d_job.cfg)
        assert len(side["camera_hash"]) >= 10 and side["date"].endswith("+00:00")
        assert (side["frame_start"], side["frame_end"]) == (1, 6)
        job = json.loads((folder / side["job_file"]).read_text())
        assert job["type"] == "generate" and job["params"]["seed"] == seed
        assert not Path(job["params"]["footage"]).is_absolute()  # project-relative (relative to the folder)
        frames = sorted(folder.glob("frame_*.png"))
        assert len(frames) == 6
        thumb = shot / f"{folder.name}.png"
        assert v.thumbnail.rsplit("?", 1)[0] == str(thumb) and thumb.is_file()
        np.testing.assert_array_equal(read_png(thumb), read_png(frames[3]))  # the middle frame (64 px: as is)
    # Re-run with edits: the scene changes, then the first version's settings come back.
    sc.ex4d.seed, sc.ex4d.steps, sc.ex4d.prompt = 99, 9, "changed"
    assert bpy.ops.ex4d.history_rerun(index=0) == {"FINISHED"}
    assert (sc.ex4d.seed, sc.ex4d.steps, sc.ex4d.prompt, sc.ex4d.generator) == (11, 2, "history one", "PREVIEW")
    # Load into the VSE: a strip of that version's frames.
    n_before = len(strips_of(sc, "generate"))
    assert bpy.ops.ex4d.history_load(index=1) == {"FINISHED"}
    assert len(strips_of(sc, "generate")) == n_before + 1
    # Delete: invoke only asks (nothing moves), execute (the confirmation) moves v001 to the trash.
    op_cls = history_ui.EX4D_OT_history_delete
    asked = []
    wm = SimpleNamespace(invoke_confirm=lambda op, event: asked.append(op) or {"RUNNING_MODAL"})
    assert op_cls.invoke(SimpleNamespace(), SimpleNamespace(window_manager=wm), None) == {"RUNNING_MODAL"}
    assert asked and Path(versions[0].path).is_dir()
    v1, v2 = Path(versions[0].path), Path(versions[1].path)
    v2_files = sorted(p.name for p in v2.iterdir())
    assert bpy.ops.ex4d.history_delete(index=0) == {"FINISHED"}
    assert not v1.exists() and not (shot / f"{v1.name}.json").exists() and not (shot / f"{v1.name}.png").exists()
    (trashed,) = (shot / ".trash").iterdir()
    assert (trashed / v1.name / "frame_00001.png").is_file() and (trashed / f"{v1.name}.json").is_file()
    assert sorted(p.name for p in v2.iterdir()) == v2_files and (shot / f"{v2.name}.json").is_file()
    assert [v.name for v in sc.ex4d_history.versions] == [v2.name]
    # The next generate never reuses the deleted number's folder content: it is v003.
    _generate(sc, 33)
    history.wait_thumbnails(60)
    bpy.ops.ex4d.history_refresh()
    assert [v.name.rsplit("_v", 1)[1] for v in sc.ex4d_history.versions] == ["002", "003"]
    # Deleting the newest never frees its number: the next one is v004.
    assert bpy.ops.ex4d.history_delete(index=1) == {"FINISHED"}
    _generate(sc, 44)
    history.wait_thumbnails(60)
    bpy.ops.ex4d.history_refresh()
    assert [v.name.rsplit("_v", 1)[1] for v in sc.ex4d_history.versions] == ["002", "004"]
    assert all(history_ui.icon_id(v) >= 0 for v in sc.ex4d_history.versions)


def test_versions_never_overwrite_each_other(addon, tmp_path):
    """Writers at once (threads standing in for two Blender instances) each get their own folder: the
    reservation is an atomic mkdir. Fails with the former "max + 1" without reserving."""
    outputs = addon_module("outputs")
    shot = tmp_path / "shot"
    (shot / "p_v001").mkdir(parents=True)
    got, barrier = [], threading.Barrier(8)

    def writer():
        barrier.wait()
        got.append(outputs.version_dir(shot, "p", "")[0])

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 8 and all(p.is_dir() and p.name != "p_v001" for p in got)


def test_stale_flag_and_depth_tools(scene, ops, card_clip, tmp_blend_dir):  # noqa: F811
    """The stale flag is off after a build, on after changing the focal or the depth scale, off after a
    rebuild; the depth adjustment travels as depth.adjust (raw values) and the rebuilt mesh's depth is
    scale * z + offset; the depth preview swaps the footage material for the ramp and back; an EXR Z
    folder becomes the depth file. Fails if a setting the mesh depends on is left out of the hash, or the
    build does not record it."""
    sc = scene
    setup_shot(sc, card_clip, frame_start=1, parented=False)
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_blend_dir / "depth.blend"))
    depth_tools, backend = addon_module("depth_tools"), addon_module("backend")
    assert bpy.ops.ex4d.build_dwmesh() == {"FINISHED"}, sc.ex4d.last_error
    assert sc.ex4d.dwmesh is not None and not depth_tools.mesh_is_stale(bpy.context)
    sc.ex4d.focal_px = 55.0
    assert depth_tools.mesh_is_stale(bpy.context)
    sc.ex4d.focal_px = 50.0
    assert not depth_tools.mesh_is_stale(bpy.context)  # back to what was built
    d = sc.ex4d_depth
    d.scale, d.offset = 2.0, 0.5
    assert depth_tools.mesh_is_stale(bpy.context)
    params, _ = backend.clip_params(bpy.context)
    assert params["depth"]["adjust"] == {"scale": 2.0, "offset": 0.5}
    assert bpy.ops.ex4d.build_dwmesh() == {"FINISHED"}, sc.ex4d.last_error
    assert not depth_tools.mesh_is_stale(bpy.context)
    obj = sc.ex4d.dwmesh
    co = np.empty(len(obj.data.vertices) * 3, np.float32)
    obj.data.vertices.foreach_get("co", co)
    z = co[2::3].reshape(48, 64)[1:-1, 1:-1]  # inside the border ring
    assert set(np.round(np.unique(z), 4)) == {2.0 * 2.0 + 0.5, 2.0 * 4.0 + 0.5}  # card and wall, adjusted
    d.use_far, d.far = True, 6.0
    assert depth_tools.mesh_is_stale(bpy.context)
    # Depth preview on the DW-mesh: the ramp replaces the footage material, and back.
    footage_mat = obj.data.materials[0].name
    d.preview = True
    assert obj.data.materials[0].name == depth_tools.PREVIEW_MATERIAL
    rng = obj.data.materials[0].node_tree.nodes["range"]
    assert rng.inputs["From Max"].default_value == pytest.approx(6.0)
    d.preview = False
    assert obj.data.materials[0].name == footage_mat
    # EXR Z import: the folder becomes the scene's depth file.
    exr = tmp_blend_dir / "zpass"
    exr.mkdir()
    (exr / "z_0000.exr").write_bytes(b"")  # the operator only checks for EXR frames; the backend reads them
    assert bpy.ops.ex4d.import_depth_exr(directory=str(exr)) == {"FINISHED"}
    assert Path(bpy.path.abspath(sc.ex4d.depth_filepath)) == exr and sc.ex4d.depth_kind == "depth"
    assert depth_tools.mesh_is_stale(bpy.context)
