"""``ex4d serve`` end to end: a real subprocess driven through the add-on's client module (no bpy).

Ground truth comes from the synthetic scene: exact depth, so the DW-mesh vertices are the unprojected
pixel positions, and a guide rendered from the source camera itself reproduces the source frames.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import service_fixtures as sf

from ex4d_backend.cameras import CV_TO_BLENDER
from ex4d_backend.footage import list_image_sequence, read_image_rgb
from ex4d_backend.service import jobs as service_jobs
from ex4d_backend.service.jobstore import JobStore
from ex4d_backend.service.pointcache import read_pc2

FLIP_YZ = np.diag([1.0, -1.0, -1.0, 1.0])
EXTRA_INPUTS: set[Path] = set()  # input files tests add inside the allowed folder (not the service)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("svc")
    clip = sf.make_clip(root / "data")
    client = sf.start_client(root / "store", [clip.root])
    yield clip, client, root / "store"
    client.close()


def _read_dir(folder: str) -> np.ndarray:
    return np.stack([read_image_rgb(p) for p in list_image_sequence(Path(folder))]).astype(np.float64)


def test_hello(env):
    clip, client, store = env
    hello = client.request("hello", timeout=120)
    assert sf.bc.protocol_compatible(hello["protocol"]) and not sf.bc.protocol_compatible("3.0")
    assert hello["store"] == str(store.resolve())
    assert str(clip.root.resolve()) in hello["allowed"]
    assert "preview" in hello["generators"] and "file" in hello["depth_models"]
    assert isinstance(hello["devices"], list) and isinstance(hello["models"], dict)


def test_recon_job_dwmesh_positions(env):
    clip, client, store = env
    req, events = sf.run(client, "build_dwmesh", clip.params())
    r = req.raise_for_error()
    sf.check_progress_order(events, ["inputs", "frames", "depth", "mesh"])
    assert r["cached"] == {"frames": False, "depth": False, "mesh": False}
    t, h, w = clip.depth.shape
    assert (r["n_frames"], r["width"], r["height"], r["n_vertices"]) == (t, w, h, h * w)
    np.testing.assert_allclose(r["K"], clip.k)
    np.testing.assert_allclose(r["cv_to_blender"], CV_TO_BLENDER)
    # One copy of the positions: the PC2 point cache the add-on's Mesh Cache modifier plays.
    pos, start, rate = read_pc2(Path(r["positions_pc2"]))
    assert (start, rate) == (0.0, 1.0) and "positions_npy" not in r
    assert pos.shape == (t, h * w, 3) and pos.dtype == np.float32
    # Every vertex is its pixel (u, v) unprojected with the scene's exact depth; the outer ring at 100.
    v, u = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    depth = clip.depth.astype(np.float64).copy()
    depth[:, [0, -1], :] = 100.0
    depth[:, :, [0, -1]] = 100.0
    k = clip.k
    want = np.stack(
        [(u - k[0, 2]) / k[0, 0] * depth, (v - k[1, 2]) / k[1, 1] * depth, depth],
        -1,
    ).reshape(t, h * w, 3)
    np.testing.assert_allclose(pos, want, rtol=1e-5, atol=1e-4)
    # Vertex colours are the frames (frames_npy); occlusion flags are 0/1.
    np.testing.assert_array_equal(np.load(r["frames_npy"]), clip.frames)
    faces = np.load(r["faces_npy"])
    occ = np.load(r["occlusion_npy"])
    assert faces.shape == (r["n_faces"], 3) and occ.shape == (t, r["n_faces"])
    assert set(np.unique(occ)) <= {0, 1} and occ.any() and not occ.all()  # the card and sphere edges
    assert Path(r["job_file"]).is_file() and json.loads(Path(r["job_file"]).read_text())["type"] == "build_dwmesh"
    # The same request again: the whole result from the store.
    again, events = sf.run(client, "build_dwmesh", clip.params())
    assert again.raise_for_error()["positions_pc2"] == r["positions_pc2"]
    assert all(again.result["cached"].values())


@pytest.mark.parametrize(
    "fit, sensor_mm",
    [("AUTO", {"sensor_width": 36.0}), ("HORIZONTAL", {"sensor_width": 36.0}), ("VERTICAL", {"sensor_height": 24.0})],
)
def test_source_lens_follows_blenders_sensor_fit_on_portrait_footage(env, fit, sensor_mm):
    """A lens in mm becomes the focal length in pixels by Blender's rule: AUTO spans the sensor width
    over the longer side (the height of portrait footage), HORIZONTAL over the width, VERTICAL spans the
    sensor height over the height."""
    clip, client, _ = env
    portrait = clip.root / "portrait"
    if not portrait.exists():
        sf.make_clip(portrait, width=48, height=64, n_frames=3)
        EXTRA_INPUTS.update({portrait, *portrait.rglob("*")})  # inputs, before any job ran on them
    w, h = 48, 64
    span = {"AUTO": h, "HORIZONTAL": w, "VERTICAL": h}[fit]
    f_px = 57.0
    lens = f_px * next(iter(sensor_mm.values())) / span
    params = {
        "footage": str(portrait / "clip"),
        "depth": {"model": "file", "path": str(portrait / "depth.npy")},
        "lens": lens,
        "sensor_fit": fit,
        **sensor_mm,
    }
    r = sf.run(client, "build_dwmesh", params)[0].raise_for_error()
    np.testing.assert_allclose(r["K"], [[f_px, 0, w / 2], [0, f_px, h / 2], [0, 0, 1]], rtol=1e-9)


def _source_camera_blender(clip: sf.Clip, n: int) -> dict:
    """The source camera itself, as raw Blender camera data (matrix_world, lens, sensor)."""
    h, w = clip.frames.shape[1:3]
    mw = CV_TO_BLENDER @ np.linalg.inv(np.eye(4)) @ FLIP_YZ
    lens = clip.k[0, 0] * 36.0 / w  # sensor fit AUTO, landscape: the width spans the 36 mm sensor
    return {"blender": {"matrix_world": [mw.tolist()] * n, "lens": lens, "sensor_width": 36.0, "resolution": [w, h]}}


def test_render_guide_camera_path_then_camera_change_from_cache(env):
    clip, client, store = env
    t = len(clip.frames)
    params = clip.params(camera=_source_camera_blender(clip, t), renderer="cpu")
    req, events = sf.run(client, "render_guide", params)
    r = req.raise_for_error()
    sf.check_progress_order(events, ["inputs", "frames", "depth", "camera", "render", "write"])
    color, mask = _read_dir(r["color_dir"]), _read_dir(r["mask_dir"])
    assert color.shape == clip.frames.shape and "color_mp4" not in r  # videos only with "videos": true
    # Seen from the source camera the mesh reproduces the frames. A rendered pixel (i, j) samples
    # (u, v) = (i + 0.5, j + 0.5): the middle of the quad's diagonal from vertex (i + 1, j) to (i, j + 1),
    # so its colour is the mean of those two source pixels. Occlusion faces (the card's and the
    # sphere's silhouettes) are masked out: a thin band only.
    f = clip.frames.astype(np.float64)
    want = (f[:, :-1, 1:] + f[:, 1:, :-1]) / 2
    valid = mask[:, 1:-2, 1:-2, 0] == 255
    assert 0.9 < valid.mean() < 1.0, valid.mean()
    diff = np.abs(color[:, 1:-2, 1:-2] - want[:, 1:-1, 1:-1])[valid]
    assert np.median(diff) <= 1 and diff.mean() < 4, (np.median(diff), diff.mean())
    mesh_dir = Path(r["camera_npz"]).parents[1]
    depth_files = sorted(store.glob("cache/depth-*/depth.npy"))
    frame_files = sorted(store.glob("cache/frames-*/frames.npy"))
    stamps = {p: p.stat().st_mtime_ns for p in depth_files + frame_files}
    meshes = sorted(store.glob("cache/mesh-*"))
    # Only the camera changes: frames and depth come from the store (the same files), the guide is new;
    # the guide's DW-mesh is rebuilt on the fly (it is never stored for a guide).
    req2, events2 = sf.run(client, "render_guide", clip.params(camera={"preset": "90"}, renderer="cpu"))
    r2 = req2.raise_for_error()
    assert r2["cached"] == {"frames": True, "depth": True, "guide": False}
    assert r2["job"] != r["job"] and r2["color_dir"] != r["color_dir"]
    for stage in ("frames", "depth"):
        msgs = [e["message"] for e in events2 if e["event"] == "progress" and e["stage"] == stage]
        assert msgs[-1] == "from the store" and "done" not in msgs, (stage, msgs)
        assert stage == "frames" or msgs == ["from the store"], (stage, msgs)
    assert sorted(store.glob("cache/depth-*/depth.npy")) == depth_files
    assert sorted(store.glob("cache/frames-*/frames.npy")) == frame_files
    assert sorted(store.glob("cache/mesh-*")) == meshes
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # The orbit really is another view: far from the source frames.
    color2 = _read_dir(r2["color_dir"])
    err_orbit = np.abs(color2[-1, 1:-2, 1:-2] - want[-1, 1:-1, 1:-1]).mean()
    assert err_orbit > 4 * diff.mean(), (err_orbit, diff.mean())
    assert mesh_dir.is_dir()


def test_generate_preview(env):
    clip, client, store = env
    t = len(clip.frames)
    params = clip.params(
        camera={"preset": "30"},
        renderer="cpu",
        generator="preview",
        width=64,
        height=48,
        num_frames=5,
        frame_sampling="reference",  # the reference's single linspace window (tests/test_service_windows.py: all)
    )
    req, events = sf.run(client, "generate", params)
    r = req.raise_for_error()
    stages = ["inputs", "frames", "depth", "camera", "render", "write", "window", "preview", "save"]
    sf.check_progress_order(events, stages, loop=("window", "preview"))
    frames = _read_dir(r["frames_dir"])
    assert frames.shape == (5, 48, 64, 3) and r["n_frames"] == 5
    assert r["source_frames"][0] == 0 and r["source_frames"][-1] == t - 1
    assert r["settings"]["generator"] == "preview" and Path(r["video_mp4"]).stat().st_size > 0
    # Where the guide is valid the preview keeps the guide's colour (bottom rows: no label there).
    guide = _read_dir(os.path.join(r["guide_dir"], "color"))[r["source_frames"]]
    gmask = _read_dir(os.path.join(r["guide_dir"], "mask"))[r["source_frames"]][..., 0] == 255
    rows = slice(30, None)
    diff = np.abs(frames[:, rows].astype(int) - guide[:, rows])[gmask[:, rows]]
    assert diff.size > 0 and np.median(diff) <= 2
    # Changing only a generator setting reuses the guide.
    req2, _ = sf.run(client, "generate", {**params, "seed": 3})
    assert req2.raise_for_error()["cached"] == {
        "frames": True,
        "depth": True,
        "guide": True,
        "generate": False,
    }


def test_queue_and_cancel(tmp_path):
    """A slow service (test hook: a delay per progress step): a second job is queued; cancel stops the
    running job at a step boundary; a queued job can be dropped; the service keeps serving."""
    clip = sf.make_clip(tmp_path / "data", n_frames=9)
    client = sf.start_client(tmp_path / "store", [clip.root], env={"EX4D_SERVICE_STEP_DELAY": "0.15"})
    try:
        a = client.submit("build_dwmesh", clip.params())
        hello = client.submit("hello")  # on a fresh process, beside the first job (torch import race)
        b = client.submit("build_dwmesh", clip.params(mesh_filter="boundary"))
        c = client.submit("build_dwmesh", clip.params(border_depth=50.0))
        sf.wait_for(client, lambda: b.state == "queued" and c.state == "queued", what="queued events")
        assert (b.queue_position, c.queue_position) == (1, 2)
        sf.wait_for(client, lambda: a.progress is not None and a.progress[0] == "mesh", what="a in its mesh stage")
        client.cancel(a.id)
        client.wait(a, 60)
        assert a.error["code"] == "cancelled", a.error
        dropped = client.cancel(c.id)
        client.wait(dropped, 30)
        assert dropped.result == {"target": c.id, "state": "dropped"}
        client.wait(c, 30)
        assert c.error["code"] == "cancelled"
        client.wait(b, 120)
        assert client.wait(hello, 60).raise_for_error()["protocol"]
        rb = b.raise_for_error()  # the queued job ran after the cancelled one
        assert rb["cached"]["frames"] is True and rb["cached"]["mesh"] is False
        assert client.request("hello", timeout=60)["protocol"]
        jobs = {j["request_id"]: j["state"] for j in client.request("jobs", timeout=30)["jobs"]}
        assert jobs[a.id] == "cancelled" and jobs[b.id] == "done"
        # The cancelled mesh left nothing: no partial folder, only b's complete mesh.
        store = tmp_path / "store"
        assert not list(store.glob("cache/.*"))
        assert [p.parent.name for p in store.glob("cache/mesh-*/meta.json")] == [Path(rb["positions_pc2"]).parent.name]
        # A client-side time limit: the request fails with `timeout` and the backend cancels the job.
        slow = client.submit("build_dwmesh", clip.params(border_depth=70.0))
        client.wait(slow, 0.5)
        assert slow.error["code"] == "timeout"

        def slow_state():
            return {j["request_id"]: j["state"] for j in client.request("jobs", timeout=30)["jobs"]}.get(slow.id)

        sf.wait_for(client, lambda: slow_state() == "cancelled", what="the timed-out job cancelled")
        assert slow.done and slow.error["code"] == "timeout"  # late events do not reopen it
    finally:
        client.close()


def test_killed_mid_write_keeps_previous_result(tmp_path):
    clip = sf.make_clip(tmp_path / "data")
    store = tmp_path / "store"
    # The previous result, made in-process with the service's own job code (saves a backend start).
    first = service_jobs.run_job("build_dwmesh", clip.params(), service_jobs.Context(JobStore(store, [clip.root])))
    pos_path = Path(first["positions_pc2"])
    before = pos_path.read_bytes()
    # Recompute the same mesh (force) in a backend that sleeps inside the stage write, and kill it there.
    client = sf.start_client(store, [clip.root], env={"EX4D_SERVICE_WRITE_DELAY": "60"})
    req = client.submit("build_dwmesh", clip.params(force=True))
    sf.wait_for(client, lambda: req.progress is not None and req.progress[:2] == ("mesh", req.progress[2]))
    sf.wait_for(client, lambda: list(store.glob("cache/.mesh-*.partial-*/positions.pc2")), what="a partial write")
    time.sleep(0.3)
    client.kill()  # SIGKILL
    sf.wait_for(client, lambda: req.done, what="backend_died")
    assert req.error["code"] == "backend_died"
    # No partial result at the final path; the previous one is intact.
    assert pos_path.read_bytes() == before and (pos_path.parent / "meta.json").is_file()
    assert [p.name for p in store.glob("cache/mesh-*")] == [pos_path.parent.name]
    state = json.loads((Path(first["job_dir"]) / "state.json").read_text())
    assert state["state"] == "running"  # as the killed process left it
    # After a restart the unfinished job is reported as such, and leftovers are cleaned.
    client = sf.start_client(store, [clip.root])
    try:
        hello = client.request("hello", timeout=120)
        assert hello["interrupted"] == [first["job"]]
        jobs = {j["job"]: j for j in client.request("jobs", timeout=30)["jobs"]}
        assert jobs[first["job"]]["state"] == "interrupted" and jobs[first["job"]]["request_id"] == req.id
        assert not list(store.glob("cache/.*"))
        again = client.request("build_dwmesh", clip.params(), timeout=120)
        assert again["positions_pc2"] == str(pos_path) and pos_path.read_bytes() == before
    finally:
        client.close()


def test_probe_footage_and_camera_preset_round_trip(env):
    """probe_footage describes the clip; a preset sent back as raw Blender camera data (what the add-on
    does after keying the preset on a Blender camera) renders with the preset's own cameras."""
    clip, client, store = env
    t, h, w = clip.depth.shape
    probe = client.request("probe_footage", {"footage": str(clip.footage), "focal_px": float(clip.k[0, 0])})
    assert (probe["width"], probe["height"], probe["frame_count"]) == (w, h, t)
    assert (probe["processing_width"], probe["processing_height"]) == (w, h)
    np.testing.assert_allclose(probe["K"], clip.k)
    # The source camera in Blender terms: lens / sensor width = fx / width.
    assert probe["lens"] / probe["sensor_width"] == pytest.approx(clip.k[0, 0] / w)
    preset = client.request("camera_preset", clip.params(preset="90"), timeout=60)
    assert len(preset["matrix_world"]) == t and len(preset["lens"]) == t
    blender = {
        "matrix_world": preset["matrix_world"],
        "lens": preset["lens"],
        **{f: preset[f] for f in ("sensor_width", "sensor_height", "sensor_fit", "shift_x", "shift_y")},
    }
    via_blender = client.request("render_guide", clip.params(camera={"blender": blender}, renderer="cpu"))
    via_preset = client.request("render_guide", clip.params(camera={"preset": "90"}, renderer="cpu"))
    with np.load(via_blender["camera_npz"]) as a, np.load(via_preset["camera_npz"]) as b:
        np.testing.assert_allclose(a["extrinsics"], b["extrinsics"], atol=1e-9)
        np.testing.assert_allclose(a["intrinsics"], b["intrinsics"], rtol=1e-9)
    with np.load(preset["camera_npz"]) as c, np.load(via_preset["camera_npz"]) as b:
        np.testing.assert_allclose(c["extrinsics"], b["extrinsics"], atol=1e-12)


def test_client_is_stdlib_only():
    """The add-on ships backend_client.py into Blender: standard library imports only (no bpy/torch)."""
    import ast
    import sys

    tree = ast.parse(sf.CLIENT_PATH.read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert names and names <= set(sys.stdlib_module_names) | {"__future__"}, names


def test_jobs_wrote_only_inside_the_store(env):
    """After every job of this module (runs last): the input folder holds exactly the inputs."""
    clip, client, store = env
    inputs = {clip.depth_path, *clip.footage.iterdir(), clip.footage, *EXTRA_INPUTS}
    assert set(clip.root.rglob("*")) == inputs
    assert {p.name for p in clip.root.parent.iterdir()} == {"data", "store"}
    assert len(list(clip.footage.iterdir())) == len(clip.frames)
